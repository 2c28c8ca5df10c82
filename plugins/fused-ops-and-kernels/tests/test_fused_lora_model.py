"""Fused LoRA rules on tiny peft-wrapped models: patched vs unpatched loss and LoRA gradients,
what each architecture fuses, the fallbacks, and the configuration errors."""

from __future__ import annotations

import os

import pytest
import torch
from foak_quantized_bases import skip_without_quantized_base

from fms_acceleration import AccelerationPluginConfigError, ModelPatcher

ALL_ROLES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DENSE = ("llama", "mistral", "qwen2", "qwen3", "granite")
MOE = ("mixtral", "granitemoe")
# Relative tolerance (to each tensor's largest value) on loss and every LoRA gradient.
REL_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2}
FUSED_NODES = ("_FusedLoRAProjectionsBackward", "_FusedLoRASwiGLUMLPBackward")


def _tiny_lora_model(arch="llama", base="plain", dtype=torch.float32, **lora_kwargs):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from fms_acceleration.testing import tiny_model_config
    from fms_acceleration_foak.lora.quantized_stand_ins import quantize_linears

    skip_without_quantized_base(base)
    torch.manual_seed(0)
    overrides = {"attention_bias": True} if arch == "llama" else {}
    model = AutoModelForCausalLM.from_config(tiny_model_config(arch, **overrides))
    if base == "bitsandbytes":
        model.to(dtype)
        quantize_linears(model, base, compute_dtype=dtype)
    elif base == "auto_gptq":  # accelerated-peft's own GPTQ layer
        from fms_acceleration_peft.gptq_linear import GPTQLinear

        quantize_linears(
            model, base, build=GPTQLinear.from_linear, bits=4, group_size=32, sym=False
        )
        model.to(dtype)
    elif base == "auto_gptq:gptqmodel":
        quantize_linears(model, "auto_gptq", bits=4, group_size=32)
        model.to(dtype)
    else:
        model.to(dtype)
    config = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=ALL_ROLES)
    config = LoraConfig(**{**config, **lora_kwargs})
    if base == "auto_gptq":  # peft wraps a layer it does not know through its custom dispatch
        from peft.tuners.lora.gptq import GPTQLoraLinear

        from fms_acceleration_peft.gptq_linear import GPTQLinear

        config._register_custom_module({GPTQLinear: GPTQLoraLinear})
    model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * (0.2 if "lora_B" in name else 0.1))
    return model


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 128, (3, 7), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def _run(model, batch):
    """Loss, LoRA grads by name, and how many fused autograd nodes the graph holds."""
    model.zero_grad()
    loss = model(**batch).loss
    nodes, seen, stack = {n: 0 for n in FUSED_NODES}, set(), [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ in nodes:
            nodes[type(fn).__name__] += 1
        stack.extend(f for f, _ in fn.next_functions)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, nodes


def _patch(model, base):
    from fms_acceleration_foak.lora import build_fused_lora_rules

    patcher = ModelPatcher()
    for rule in build_fused_lora_rules(model, base.split(":")[0]):
        patcher.register(rule)
    patcher.patch(model)
    return patcher


def _assert_same(ref, got, dtype):
    """Loss and every LoRA grad agree: error norm relative to the reference's norm, per dtype.

    A norm, not the largest element: in bf16 a single element of a LoRA grad moves by ~10% of
    the tensor's max between two equally valid summation orders (e.g. peft with bf16 instead of
    fp32 adapters), while the tensor as a whole stays within about 1-2%.
    """
    (ref_loss, ref_grads, _), (loss, grads, _) = ref, got
    tol = REL_TOL[dtype]
    assert abs(loss.item() - ref_loss.item()) <= tol * abs(ref_loss.item())
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    worst_rel, worst_abs = 0.0, 0.0
    for name, want in ref_grads.items():
        diff = grads[name].float() - want.float()
        norm = want.float().norm().item()
        assert norm > 0, f"{name}: zero reference gradient"
        rel = diff.norm().item() / norm
        assert rel <= tol, f"{name}: relative error {rel:.3g} (max abs {diff.abs().max():.3g})"
        worst_rel, worst_abs = max(worst_rel, rel), max(worst_abs, diff.abs().max().item())
    return worst_rel, worst_abs


@pytest.mark.parametrize("arch", DENSE + MOE)
def test_patched_matches_unpatched_per_arch(arch):
    model = _tiny_lora_model(arch)
    batch = _batch()
    ref = _run(model, batch)
    patcher = _patch(model, "plain")
    got = _run(model, batch)
    worst = _assert_same(ref, got, torch.float32)
    layers = 2
    mlp = 0 if arch in MOE else layers
    assert got[2] == {FUSED_NODES[0]: 2 * layers, FUSED_NODES[1]: mlp}
    expected = {"fused_lora_qkv": 3 * layers, "fused_lora_linear": layers}
    if mlp:
        expected["fused_lora_mlp"] = mlp
    assert patcher.counts() == expected
    patcher.undo()
    assert all("forward" not in m.__dict__ for m in model.modules())
    after = _run(model, batch)
    assert after[2] == {n: 0 for n in FUSED_NODES}
    assert torch.equal(after[0], ref[0])
    print(f"\n{arch} plain fp32: loss diff {abs(got[0] - ref[0]).item():.3g}, grads {worst}")


QUANT_CASES = [
    ("plain", torch.float16),
    ("plain", torch.bfloat16),
    ("bitsandbytes", torch.float32),
    ("bitsandbytes", torch.bfloat16),
    ("auto_gptq", torch.float32),
    ("auto_gptq", torch.float16),
    ("auto_gptq", torch.bfloat16),
    ("auto_gptq:gptqmodel", torch.float32),
    ("auto_gptq:gptqmodel", torch.float16),
]
# Half precision end to end: largest relative grad error vs an fp32 twin that either path may make.
HALF_CAP = {torch.float16: 2e-2, torch.bfloat16: 0.15}


def _fp32_twin(model):
    """The same LoRA model in fp32, each (quantized) base layer replaced by its exact weights."""
    import copy

    from peft.tuners.lora import LoraLayer

    from fms_acceleration_foak.lora.base_layers import frozen_base

    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            linear = torch.nn.Linear(
                base.in_features, base.out_features, bias=base.bias is not None
            )
            linear.weight.data = frozen_base(base).weight(torch.float32).detach().clone()
            if base.bias is not None:
                linear.bias.data = base.bias.detach().float().clone()
            module.base_layer = linear.requires_grad_(False)
    return twin.float()


def _max_rel(run, truth):
    return max((run[1][n] - g).norm().item() / g.norm().item() for n, g in truth[1].items())


@pytest.mark.parametrize(
    ("base", "dtype"), QUANT_CASES, ids=[f"{b}-{str(d)[6:]}" for b, d in QUANT_CASES]
)
def test_patched_matches_unpatched_llama_per_base_and_dtype(base, dtype):
    """fp32: patched equals unpatched. Half types: both are compared with an fp32 twin of the
    same weights, since bf16 alone moves LoRA grads by several percent (peft keeps adapters in
    fp32, the fused path computes in the activations' dtype); fused may be at most 3x as far."""
    model = _tiny_lora_model("llama", base, dtype)
    batch = _batch(1)
    truth = _run(_fp32_twin(model), batch) if dtype != torch.float32 else None
    ref = _run(model, batch)
    patcher = _patch(model, base)
    got = _run(model, batch)
    assert got[2] == {FUSED_NODES[0]: 4, FUSED_NODES[1]: 2}
    patcher.undo()
    if truth is None:
        worst = _assert_same(ref, got, dtype)
        print(f"\nllama {base} {dtype}: loss diff {abs(got[0] - ref[0]).item():.3g}, {worst}")
        return
    fused_err, peft_err = _max_rel(got, truth), _max_rel(ref, truth)
    loss_err = abs(got[0] - truth[0]).item() / truth[0].item()
    print(
        f"\nllama {base} {dtype} vs fp32: fused {fused_err:.3g}, peft {peft_err:.3g}, "
        f"loss {loss_err:.3g}"
    )
    assert loss_err <= REL_TOL[dtype]
    assert fused_err <= min(3 * peft_err, HALF_CAP[dtype])


@pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs CUDA (scripts/gpu/suite.sh)",
)
@pytest.mark.parametrize("base", ["plain", "bitsandbytes"])
def test_patched_matches_unpatched_on_cuda_bf16(base):
    """On the GPU, in bf16, with the compiled SwiGLU kernel inside the fused MLP: as above."""
    model = _tiny_lora_model("llama", base, torch.bfloat16).to("cuda")
    batch = {k: v.to("cuda") for k, v in _batch(1).items()}
    truth = _run(_fp32_twin(model).to("cuda"), batch)
    ref = _run(model, batch)
    patcher = _patch(model, base)
    got = _run(model, batch)
    assert got[2] == {FUSED_NODES[0]: 4, FUSED_NODES[1]: 2}
    patcher.undo()
    fused_err, peft_err = _max_rel(got, truth), _max_rel(ref, truth)
    loss_err = abs(got[0] - truth[0]).item() / truth[0].item()
    print(f"\ncuda llama {base} bf16 vs fp32: fused {fused_err:.3g}, peft {peft_err:.3g}")
    assert loss_err <= REL_TOL[torch.bfloat16]
    assert fused_err <= min(3 * peft_err, HALF_CAP[torch.bfloat16])


