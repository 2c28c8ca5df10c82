"""Fused LoRA functions against peft's own LoRA layers over plain, bnb-4bit and GPTQ bases.

Shapes are odd on purpose (hidden 96, kv 32, intermediate 160, batch 3, seq 7, rank 8); lora_B
is randomised (peft initialises it to zero, which would hide every LoRA term). Errors are
measured relative to the largest reference value, with per-dtype tolerances.

bitsandbytes bases use widths bnb dequantizes right on every CPU: multiples of its 64-blocks as
in real models (hidden 192, kv 64, intermediate 320), and one odd set (72, 24, 200) whose blocks
straddle rows but whose input widths are not multiples of 16. On CPUs with AVX512F, bnb 0.50.2
misreads widths such as 96 or 160 (a multiple of 16, not of 64), and both paths compared here
would then share the same corrupted base.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from foak_quantized_bases import skip_without_quantized_base

HIDDEN, KV, INTER, RANK = 96, 32, 160, 8
# (hidden, kv, intermediate) per case; bitsandbytes gets widths it dequantizes right (see above).
ODD = (HIDDEN, KV, INTER)
BNB_REALISTIC = (192, 64, 320)
BNB_ODD = (72, 24, 200)
ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Relative tolerance per compute dtype: fp32 only sees summation-order differences; half types
# see that peft computes LoRA in the fp32 adapter dtype while the fused path stays in x's dtype.
REL_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
# (base, dtype, dims): bnb 4-bit on CPU computes in fp32/bf16; GPTQ's torch kernels in fp32/fp16.
# "auto_gptq" is accelerated-peft's own GPTQLinear; "auto_gptq:gptqmodel" gptqmodel's TorchLinear.
CASES = [
    ("plain", torch.float32, ODD),
    ("plain", torch.float16, ODD),
    ("plain", torch.bfloat16, ODD),
    ("bitsandbytes", torch.float32, BNB_REALISTIC),
    ("bitsandbytes", torch.bfloat16, BNB_REALISTIC),
    ("bitsandbytes", torch.float32, BNB_ODD),
    ("auto_gptq", torch.float32, ODD),
    ("auto_gptq", torch.float16, ODD),
    ("auto_gptq", torch.bfloat16, ODD),
    ("auto_gptq:gptqmodel", torch.float32, ODD),
    ("auto_gptq:gptqmodel", torch.float16, ODD),
]


class Block(torch.nn.Module):
    """The seven projections of a decoder layer, with Llama-like shapes (GQA: k/v narrower)."""

    def __init__(self, bias: bool, dims: tuple[int, int, int] = ODD):
        super().__init__()
        hidden, kv, inter = dims
        self.q_proj = torch.nn.Linear(hidden, hidden, bias=bias)
        self.k_proj = torch.nn.Linear(hidden, kv, bias=bias)
        self.v_proj = torch.nn.Linear(hidden, kv, bias=bias)
        self.o_proj = torch.nn.Linear(hidden, hidden, bias=False)
        self.gate_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.up_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.down_proj = torch.nn.Linear(inter, hidden, bias=False)
        # GPTQ layers hold only buffers; peft needs one parameter to find the model's device.
        self.norm = torch.nn.LayerNorm(hidden)


def _lora_block(base: str, dtype: torch.dtype, bias: bool = True, dims=ODD):
    from peft import LoraConfig, get_peft_model

    from fms_acceleration_foak.lora.quantized_stand_ins import quantize_linears

    skip_without_quantized_base(base)
    block = Block(bias=bias, dims=dims)
    if base == "plain":
        block.to(dtype)
    elif base == "bitsandbytes":
        quantize_linears(block, base, quant_type="nf4", double_quant=True, compute_dtype=dtype)
    elif base == "auto_gptq":
        from fms_acceleration_peft.gptq_linear import GPTQLinear

        quantize_linears(
            block, base, build=GPTQLinear.from_linear, bits=4, group_size=32, sym=False
        )
    else:
        quantize_linears(block, "auto_gptq", bits=4, group_size=32)
    config = LoraConfig(r=RANK, lora_alpha=16, lora_dropout=0.0, target_modules=list(ROLES))
    if base == "auto_gptq":  # peft wraps a layer it does not know through its custom dispatch
        _register_gptq_lora_layer(config)
    model = get_peft_model(block, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * (0.3 if "lora_B" in name else 0.1))
    return model.base_model.model


def _register_gptq_lora_layer(config) -> None:
    from peft.tuners.lora.gptq import GPTQLoraLinear

    from fms_acceleration_peft.gptq_linear import GPTQLinear

    config._register_custom_module({GPTQLinear: GPTQLoraLinear})


def _sources(block, roles):
    from fms_acceleration_foak.lora.peft_layers import LoRAProjectionSource

    return [LoRAProjectionSource(getattr(block, r), "default")() for r in roles]


def _lora_params(block, roles):
    return [
        p
        for r in roles
        for p in (
            getattr(block, r).lora_A["default"].weight,
            getattr(block, r).lora_B["default"].weight,
        )
    ]


def _compare(fused_fn, reference_fn, block, roles, x, dtype, record):
    """Run both paths on the same input and upstream grads; assert outputs and grads agree."""
    params = _lora_params(block, roles)
    results = []
    for fn in (reference_fn, fused_fn):
        xi = x.detach().clone().requires_grad_(True)
        outs = fn(xi)
        torch.manual_seed(1)
        upstream = [torch.randn_like(o) for o in outs]
        grads = torch.autograd.grad(outs, [xi, *params], upstream)
        results.append((outs, grads))
    (ref_out, ref_grads), (fus_out, fus_grads) = results
    names = [f"out:{i}" for i in range(len(ref_out))] + ["grad:x"]
    names += [f"grad:{r}.{ab}" for r in roles for ab in ("A", "B")]
    for name, got, want in zip(names, (*fus_out, *fus_grads), (*ref_out, *ref_grads)):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        err = (got.float() - want.float()).abs().max().item()
        scale = want.float().abs().max().item()
        record(name, err, scale)
        assert scale > 0, f"{name}: reference is all zeros"
        assert err <= REL_TOL[dtype] * scale, f"{name}: max abs diff {err:.3g} vs scale {scale:.3g}"


@pytest.fixture
def record(request):
    worst: dict[str, float] = {}

    def _record(name, err, scale):
        worst["abs"] = max(worst.get("abs", 0.0), err)
        worst["rel"] = max(worst.get("rel", 0.0), err / scale)

    yield _record
    if worst:
        print(f"\n{request.node.name}: max abs diff {worst['abs']:.3g}, max rel {worst['rel']:.3g}")


@pytest.mark.parametrize(
    ("base", "dtype", "dims"), CASES, ids=[f"{b}-{str(d)[6:]}-{w[0]}" for b, d, w in CASES]
)
def test_fused_qkv_o_mlp_match_peft(base, dtype, dims, seed, record):
    from fms_acceleration_foak.kernels.fused_lora import (
        fused_lora_linear,
        fused_lora_projections,
        fused_lora_swiglu_mlp,
    )

    block = _lora_block(base, dtype, dims=dims)
    x = torch.randn(3, 7, dims[0], dtype=dtype)
    qkv = ("q_proj", "k_proj", "v_proj")
    _compare(
        lambda xi: fused_lora_projections(xi, _sources(block, qkv)),
        lambda xi: tuple(getattr(block, r)(xi) for r in qkv),
        block, qkv, x, dtype, record,
    )  # fmt: skip
    _compare(
        lambda xi: (fused_lora_linear(xi, _sources(block, ("o_proj",))[0]),),
        lambda xi: (block.o_proj(xi),),
        block, ("o_proj",), x, dtype, record,
    )  # fmt: skip
    mlp = ("gate_proj", "up_proj", "down_proj")
    _compare(
        lambda xi: (fused_lora_swiglu_mlp(xi, *_sources(block, mlp)),),
        lambda xi: (block.down_proj(F.silu(block.gate_proj(xi)) * block.up_proj(xi)),),
        block, mlp, x, dtype, record,
    )  # fmt: skip


def test_base_weight_is_not_saved_for_backward(seed):
    """Only x, the rank-r activations and the adapters are saved: never a dequantized weight."""
    from fms_acceleration_foak.kernels.fused_lora import fused_lora_projections

    hidden, kv, _ = BNB_REALISTIC
    block = _lora_block("bitsandbytes", torch.float32, dims=BNB_REALISTIC)
    x = torch.randn(3, 7, hidden, requires_grad=True)
    saved_shapes = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved_shapes.append(tuple(t.shape)) or t, lambda t: t
    ):
        fused_lora_projections(x, _sources(block, ("q_proj", "k_proj", "v_proj")))
    weight_shapes = {(hidden, hidden), (kv, hidden)}
    assert not weight_shapes & set(saved_shapes), saved_shapes
    assert (21, hidden) in saved_shapes and saved_shapes.count((21, RANK)) == 3


def test_frozen_base_rejects_unsupported_layers():
    from fms_acceleration_foak.lora.base_layers import base_layer_kind, frozen_base

    trainable_bias = torch.nn.Linear(8, 8)
    with pytest.raises(ValueError, match="bias is trainable"):
        frozen_base(trainable_bias)
    conv = torch.nn.Conv1d(4, 4, 1)
    assert base_layer_kind(conv) == "torch.nn.modules.conv.Conv1d"
    with pytest.raises(ValueError, match="not a plain, bitsandbytes-4bit or GPTQ"):
        frozen_base(conv)
    int8 = torch.nn.Linear(8, 8, bias=False).requires_grad_(False)
    int8.weight.data = torch.ones(8, 8, dtype=torch.int8)  # an nn.Linear, but not float weights
    assert base_layer_kind(int8) == "torch.nn.modules.linear.Linear"
    with pytest.raises(ValueError, match="Linear is not a plain, bitsandbytes-4bit or GPTQ"):
        frozen_base(int8)


class RowScaledInt8Linear(torch.nn.Module):
    """A quantized linear layer of no known library: int8 codes times one scale per row."""

    def __init__(self, weight: torch.Tensor, rotated: bool = False):
        super().__init__()
        scale = weight.abs().amax(dim=1, keepdim=True) / 127
        self.register_buffer("codes", torch.round(weight / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", torch.randn(weight.shape[0]))
        self.out_features, self.in_features = weight.shape
        self.rotated = rotated

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * self.scale


@pytest.fixture
def quantized_layer_registry(monkeypatch):
    """The core's registry of quantized layer kinds, empty for one test."""
    from fms_acceleration import quantized_linear

    monkeypatch.setattr(quantized_linear, "_KINDS", {})
    return quantized_linear


