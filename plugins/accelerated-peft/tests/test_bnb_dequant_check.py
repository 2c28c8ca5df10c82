"""bitsandbytes' CPU dequantize on both CPU kinds, and the loader's self-check that refuses it.

Facts (bitsandbytes 0.50.2; csrc/cpu_ops.cpp `dequantizeBlockwise4bitCpu`; counted on a CPU with
AVX512F and AVX512-BF16, where `bnb_dequant_kind` "avx512f" is the real kernel): the AVX512
branch (n % 16 == 0, blocksize >= 16) reads block scales per row, so a [rows, n] weight with
n % blocksize != 0 comes back wrong; quantization is right (decoding its codes by hand gives the
weight back within 4-bit error). Without AVX512F, and for n % 16 != 0 or a single row, it is right.
"""

from __future__ import annotations

import math

import bitsandbytes.functional as bnbF
import pytest
import torch
from bitsandbytes.nn import Linear4bit

from fms_acceleration import AccelerationPluginConfigError, compat
from fms_acceleration.testing import build_framework, save_tiny_model
from fms_acceleration_peft import BNBAccelerationPlugin
from fms_acceleration_peft import bnb_dequant_check as check
from fms_acceleration_peft.bnb_dequant_check import (
    DequantCase,
    check_4bit_dequantize,
    decode_4bit,
    misreads_row_blocks,
    probe_dequantize,
    probe_rows,
)

