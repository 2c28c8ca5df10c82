"""Quantized stand-ins for nn.Linear layers (bitsandbytes 4-bit, GPTQ TorchLinear) built from a
float weight, without a calibration run: for tests and benchmarks of fused LoRA. bitsandbytes
layers are quantized on the device of the weight (CPU or CUDA); GPTQ ones on CPU. Layers of
other packages (e.g. accelerated-peft's GPTQLinear.from_linear) come in through `build`."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

LINEAR_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def bnb_4bit_from_linear(
    linear: torch.nn.Linear,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """A bitsandbytes Linear4bit holding `linear`'s weight quantized (nf4/fp4, double quant)."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=double_quant,
        quant_type=quant_type,
        device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        linear.weight.detach().to(compute_dtype).clone(),
        requires_grad=False,
        compress_statistics=double_quant,
        quant_type=quant_type,
        module=layer,
    ).to(linear.weight.device)  # moving an unquantized Params4bit to a device quantizes it
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer


def gptq_from_linear(
    linear: torch.nn.Linear, bits: int = 4, group_size: int = 32, sym: bool = False
) -> torch.nn.Module:
    """A gptqmodel TorchLinear packed from `linear` by per-group min/max rounding (no GPTQ run).

    in_features and out_features must be multiples of 32 (gptqmodel's packing words).
    """
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    weight = linear.weight.detach().float()
    out_features, in_features = weight.shape
    groups = weight.view(out_features, in_features // group_size, group_size)
    maxq = 2**bits - 1
    if sym:
        scale = groups.abs().amax(-1) * 2 / maxq
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        wmin, wmax = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
        scale = (wmax - wmin) / maxq
        zero = torch.round(-wmin / scale.clamp(min=1e-8)).clamp(0, maxq)
    scale = scale.clamp(min=1e-8)
    layer = TorchLinear(
        bits=bits,
        group_size=group_size,
        sym=sym,
        desc_act=False,
        in_features=in_features,
        out_features=out_features,
        bias=linear.bias is not None,
        pack_dtype=torch.int32,
    )
    g_idx = torch.arange(in_features, dtype=torch.int32) // group_size
    layer.pack(linear, scales=scale, zeros=zero.to(torch.int32), g_idx=g_idx)
    # Skip gptqmodel's torch.compile of dequantize_weight: minutes of inductor work on CPU.
    layer.optimized = True
    layer.post_init()
    return layer


def quantize_linears(
    model: torch.nn.Module,
    kind: str,
    roles: Iterable[str] = LINEAR_ROLES,
    build: Callable[..., torch.nn.Module] | None = None,
    **kwargs,
) -> int:
    """Replace every nn.Linear child named in `roles` by a 'bitsandbytes' or 'auto_gptq' stand-in
    (gptqmodel's TorchLinear), or by `build(linear, **kwargs)` when given.

    Returns how many layers were replaced.
    """
    if build is None:
        build = {"bitsandbytes": bnb_4bit_from_linear, "auto_gptq": gptq_from_linear}.get(kind)
    if build is None:
        raise ValueError(f"kind must be 'bitsandbytes' or 'auto_gptq', got {kind!r}")
    roles = set(roles)
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if name in roles and type(child) is torch.nn.Linear
    ]
    for parent, name, child in targets:
        setattr(parent, name, build(child, **kwargs))
    if kind == "bitsandbytes":
        model.is_loaded_in_4bit = True  # peft reads this to dispatch its bnb LoRA layer
    return len(targets)