def test_frozen_base_reads_a_registered_kind_through_its_dequantizer(
    quantized_layer_registry, seed
):
    from fms_acceleration_foak.lora.base_layers import (
        base_layer_kind,
        frozen_base,
        unsupported_reason,
    )

    ql = quantized_layer_registry
    weight = torch.randn(37, 53)
    layer, rotated = RowScaledInt8Linear(weight), RowScaledInt8Linear(weight, rotated=True)
    class_path = f"{__name__}.RowScaledInt8Linear"
    assert base_layer_kind(layer) == class_path
    with pytest.raises(ValueError, match="RowScaledInt8Linear is not a plain, bitsandbytes-4bit"):
        frozen_base(layer)
    calls = []
    kind = ql.QuantizedLayerKind(
        "row_int8",
        matches=lambda m: class_path in ql.class_paths(m),
        dequantizer=lambda m: calls.append(m) or m.dequantize,
        unsupported_reason=lambda m: "the layer is rotated" if m.rotated else None,
    )
    ql.register_quantized_layer(kind)
    assert ql.quantized_layer_kinds() == (kind,) and ql.quantized_layer_kind(layer) is kind
    assert base_layer_kind(layer) == "row_int8"
    assert unsupported_reason(rotated) == "the layer is rotated"
    with pytest.raises(ValueError, match="over RowScaledInt8Linear: the layer is rotated"):
        frozen_base(rotated)
    base = frozen_base(layer)
    assert calls == [layer] and base.out_features == 37
    assert torch.equal(base.weight(torch.float32), layer.codes.float() * layer.scale)
    assert base.bias is layer.bias
    # int8 per-row quantization: every weight within half a step of its row's scale
    assert ((base.weight(torch.float32) - weight).abs() <= layer.scale / 2 + 1e-6).all()
    before = base.weight(torch.float32).clone()
    layer.codes.mul_(-1)  # read at call time: a replaced weight is seen
    assert torch.equal(base.weight(torch.float32), -before) and calls == [layer]


