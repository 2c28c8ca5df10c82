"""The stanza, its sample, fms-hf-tuning's --fast_moe YAMLs, and every refused input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from fms_acceleration import AccelerationFramework, AccelerationPluginConfigError
from fms_acceleration.testing import build_framework
from fms_acceleration_moe import ScatterMoEAccelerationPlugin

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def framework(body: dict, *classes) -> AccelerationFramework:
    return build_framework({"plugins": body}, [ScatterMoEAccelerationPlugin, *classes])


def stanza(**options) -> dict:
    return {"training": {"moe": {"scattermoe": options}}}


def test_sample_stanza_builds_the_plugin_with_its_defaults():
    config = yaml.safe_load((CONFIGS / "scattermoe.yaml").read_text())
    fw = build_framework(config, [ScatterMoEAccelerationPlugin])
    ((name, plugin),) = fw.active_plugins
    assert name == "ScatterMoEAccelerationPlugin"
    assert (plugin._ep_degree, plugin._disable_distributed) == (1, False)
    assert plugin.taken_slots() == frozenset({"moe_experts"})


# fms-hf-tuning 3.2.2 writes these (AccelerationFrameworkConfig.to_yaml of its dataclasses):
# --fast_moe 1; --fast_moe True (ep_degree becomes 1 and disable_distributed true); and
# --fast_moe 2 --padding_free huggingface --fast_kernels True True True
CLIENT_YAMLS = {
    "ep1": """
plugins:
  training:
    moe:
      scattermoe:
        disable_distributed: false
        ep_degree: 1
""",
    "bool": """
plugins:
  training:
    moe:
      scattermoe:
        disable_distributed: true
        ep_degree: 1
""",
    "ep2-padding-free-fast-kernels": """
plugins:
  training:
    attention:
      padding_free:
        method: huggingface
    fused_ops_and_kernels:
      fast_loss: true
      fast_rms_layernorm: true
      fast_rope_embeddings: true
    moe:
      scattermoe:
        disable_distributed: false
        ep_degree: 2
""",
}


@pytest.mark.parametrize("name", CLIENT_YAMLS)
def test_fms_hf_tuning_fast_moe_yamls_build_a_framework(name, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    path = tmp_path / "accel.yaml"
    path.write_text(CLIENT_YAMLS[name])
    fw = AccelerationFramework(str(path))  # the installed plugins, found by entry point
    plugins = {cls_name: plugin for cls_name, plugin in fw.active_plugins}
    moe = plugins["ScatterMoEAccelerationPlugin"]
    expected = {"ep1": (1, False), "bool": (1, True), "ep2-padding-free-fast-kernels": (2, False)}
    assert (moe._ep_degree, moe._disable_distributed) == expected[name]
    if name.startswith("ep2"):
        assert len(plugins) == 3  # padding-free, fast kernels and MoE side by side
    assert fw.requires_augmentation


def _tiny_llama():
    from transformers import AutoModelForCausalLM

    from fms_acceleration.testing import tiny_model_config

    return AutoModelForCausalLM.from_config(tiny_model_config("llama"))


class _FakeMoe(torch.nn.Module):
    """A model whose type no table entry names, with experts in its config."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"model_type": "deepseek_v3", "n_routed_experts": 8})()
        self.config.num_experts = 8


# (stanza options, environment world size, model, error fragments)
BAD_INPUT = [
    pytest.param(
        dict(ep_degree=2, disable_distributed=True),
        "2",
        None,
        ["plugins.training.moe.scattermoe.disable_distributed", "true", "ep_degree: 2"],
        id="disable_distributed-with-ep",
    ),
    pytest.param(
        dict(ep_degree=3),
        "4",
        None,
        # the parenthesis: the reference's wording, which fms-hf-tuning's tests match
        [
            "plugins.training.moe.scattermoe.ep_degree",
            "3",
            "world size 4",
            "(world size (4) not divisible by ep_size (3))",
        ],
        id="ep-not-dividing-world",
    ),
    pytest.param(
        dict(ep_degree=0),
        "1",
        None,
        ["plugins.training.moe.scattermoe.ep_degree", "0", "1"],
        id="ep-zero",
    ),
    pytest.param(
        dict(ep_degree="2"),
        "2",
        None,
        ["plugins.training.moe.scattermoe.ep_degree", "'2'", "integer"],
        id="ep-string",
    ),
    pytest.param(
        dict(ep_degre=2),
        "2",
        None,
        ["plugins.training.moe.scattermoe.ep_degre", "ep_degree"],
        id="typo",
    ),
    pytest.param(
        dict(ep_degree=3),
        "3",
        "mixtral",
        ["plugins.training.moe.scattermoe.ep_degree", "3", "4 experts"],
        id="ep-not-dividing-experts",
    ),
    pytest.param(
        dict(ep_degree=2),
        "2",
        "mixtral",
        ["plugins.training.moe.scattermoe.ep_degree", "2", "torch.distributed", "torchrun"],
        id="expert-parallel-without-processes",
    ),
    pytest.param(
        dict(),
        "1",
        "llama",
        ["plugins.training.moe.scattermoe", "LlamaForCausalLM", "'llama'", "no sparse"],
        id="not-a-moe",
    ),
    pytest.param(
        dict(),
        "1",
        "unknown",
        ["plugins.training.moe.scattermoe", "_FakeMoe", "'deepseek_v3'", "no table entry"],
        id="unknown-moe-architecture",
    ),
]


@pytest.mark.parametrize("options,world,model,fragments", BAD_INPUT)
def test_bad_input_is_refused_with_key_value_and_reason(
    options, world, model, fragments, monkeypatch, make_moe
):
    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(AccelerationPluginConfigError) as caught:
        fw = framework(stanza(**options))
        built = {"mixtral": lambda: make_moe("mixtral"), "llama": _tiny_llama}
        instance = built.get(model, _FakeMoe)()
        fw.augmentation(instance, None, (None,))
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message
    # the reference asserted these; fms-hf-tuning's tests expect an AssertionError
    if "ep_degree: 3" in message:
        assert isinstance(caught.value, AssertionError)