def test_training_steps_match_unpatched():
    """Three AdamW steps: the patched model's losses track the unpatched one's step by step."""
    import copy

    model = _tiny_lora_model("llama")
    twin = copy.deepcopy(model)
    _patch(twin, "plain")
    losses = []
    for m in (model, twin):
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        run = []
        for step in range(3):
            loss = m(**_batch(step)).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.append(loss.item())
        losses.append(run)
    assert losses[0][0] != losses[0][2]  # training moved the loss
    for ref, got in zip(*losses):
        assert abs(got - ref) <= 1e-5 * abs(ref), losses


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_matches_unpatched(use_reentrant):
    """Recomputation re-runs q/k/v on the same input: the shared fused call stays correct."""
    model = _tiny_lora_model("llama")
    model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": use_reentrant}
    )
    model.enable_input_require_grads()
    model.train()
    batch = _batch()
    ref = _run(model, batch)
    _patch(model, "plain")
    got = _run(model, batch)
    _assert_same(ref, got, torch.float32)
    # reentrant checkpointing hides the inner graph; the non-reentrant one shows the fused nodes
    expected = (
        {FUSED_NODES[0]: 0, FUSED_NODES[1]: 0}
        if use_reentrant
        else {FUSED_NODES[0]: 4, FUSED_NODES[1]: 2}
    )
    assert got[2] == expected


