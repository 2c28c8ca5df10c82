"""The conftest stand-ins for the CPU kind a machine is not equal bitsandbytes' real kernel on the
machines of their kind: here, the stand-in of this machine's own kind is compared with it."""

from __future__ import annotations

import bitsandbytes.functional as bnbF
import pytest
import torch

from fms_acceleration_peft.bnb_dequant_check import misreads_row_blocks

SHAPES = [
    ((200, 96), 64),
    ((7, 32), 64),
    ((64, 160), 128),
    ((33, 576), 128),
    ((4, 48), 256),
    ((96, 576), 64),
    ((200, 200), 64),
    ((3, 100), 32),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize(("shape", "blocksize"), SHAPES)
def test_dequantize_stand_in_of_this_kind_is_bnb(
    cpu_kinds, dequant_stand_ins, shape, blocksize, quant_type, dtype
):
    kind = "avx512f" if cpu_kinds["avx512f"] else "no-avx512f"
    weight = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    data, state = bnbF.quantize_4bit(
        weight.to(dtype), blocksize=blocksize, quant_type=quant_type, compress_statistics=False
    )
    real = bnbF.dequantize_4bit(data, state)
    stand_in = dequant_stand_ins[kind](data, state.absmax, blocksize, quant_type, shape, dtype)
    assert stand_in.dtype == real.dtype and stand_in.shape == real.shape
    assert torch.equal(stand_in, real)
    # and the two kinds differ exactly where the AVX512 kernel misreads row blocks
    other = dequant_stand_ins["no-avx512f" if kind == "avx512f" else "avx512f"]
    differs = not torch.equal(other(data, state.absmax, blocksize, quant_type, shape, dtype), real)
    assert differs is misreads_row_blocks(shape, blocksize)


@pytest.mark.parametrize("double_quant", [True, False])
def test_gemv_stand_in_of_this_kind_is_bnb(cpu_kinds, gemv_stand_ins, double_quant):
    """On the layout an eval forward repacks a Linear4bit into (bnb's CPU inference format)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    kind = "avx512bf16" if cpu_kinds["avx512bf16"] else "no-avx512bf16"
    g = torch.Generator().manual_seed(6)
    weight = torch.randn(96, 192, generator=g).bfloat16()
    data, state = bnbF.quantize_4bit(weight, quant_type="nf4", compress_statistics=double_quant)
    data, state = _convert_weight_packed_for_cpu(data, state)
    x = torch.randn(2, 5, 192, generator=g).bfloat16()
    args = (x, data, state.shape, state.absmax, state.code, state.blocksize)
    real = torch.ops.bitsandbytes.gemv_4bit.default(*args)
    stand_in = gemv_stand_ins[kind](*args)
    assert stand_in.shape == real.shape == (2, 5, 96) and stand_in.dtype == real.dtype
    # bf16 outputs: at most an ulp or so of the largest (the kernels sum in other orders)
    assert (stand_in.float() - real.float()).abs().max() <= 2**-6 * real.float().abs().max()
    # the avx512bf16 stand-in reads the layout right: x @ W.T within the bf16 absmax rounding
    right = (
        x.float() @ bnbF.dequantize_4bit(*bnbF.quantize_4bit(weight, quant_type="nf4")).float().t()
    )
    read_right = gemv_stand_ins["avx512bf16"](*args).float()
    assert (read_right - right).abs().max() <= 2e-2 * right.abs().max()
