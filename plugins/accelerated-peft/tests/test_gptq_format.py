"""The GPTQ packing format against an independent decoder, and its errors."""

from __future__ import annotations

import re

import pytest
import torch

from fms_acceleration_peft.gptq_format import (
    GPTQFormatError,
    GPTQLayout,
    check_bits,
    check_group_size,
    dequantize,
    pack_columns,
    pack_rows,
    unpack_columns,
    unpack_rows,
)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packing_round_trips_and_matches_the_word_layout(bits, reference_weight):
    g = torch.Generator().manual_seed(100 + bits)
    pack = 32 // bits
    rows, cols = 3 * pack, 40
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=g)
    words = pack_rows(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (3, cols)
    assert torch.equal(unpack_rows(words, bits), codes.to(torch.int32))
    # row j of a word sits at bits [j * bits, (j + 1) * bits): word value = sum code_j * 2^(j*bits)
    expected = sum(codes[j::pack].long() << (j * bits) for j in range(pack))
    assert torch.equal(words.long() % (1 << 32), expected)
    zeros = torch.randint(0, 1 << bits, (5, 8 * pack), generator=g)
    packed = pack_columns(zeros, bits)
    assert packed.shape == (5, 8) and torch.equal(unpack_columns(packed, bits), zeros.int())


@pytest.mark.parametrize(
    "bits, in_features, out_features, group_size, desc_act",
    [
        (4, 72, 40, 24, False),  # odd widths: 9 and 5 words, 3 groups
        (4, 72, 40, 24, True),  # desc_act: groups permuted over rows
        (4, 200, 96, -1, False),  # one group over all rows
        (2, 80, 48, 32, True),  # last group partial (80 = 2 x 32 + 16)
        (8, 36, 20, 12, False),
        (8, 4096 // 16, 64, 128, True),
    ],
)
@pytest.mark.parametrize("zero_offset", [1, 0])
def test_dequantize_matches_the_reference_decoder(
    bits, in_features, out_features, group_size, desc_act, zero_offset, random_gptq_layer,
    reference_weight,
):  # fmt: skip
    g = torch.Generator().manual_seed(in_features * 7 + bits)
    tensors = random_gptq_layer(in_features, out_features, bits, group_size, desc_act, g)
    got = dequantize(*tensors, bits, zero_offset)
    expected = reference_weight(*tensors, bits, zero_offset)
    assert got.dtype == torch.float32 and got.shape == (in_features, out_features)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0)
    assert expected.abs().max() > 0.01  # random codes: a real spread of values
    layout = GPTQLayout(in_features, out_features, bits, group_size, zero_offset)
    layout.check(dict(zip(("qweight", "qzeros", "scales", "g_idx"), tensors)), "layer")


@pytest.mark.parametrize("bits", [3, 5, 16, 0, True, "4"])
def test_unsupported_bits_are_named(bits):
    with pytest.raises(
        GPTQFormatError, match=rf"bits={bits!r} is not supported; use one of 2, 4, 8"
    ):
        check_bits(bits)


@pytest.mark.parametrize(
    "group_size, message",
    [
        (0, "group_size=0 must be -1 (one group) or a positive size"),
        (-2, "group_size=-2 must be -1"),
        (32.0, "group_size=32.0 is not an integer"),
        (True, "group_size=True is not an integer"),
    ],
)
def test_bad_group_sizes_are_named(group_size, message):
    with pytest.raises(GPTQFormatError, match=re.escape(message)):
        check_group_size(group_size)
    assert check_group_size(-1) == -1 and check_group_size(128) == 128


def test_widths_must_fill_whole_words():
    with pytest.raises(GPTQFormatError, match="in_features=60 must be a positive multiple of 8"):
        GPTQLayout(60, 64, 4, 32)
    with pytest.raises(GPTQFormatError, match="out_features=6 must be a positive multiple of 4"):
        GPTQLayout(64, 6, 8, 32)


def test_layout_check_names_the_tensor(random_gptq_layer):
    g = torch.Generator().manual_seed(5)
    layout = GPTQLayout(64, 32, 4, 32)
    tensors = dict(
        zip(("qweight", "qzeros", "scales", "g_idx"), random_gptq_layer(64, 32, 4, 32, False, g))
    )
    cases = {
        "qweight": (tensors["qweight"][:4], r"qweight: shape \[4, 32\] .* expected \[8, 32\]"),
        "scales": (tensors["scales"].int(), r"scales: dtype torch\.int32, expected a floating"),
        "g_idx": (tensors["g_idx"] + 1, r"g_idx: group indices span \[1, 2\], outside the 2"),
        "qzeros": (None, r"qzeros: missing"),
    }
    for name, (bad, message) in cases.items():
        with pytest.raises(GPTQFormatError, match=message) as info:
            layout.check({**tensors, name: bad}, "model.q_proj")
        assert f"model.q_proj.{name}: " in str(info.value)