def test_lora_on_q_and_v_only_fuses_those():
    model = _tiny_lora_model("llama", target_modules=["q_proj", "v_proj"])
    batch = _batch()
    ref = _run(model, batch)
    patcher = _patch(model, "plain")
    assert patcher.counts() == {"fused_lora_qkv": 4}
    got = _run(model, batch)
    _assert_same(ref, got, torch.float32)
    assert got[2][FUSED_NODES[0]] == 2


def test_disabled_adapter_falls_back_at_run_time():
    model = _tiny_lora_model("llama")
    batch = _batch()
    with model.disable_adapter(), torch.no_grad():
        ref = model(**batch).loss
    _patch(model, "plain")
    with model.disable_adapter(), torch.no_grad():
        got = model(**batch).loss
    assert torch.equal(got, ref)
    with torch.no_grad():
        assert abs(model(**batch).loss.item() - ref.item()) > 1e-3  # adapters are live again


@pytest.mark.parametrize(
    ("lora_kwargs", "reason"),
    [
        ({"lora_dropout": 0.1}, "lora_dropout=0.1"),
        ({"lora_bias": True}, "lora_bias=True"),
        ({"use_dora": True}, "LoRA variant"),
    ],
)
def test_unsupported_lora_settings_are_not_fused(lora_kwargs, reason):
    from fms_acceleration_foak.lora import build_fused_lora_rules, plan_fused_lora

    model = _tiny_lora_model("llama", **lora_kwargs)
    plan = plan_fused_lora(model, "plain")
    assert plan.fused == {}
    assert len(plan.skipped) == 14 and all(reason in r for r in plan.skipped.values())
    assert build_fused_lora_rules(model, "plain") == []


def test_multiple_active_adapters_are_not_fused():
    from peft import LoraConfig

    from fms_acceleration_foak.lora import plan_fused_lora

    model = _tiny_lora_model("llama")
    model.add_adapter("other", LoraConfig(r=4, lora_dropout=0.0, target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "other"])
    plan = plan_fused_lora(model, "plain")
    assert plan.skipped["base_model.model.model.layers.0.self_attn.q_proj"].startswith(
        "2 active adapters"
    )
    # k and v still share a fused call; o and the MLP are untouched by the second adapter
    assert len(plan.fused["fused_lora_qkv"]) == 4
    assert len(plan.fused["fused_lora_mlp"]) == 2


def test_moe_experts_reported_unfused():
    from fms_acceleration_foak.lora import plan_fused_lora

    plan = plan_fused_lora(_tiny_lora_model("mixtral"), "plain")
    assert "fused_lora_mlp" not in plan.fused
    assert "MoE experts" in plan.skipped["<mixtral MoE experts>"]
    assert "fused_lora_qkv: 6 modules" in plan.summary()


def test_base_layer_mismatch_is_a_config_error():
    from fms_acceleration_foak.lora import build_fused_lora_rules

    model = _tiny_lora_model("llama")
    with pytest.raises(AccelerationPluginConfigError, match=r"base_layer is 'bitsandbytes' but 14"):
        build_fused_lora_rules(model, "bitsandbytes")
    with pytest.raises(AccelerationPluginConfigError, match=r"'gptq' is not one of"):
        build_fused_lora_rules(model, "gptq")