BNB_CONFIG = {"plugins": {"peft": {"quantization": {"bitsandbytes": {"quant_type": "nf4"}}}}}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def _weight(shape, dtype, seed=11):
    """Seeded normal weights drawn in fp64 (torch's fp32 randn has a CPU-specific AVX2 path)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, dtype=torch.float64, generator=g).to(dtype)


def _quantized(shape, blocksize, quant_type, dtype):
    weight = _weight(shape, dtype)
    data, state = bnbF.quantize_4bit(
        weight, blocksize=blocksize, quant_type=quant_type, compress_statistics=False
    )
    return weight, data, state


# (shape, blocksize, quant_type, dtype, values wrong on a CPU with AVX512F) for the weights of
# `_weight`; without AVX512F every count is 0. Zero codes come out right under any scale.
FACTS = [
    ((200, 96), 64, "nf4", "bf16", 16964),  # of 19,200
    ((200, 96), 64, "nf4", "fp32", 17345),
    ((200, 96), 64, "fp4", "bf16", 18565),
    ((200, 96), 64, "fp4", "fp16", 18945),
    ((200, 96), 128, "nf4", "fp32", 17217),
    ((4096, 576), 64, "nf4", "bf16", 0),
    ((4096, 576), 128, "nf4", "bf16", 2103135),  # of 2,359,296
    ((200, 200), 64, "nf4", "bf16", 0),  # 200 % 16 != 0: the scalar branch
    ((1, 19200), 64, "nf4", "bf16", 0),  # one row: per-row and flat blocks coincide
    ((7, 32), 64, "fp4", "fp32", 159),  # narrower than a block: wrong from row 2 on
]


@pytest.mark.parametrize(("shape", "blocksize", "quant_type", "dtype", "wrong_avx512f"), FACTS)
def test_bnb_cpu_dequantize_facts(
    bnb_dequant_kind, shape, blocksize, quant_type, dtype, wrong_avx512f
):
    weight, data, state = _quantized(shape, blocksize, quant_type, DTYPES[dtype])
    decoded = decode_4bit(data, state.absmax, state.code, blocksize, shape, DTYPES[dtype])
    # quantization is right on both kinds: the hand decode is the weight within 4-bit error
    error = (decoded.float() - weight.float()).abs().max() / weight.float().abs().max()
    assert 0 < error < 0.16
    got = bnbF.dequantize_4bit(data, state)
    wrong = int((got != decoded).sum())
    assert wrong == (wrong_avx512f if bnb_dequant_kind == "avx512f" else 0)
    assert (wrong > 0) == (bnb_dequant_kind == "avx512f" and misreads_row_blocks(shape, blocksize))


@pytest.mark.parametrize(
    ("shape", "blocksize", "expected"),
    [
        ((200, 96), 64, True),
        ((200, 96), 32, False),  # a multiple of the blocksize
        ((4096, 576), 64, False),
        ((4096, 576), 128, True),
        ((2, 32), 64, False),  # both rows inside block 0 either way
        ((3, 32), 64, True),
        ((1, 96), 64, False),
        ((200, 200), 64, False),  # n % 16 != 0
        ((200, 100), 64, False),
        ((576, 1536), 64, False),  # SmolLM2-135M's down_proj
        ((200, 4080), 4096, True),
    ],
)
def test_misreads_row_blocks(shape, blocksize, expected):
    if blocksize >= 2048 and torch.backends.cpu.get_cpu_capability() == "AVX512":
        expected = False  # bnb routes these to its pure-torch kernel
    assert misreads_row_blocks(shape, blocksize) is expected


@pytest.mark.parametrize(
    ("rows", "n", "blocksize", "expected"),
    [(4096, 96, 64, 4), (4096, 32, 64, 4), (4096, 576, 64, 4), (4096, 200, 64, 16),
     (4096, 100, 64, 32), (4096, 75, 64, 128), (3, 96, 64, 3), (4096, 48, 256, 32)],
)  # fmt: skip
def test_probe_rows_are_whole_blocks_that_show_any_misreading(rows, n, blocksize, expected):
    got = probe_rows(rows, n, blocksize)
    assert got == expected
    if got < rows:
        assert got * n % blocksize == 0
        assert misreads_row_blocks((got, n), blocksize) == misreads_row_blocks(
            (10**6, n), blocksize
        )


WIDTHS = (16, 32, 48, 64, 96, 100, 128, 160, 200, 208, 576, 720, 1536)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_probe_finds_exactly_the_misread_widths(bnb_dequant_kind, quant_type):
    for blocksize in (64, 128):
        for n in WIDTHS:
            rows = probe_rows(4096, n, blocksize)
            case = DequantCase((rows, n), blocksize, quant_type, torch.bfloat16)
            wrong, probed = probe_dequantize(case)
            assert probed == case.shape[0] * n
            expected = bnb_dequant_kind == "avx512f" and misreads_row_blocks((4096, n), blocksize)
            assert (wrong > 0) is expected, (n, blocksize, wrong)
            if expected:  # every probe code is non-zero: each misread element shows
                assert wrong >= n // 2, (n, blocksize, wrong)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("width", [576, 200], ids=["realistic", "odd"])
def test_decode_4bit_equals_bnb_where_bnb_is_right(bnb_dequant_kind, width, quant_type, dtype):
    shape = (96, width)
    _, data, state = _quantized(shape, 64, quant_type, dtype)
    got = bnbF.dequantize_4bit(data, state)
    assert got.dtype == dtype and got.shape == shape
    assert torch.equal(decode_4bit(data, state.absmax, state.code, 64, shape, dtype), got)


def _count_probes(monkeypatch) -> list[DequantCase]:
    """Record every case the check probes."""
    probes, probe = [], probe_dequantize
    monkeypatch.setattr(check, "probe_dequantize", lambda case: probes.append(case) or probe(case))
    return probes


def _linear4bit(in_features, out_features, seed=0):
    torch.manual_seed(seed)
    source = torch.nn.Linear(in_features, out_features, bias=False)
    layer = Linear4bit(in_features, out_features, bias=False, quant_type="nf4")
    layer.load_state_dict(source.state_dict())
    return layer.to("cpu")  # quantizes the fp32 weight (double quant, blocks of 64)


def test_check_names_the_first_module_of_each_wrong_case(bnb_dequant_kind, monkeypatch):
    model = torch.nn.ModuleDict(
        {
            "up": _linear4bit(576, 96),
            "down": _linear4bit(96, 576),
            "down2": _linear4bit(96, 576, seed=1),
            "odd": _linear4bit(200, 64),
            "plain": torch.nn.Linear(96, 96),
        }
    )
    probes = _count_probes(monkeypatch)
    mismatches = check_4bit_dequantize(model.named_modules())
    assert sorted(p.shape for p in probes) == [(4, 96), (4, 576), (16, 200)]  # one per case
    if bnb_dequant_kind == "no-avx512f":
        assert mismatches == []
        return
    (mismatch,) = mismatches
    assert (mismatch.module, mismatch.others) == ("down", ("down2",))
    assert mismatch.case == DequantCase((576, 96), 64, "nf4", torch.float32)
    assert mismatch.probed == 4 * 96 and mismatch.wrong > 96
    text = mismatch.describe()
    assert text.startswith("bitsandbytes 0.50.2 dequantizes the 4-bit weight of down ")
    assert "(shape [576, 96], nf4, blocks of 64, float32; and 1 more 96 wide)" in text
    assert f"{mismatch.wrong} of 384 probe values differ" in text
    assert "train on corrupted base weights" in text
    assert "only when the last dimension (96) is a multiple of the blocksize (64)" in text


def test_check_covers_4bit_embeddings(bnb_dequant_kind):
    """quantize_embeddings' Embedding4bit and lm_head (one shared weight when tied)."""
    from transformers import AutoModelForCausalLM

    from fms_acceleration.testing import tiny_model_config
    from fms_acceleration_peft.bnb_embeddings import quantize_embeddings

    config = tiny_model_config("llama", hidden_size=96, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config)
    quantize_embeddings(model, "nf4", torch.float32, torch.float32)
    mismatches = check_4bit_dequantize(model.named_modules())
    if bnb_dequant_kind == "no-avx512f":
        assert mismatches == []
        return
    (mismatch,) = mismatches
    assert (mismatch.module, mismatch.others) == ("model.embed_tokens", ("lm_head",))
    assert mismatch.case == DequantCase((128, 96), 64, "nf4", torch.float32)


