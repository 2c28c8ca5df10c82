"""Fake plugins for the core tests, published as an importable module so that entry points
(and so the CLI) can discover them without installing anything."""

from __future__ import annotations

import sys
import types
from importlib import metadata
from typing import Annotated, Literal

import pytest
import torch
from pydantic import Field

from fms_acceleration import AccelerationPlugin, Choice, Requirement, StanzaModel
from fms_acceleration import discovery as discovery_module
from fms_acceleration.constants import PLUGIN_GROUP
from fms_acceleration.framework_plugin import isolated_registrations

FAKE_MODULE = "fms_fake_plugins_for_tests"


class FakeLoader(AccelerationPlugin):
    order = 50  # declared late on purpose: loaders must still run first

    @property
    def requires_custom_loading(self) -> bool:
        return True

    def model_loader(self, model_name: str, **kwargs):
        from transformers import AutoModelForCausalLM

        from fms_acceleration.compat import model_dtype_kwargs

        return AutoModelForCausalLM.from_pretrained(model_name, **model_dtype_kwargs(kwargs))


class OtherLoader(FakeLoader):
    pass


class FakeKernels(AccelerationPlugin):
    slots = frozenset({"loss"})
    order = 10

    def requirements(self):
        body = self.stanza("training.fake_kernels") or self.stanza("peft.quantization.fake_kernels")
        if body and body["fused_lora"]:
            return [Requirement("model_loader", ("fake_loader",), "fused_lora")]
        return []


class OtherLoss(AccelerationPlugin):
    slots = frozenset({"loss"})


class AndPlugin(AccelerationPlugin):
    pass


class NeedsMissingPackage(AccelerationPlugin):
    require_packages = ("a_package_that_is_not_installed_anywhere",)
    install_hints = types.MappingProxyType(
        {"a_package_that_is_not_installed_anywhere": "fms-acceleration-fake[extra]"}
    )


class RestrictedAugmenter(AccelerationPlugin):
    restricted_model_archs = frozenset({"MistralForCausalLM"})

    @property
    def requires_augmentation(self) -> bool:
        return True


class KernelSchema(StanzaModel):
    fast_rms_layernorm: bool = False
    fast_loss: Choice[Literal[True, False, "fused_ce_liger"]] = False
    fused_lora: bool = False
    chunk_size: int = 1024


class LoaderSchema(StanzaModel):
    quant_type: Choice[Literal["nf4", "fp4"]] = "nf4"
    no_peft_model: bool = False


class BitsSchema(StanzaModel):
    bits: int = 4


class ScaleSchema(StanzaModel):
    scale: float = 1.0
    # bounded lengths, for the too-short / too-long messages
    labels: Annotated[list[str], Field(min_length=1, max_length=2)] = Field(
        default_factory=lambda: ["loss"]
    )
    tag: Annotated[str, Field(min_length=1)] = "x"


class Empty(StanzaModel):
    pass


KERNEL_PATHS = ["training.fake_kernels", "peft.quantization.fake_kernels"]
# (class, plugin id, its stanza paths, their schema, whether either path alone turns it on),
# in registration order: that order is the order of plugins with equal `order`
FAKE_REGISTRATIONS = [
    (FakeLoader, "fake_loader", ["peft.quantization.fake_loader"], LoaderSchema, False),
    (OtherLoader, "other_loader", ["peft.quantization.other_loader"], BitsSchema, False),
    (FakeKernels, "fake_kernels", KERNEL_PATHS, KernelSchema, True),
    (OtherLoss, "other_loss", ["training.other_loss"], ScaleSchema, False),
    (AndPlugin, "and_plugin", ["training.part_a", "training.part_b"], Empty, False),
    (NeedsMissingPackage, "needs_missing", ["training.needs_missing"], Empty, False),
    (RestrictedAugmenter, "restricted", ["training.restricted"], Empty, False),
]

# registered in a scope of their own, so other packages' tests never see the fakes
with isolated_registrations():
    for cls, plugin_id, paths, schema, either in FAKE_REGISTRATIONS:
        AccelerationPlugin.register_plugin(
            cls,
            **{"configuration_or_paths" if either else "configuration_and_paths": paths},
            plugin_id=plugin_id,
            schemas=dict.fromkeys(paths, schema),
        )

ALL_FAKES = [cls for cls, *_ in FAKE_REGISTRATIONS]


@pytest.fixture(autouse=True)
def _registrations_stay_in_the_test():
    """Plugins a test registers are gone after it (entry points are still discovered)."""
    with isolated_registrations(use_entry_points=True):
        yield


@pytest.fixture
def fakes():
    """The fake plugin classes, by attribute."""
    return types.SimpleNamespace(**{cls.__name__: cls for cls in ALL_FAKES}, ALL=ALL_FAKES)


@pytest.fixture
def installed_fakes(monkeypatch):
    """Make entry-point discovery see only the fake plugins (and one broken entry point)."""
    module = types.ModuleType(FAKE_MODULE)
    for cls in ALL_FAKES:
        setattr(module, cls.__name__, cls)
    monkeypatch.setitem(sys.modules, FAKE_MODULE, module)
    entry_points = [
        metadata.EntryPoint("fakes", FAKE_MODULE, PLUGIN_GROUP),
        metadata.EntryPoint("broken", "no_such_module_xyz", PLUGIN_GROUP),
    ]
    monkeypatch.setattr(discovery_module, "plugin_entry_points", lambda: entry_points)
    return module


@pytest.fixture
def tiny_llama_dir(tmp_path):
    from fms_acceleration.testing import save_tiny_model

    return save_tiny_model(tmp_path / "tiny-llama", arch="llama", dtype=torch.float32)