def test_a_quantization_library_layer_nobody_registered_says_what_to_install(
    quantized_layer_registry,
):
    from fms_acceleration_foak.lora.base_layers import frozen_base, missing_provider_reason

    ql = quantized_layer_registry
    # a class where bitsandbytes keeps its Linear4bit (bitsandbytes itself need not be installed)
    cls = type("Linear4bit", (torch.nn.Linear,), {"__module__": "bitsandbytes.nn.modules"})
    layer = cls(8, 8, bias=False).requires_grad_(False)
    layer.weight.data = torch.zeros(32, 1, dtype=torch.uint8)
    with pytest.raises(ValueError, match="install fms-acceleration-peft") as err:
        frozen_base(layer)
    assert "Linear4bit is a bitsandbytes layer" in str(err.value)
    # once a bitsandbytes kind is registered, a layer it does not match is simply unsupported
    ql.register_quantized_layer(
        ql.QuantizedLayerKind("bitsandbytes", lambda m: False, lambda m: m.dequantize)
    )
    assert missing_provider_reason(layer) is None
    with pytest.raises(ValueError, match="Linear4bit is not a plain, bitsandbytes-4bit or GPTQ"):
        frozen_base(layer)


@pytest.mark.parametrize("double_quant", [True, False])
def test_bnb_weight_repacked_for_cpu_is_restored(double_quant, seed):
    """bitsandbytes on AVX512-BF16 CPUs repacks a weight on its first no-grad eval forward; the
    fused path restores the standard layout (and turns the repacking off) before dequantizing."""
    bnbF = pytest.importorskip("bitsandbytes.functional")
    pytest.importorskip("fms_acceleration_peft")  # owns the repack undo that the fused path calls
    from fms_acceleration_foak.lora.base_layers import frozen_base
    from fms_acceleration_foak.lora.quantized_stand_ins import bnb_4bit_from_linear

    layer = bnb_4bit_from_linear(
        torch.nn.Linear(128, 96, bias=False),
        compute_dtype=torch.bfloat16,
        double_quant=double_quant,
    )
    base = frozen_base(layer)
    assert layer.support_avx512bf16_for_cpu is False
    before = base.weight(torch.float32).clone()
    weight = layer.weight
    weight.data, weight.quant_state = bnbF._convert_weight_packed_for_cpu(
        weight.data, weight.quant_state
    )
    after = base.weight(torch.float32)
    assert weight.quant_state.packing_format_for_cpu is False
    # the packed layout keeps absmax in bf16: at most that rounding (2^-8 relative) is lost
    assert (after - before).abs().max().item() <= before.abs().max().item() * 2**-8


def test_autocast_computes_in_the_autocast_dtype(seed, record):
    """Under autocast (how the Trainer runs fp16/bf16 mixed precision) over an fp32 model the
    fused path computes in the autocast dtype, as peft's layers do there."""
    from fms_acceleration_foak.kernels.fused_lora import fused_lora_projections

    block = _lora_block("plain", torch.float32)
    qkv = ("q_proj", "k_proj", "v_proj")

    def autocast(fn):
        def run(xi):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outs = fn(xi)
            assert all(o.dtype == torch.bfloat16 for o in outs)
            return outs

        return run

    _compare(
        autocast(lambda xi: fused_lora_projections(xi, _sources(block, qkv))),
        autocast(lambda xi: tuple(getattr(block, r)(xi) for r in qkv)),
        block, qkv, torch.randn(3, 7, HIDDEN), torch.bfloat16, record,
    )  # fmt: skip