def _odd_llama(tmp_path):
    # widths 96 (q/k/v/o/gate/up inputs) and 160 (down_proj input): 96 % 64 and 160 % 64 != 0
    return save_tiny_model(tmp_path, hidden_size=96, intermediate_size=160)


def test_loader_refuses_weights_bnb_would_corrupt(bnb_dequant_kind, tmp_path):
    """On CPUs with AVX512F the load fails naming the module; elsewhere the weights are right."""
    path = _odd_llama(tmp_path)
    framework = build_framework(BNB_CONFIG, [BNBAccelerationPlugin])
    if bnb_dequant_kind == "avx512f":
        with pytest.raises(AccelerationPluginConfigError) as err:
            framework.model_loader(str(path), dtype=torch.bfloat16)
        message = str(err.value)
        assert message.startswith("plugins.peft.quantization.bitsandbytes: bitsandbytes ")
        assert "the 4-bit weight of model.layers.0.self_attn.q_proj (shape [96, 96]" in message
        assert "and 11 more 96 wide" in message  # q,k,v,o,gate,up x 2 layers
        assert "Also wrong: model.layers.0.mlp.down_proj [96, 160]." in message
        assert "multiple of the blocksize (64)" in message
        assert message.endswith(
            "To proceed: train on a GPU or on a CPU without AVX512F, or without this stanza "
            "(unquantized)."
        )
        return
    model = framework.model_loader(str(path), dtype=torch.bfloat16)
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(path, **compat.dtype_kwargs(torch.float32))
    linears = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert len(linears) == 14
    for name, module in linears.items():
        restored = bnbF.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        source = original.get_submodule(name).weight
        # per 64-block, nf4 is within ~1/6 of the block's absmax; a misread scale is far off
        error = (restored - source).abs().max() / source.abs().max()
        assert error < 0.2, (name, error)


def test_self_check_overhead_is_one_probe_per_case(tiny_llama_dir, monkeypatch):
    """The tiny llama's 14 linears are two cases (widths 64 and 128), probed once each."""
    probes = _count_probes(monkeypatch)
    framework = build_framework(BNB_CONFIG, [BNBAccelerationPlugin])
    framework.model_loader(tiny_llama_dir, dtype=torch.bfloat16)
    assert sorted(p.shape for p in probes) == [(4, 64), (4, 128)]
    assert {p.dtype for p in probes} == {torch.bfloat16}
    assert math.prod(probes[0].shape) < 1024
