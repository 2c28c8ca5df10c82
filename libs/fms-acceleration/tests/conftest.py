"""Fake plugins for the core tests, published as an importable module so that entry points
(and so the CLI) can discover them without installing anything."""

from __future__ import annotations

import sys
import types
from importlib import metadata

import pytest
import torch

from fms_acceleration import AccelerationPlugin, Option, Requirement, Stanza
from fms_acceleration import discovery as discovery_module

FAKE_MODULE = "fms_fake_plugins_for_tests"


class FakeLoader(AccelerationPlugin):
    order = 50  # declared late on purpose: loaders must still run first

    @property
    def requires_custom_loading(self) -> bool:
        return True

    def model_loader(self, model_name: str, **kwargs):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(model_name, **kwargs)


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


KERNEL_SCHEMA = Stanza(
    fast_rms_layernorm=Option(bool, default=False),
    fast_loss=Option((bool, str), default=False, choices=(True, False, "fused_ce_liger")),
    fused_lora=Option(bool, default=False),
    chunk_size=Option(int, default=1024),
)

AccelerationPlugin.register_plugin(
    FakeLoader,
    configuration_and_paths=["peft.quantization.fake_loader"],
    plugin_id="fake_loader",
    schemas={
        "peft.quantization.fake_loader": Stanza(
            quant_type=Option(str, default="nf4", choices=("nf4", "fp4")),
            no_peft_model=Option(bool, default=False),
        )
    },
)
AccelerationPlugin.register_plugin(
    OtherLoader,
    configuration_and_paths=["peft.quantization.other_loader"],
    plugin_id="other_loader",
    schemas={"peft.quantization.other_loader": Stanza(bits=Option(int, default=4))},
)
AccelerationPlugin.register_plugin(
    FakeKernels,
    configuration_or_paths=["training.fake_kernels", "peft.quantization.fake_kernels"],
    plugin_id="fake_kernels",
    schemas={
        "training.fake_kernels": KERNEL_SCHEMA,
        "peft.quantization.fake_kernels": KERNEL_SCHEMA,
    },
)
AccelerationPlugin.register_plugin(
    OtherLoss,
    configuration_and_paths=["training.other_loss"],
    plugin_id="other_loss",
    schemas={"training.other_loss": Stanza(scale=Option(float, default=1.0))},
)
AccelerationPlugin.register_plugin(
    AndPlugin,
    configuration_and_paths=["training.part_a", "training.part_b"],
    plugin_id="and_plugin",
    schemas={"training.part_a": Stanza(), "training.part_b": Stanza()},
)
AccelerationPlugin.register_plugin(
    NeedsMissingPackage,
    configuration_and_paths=["training.needs_missing"],
    plugin_id="needs_missing",
    schemas={"training.needs_missing": Stanza()},
)
AccelerationPlugin.register_plugin(
    RestrictedAugmenter,
    configuration_and_paths=["training.restricted"],
    plugin_id="restricted",
    schemas={"training.restricted": Stanza()},
)

ALL_FAKES = [
    FakeLoader,
    OtherLoader,
    FakeKernels,
    OtherLoss,
    AndPlugin,
    NeedsMissingPackage,
    RestrictedAugmenter,
]


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
        metadata.EntryPoint("fakes", FAKE_MODULE, discovery_module.PLUGIN_GROUP),
        metadata.EntryPoint("broken", "no_such_module_xyz", discovery_module.PLUGIN_GROUP),
    ]
    monkeypatch.setattr(discovery_module, "plugin_entry_points", lambda: entry_points)
    return module


@pytest.fixture
def tiny_llama_dir(tmp_path):
    from fms_acceleration.testing import save_tiny_model

    return save_tiny_model(tmp_path / "tiny-llama", arch="llama", dtype=torch.float32)