def test_model_without_lora_or_unsupported_arch_is_a_config_error():
    from transformers import AutoModelForCausalLM

    from fms_acceleration.testing import tiny_model_config
    from fms_acceleration_foak.lora import build_fused_lora_rules

    plain = AutoModelForCausalLM.from_config(tiny_model_config("llama"))
    with pytest.raises(
        AccelerationPluginConfigError, match="no LoRA layer on its attention or MLP"
    ):
        build_fused_lora_rules(plain, "plain")
    bigcode = AutoModelForCausalLM.from_config(tiny_model_config("gpt_bigcode"))
    with pytest.raises(AccelerationPluginConfigError, match="got 'gpt_bigcode'") as err:
        build_fused_lora_rules(bigcode, "plain")
    # every architecture of the plugin's one table that names its attention class
    assert f"fused_lora supports model types {sorted(DENSE + MOE)};" in str(err.value)


def test_framework_with_bnb_loader_fuses_and_matches_unpatched(tmp_path):
    """End to end: accelerated-peft's bitsandbytes loader + this plugin's fused_lora."""
    peft_plugins = pytest.importorskip("fms_acceleration_peft")
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig
    from transformers import TrainingArguments

    from fms_acceleration.testing import build_framework, save_tiny_model
    from fms_acceleration_foak import FastKernelsAccelerationPlugin

    save_tiny_model(tmp_path, "llama")
    foak = {"base_layer": "bitsandbytes", "fused_lora": True, "fast_loss": False}
    foak |= {"fast_rms_layernorm": False, "fast_rope_embeddings": False}
    stanzas = {"bitsandbytes": {"quant_type": "nf4"}, "fused_ops_and_kernels": foak}
    framework = build_framework(
        {"plugins": {"peft": {"quantization": stanzas}}},
        [peft_plugins.BNBAccelerationPlugin, FastKernelsAccelerationPlugin],
    )
    model = framework.model_loader(str(tmp_path), dtype=torch.bfloat16)
    args = TrainingArguments(output_dir=str(tmp_path), bf16=True, use_cpu=True)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=ALL_ROLES)
    model, _ = framework.augmentation(model, args, modifiable_args=(lora,))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    batch = _batch(2)
    got = _run(model, batch)
    assert got[2] == {FUSED_NODES[0]: 4, FUSED_NODES[1]: 2}
    framework.plugins["fused_ops_and_kernels"].model_patcher.undo()
    ref = _run(model, batch)
    assert ref[2] == {n: 0 for n in FUSED_NODES}
    # bf16 activations with fp32 adapters on both paths, differing only in the LoRA dtype
    assert abs(got[0].item() - ref[0].item()) <= REL_TOL[torch.bfloat16] * ref[0].item()
    assert _max_rel(got, ref) <= HALF_CAP[torch.bfloat16]


def test_framework_with_gptq_loader_fuses_and_matches_unpatched(tmp_path):
    """End to end: accelerated-peft's own GPTQ quantizer and loader + this plugin's fused_lora."""
    peft_plugins = pytest.importorskip("fms_acceleration_peft")
    from peft import LoraConfig
    from transformers import TrainingArguments

    from fms_acceleration.testing import build_framework, save_tiny_model
    from fms_acceleration_foak import FastKernelsAccelerationPlugin
    from fms_acceleration_peft.gptq_linear import GPTQLinear
    from fms_acceleration_peft.quantize import quantize_checkpoint

    save_tiny_model(tmp_path / "float", "llama")
    gptq_dir = quantize_checkpoint(tmp_path / "float", tmp_path / "gptq", bits=4, group_size=32)
    foak = {"base_layer": "auto_gptq", "fused_lora": True, "fast_loss": False}
    foak |= {"fast_rms_layernorm": False, "fast_rope_embeddings": False}
    stanzas = {"auto_gptq": {"kernel": "torch"}, "fused_ops_and_kernels": foak}
    framework = build_framework(
        {"plugins": {"peft": {"quantization": stanzas}}},
        [peft_plugins.AutoGPTQAccelerationPlugin, FastKernelsAccelerationPlugin],
    )
    model = framework.model_loader(str(gptq_dir), dtype=torch.float16)
    assert sum(isinstance(m, GPTQLinear) for m in model.modules()) == 14
    args = TrainingArguments(output_dir=str(tmp_path / "out"), fp16=True, use_cpu=True)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=ALL_ROLES)
    model, _ = framework.augmentation(model, args, modifiable_args=(lora,))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    batch = _batch(3)
    got = _run(model, batch)
    assert got[2] == {FUSED_NODES[0]: 4, FUSED_NODES[1]: 2}
    framework.plugins["fused_ops_and_kernels"].model_patcher.undo()
    ref = _run(model, batch)
    assert ref[2] == {n: 0 for n in FUSED_NODES}
    assert abs(got[0].item() - ref[0].item()) <= REL_TOL[torch.float16] * ref[0].item()
    assert _max_rel(got, ref) <= HALF_CAP[torch.float16]
