"""LoRA on experts and routers: peft's target_modules with the names users know (w1 / w2 / w3,
gate_proj / up_proj / down_proj, the router `gate`) or target_parameters train in the grouped
kernels, and the saved adapter is the one the unpatched model's peft path writes and loads.

transformers 4.55 (peft 0.19): peft wraps each expert's nn.Linear; the grouped GEMMs read the
per-expert adapters. transformers 5 (peft 0.21): peft turns the 4.x names into ParamWrappers
on the fused 3-D parameters; the grouped GEMMs read those instead of peft merging a full
(E, out, in) weight per call.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from fms_acceleration import AccelerationPluginConfigError, compat
from fms_acceleration.testing import build_framework
from fms_acceleration_moe import ScatterMoEAccelerationPlugin

peft = pytest.importorskip("peft")

STANZA = {"plugins": {"training": {"moe": {"scattermoe": {"ep_degree": 1}}}}}
TARGETS = {
    "mixtral": ["q_proj", "gate", "w1", "w2", "w3"],
    "qwen3_moe": ["v_proj", "gate", "gate_proj", "up_proj", "down_proj"],
}


def lora_config(arch: str, **extra) -> peft.LoraConfig:
    base = dict(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM")
    if "target_parameters" not in extra:
        base["target_modules"] = list(TARGETS[arch])
    return peft.LoraConfig(**{**base, **extra})


def randomize_adapters(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def patched_peft_model(model, config):
    framework = build_framework(STANZA, [ScatterMoEAccelerationPlugin])
    model, (config,) = framework.augmentation(model, None, (config,))
    model = peft.get_peft_model(model, config)
    framework.get_callbacks_and_ready_for_train(model)
    return model, framework


def _lora_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_lora_on_experts_and_router_matches_peft_on_the_unpatched_model(
    arch, make_moe, seed, tmp_path, monkeypatch
):
    base = make_moe(arch, seed=seed)
    plain = peft.get_peft_model(copy.deepcopy(base), lora_config(arch))
    randomize_adapters(plain, seed)
    adapter = peft.get_peft_model_state_dict(plain)
    ours, framework = patched_peft_model(copy.deepcopy(base), lora_config(arch))
    loaded = peft.set_peft_model_state_dict(ours, adapter)
    assert not loaded.unexpected_keys
    assert not [k for k in loaded.missing_keys if "lora_" in k]
    counts = framework.model_patcher.counts()
    if compat.fused_moe_experts():
        # the ParamWrappers run grouped LoRA GEMMs: peft never merges a weight per call
        assert counts[next(k for k in counts if k.startswith("scattermoe.lora."))] == 2
        merged = []
        original = peft.tuners.lora.layer.ParamWrapper._activate_lora
        monkeypatch.setattr(
            peft.tuners.lora.layer.ParamWrapper,
            "_activate_lora",
            lambda self, adapters: merged.append(self) or original(self, adapters),
        )

    ids = torch.randint(4, 96, (2, 11))
    got, want = ours(input_ids=ids, labels=ids), plain(input_ids=ids, labels=ids)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    got.loss.backward()
    want.loss.backward()
    grads, expected = _lora_grads(ours), _lora_grads(plain)
    expert_grads = [n for n in expected if "expert" in n]
    assert expert_grads and sorted(grads) == sorted(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)
    if compat.fused_moe_experts():
        ours_ids = {id(m) for m in ours.modules()}
        by_model = {
            model: sorted(m.parameter_name for m in merged if (id(m) in ours_ids) == mine)
            for model, mine in (("ours", True), ("plain", False))
        }
        # peft merges every adapter into its weight on each call; here only the routers' are
        assert by_model == {
            "ours": ["weight", "weight"],
            "plain": ["down_proj", "down_proj", "gate_up_proj", "gate_up_proj", "weight", "weight"],
        }


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_trained_adapter_loads_onto_the_unpatched_model(arch, make_moe, seed, tmp_path):
    base = make_moe(arch, seed=seed)
    ours, framework = patched_peft_model(copy.deepcopy(base), lora_config(arch))
    randomize_adapters(ours, seed)
    optimizer = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    for step in range(2):
        ids = torch.randint(4, 96, (2, 9), generator=torch.Generator().manual_seed(step))
        ours(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    ours.save_pretrained(tmp_path / "ours")
    # the same files as peft writes for the unpatched model: key for key, shape for shape
    reference = peft.get_peft_model(copy.deepcopy(base), lora_config(arch))
    reference.save_pretrained(tmp_path / "plain")
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    expected = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in expected.items()}

    ids = torch.randint(4, 96, (3, 7))
    want = ours(input_ids=ids).logits
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    # after undo the patched model is that plain peft model, trained values included
    framework.undo_patches()
    torch.testing.assert_close(ours(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not compat.fused_moe_experts(), reason="target_parameters: transformers 5")
def test_target_parameters_on_granite_experts(make_moe, seed):
    config = dict(target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    base = make_moe("granitemoe", seed=seed)
    plain = peft.get_peft_model(copy.deepcopy(base), lora_config("mixtral", **config))
    randomize_adapters(plain, seed)
    ours, _ = patched_peft_model(copy.deepcopy(base), lora_config("mixtral", **config))
    peft.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(plain))
    ids = torch.randint(4, 96, (2, 10))
    torch.testing.assert_close(ours(ids).logits, plain(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(compat.fused_moe_experts(), reason="ParallelExperts: transformers 4.55")
def test_lora_on_granite_parallel_experts_is_refused(make_moe):
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "input_linear"])
    framework = build_framework(STANZA, [ScatterMoEAccelerationPlugin])
    with pytest.raises(AccelerationPluginConfigError) as caught:
        framework.augmentation(make_moe("granitemoe"), None, (config,))
    message = str(caught.value)
    for fragment in ("plugins.training.moe.scattermoe", "input_linear", "ParallelExperts"):
        assert fragment in message, message
