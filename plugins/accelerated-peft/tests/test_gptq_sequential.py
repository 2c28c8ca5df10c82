"""GPTQ over a whole model: decoder layers, stages in the order a layer runs them, fake-quantized
weights that equal the codes written, and linears no calibration token reaches."""

from __future__ import annotations

import logging

import pytest
import torch

from fms_acceleration_peft.gptq_sequential import (
    GPTQRecipe,
    capture_first_layer_calls,
    decoder_layers,
    linear_stages,
    quantize_decoder_layers,
)


@pytest.fixture
def tiny_llama(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


def _samples(count: int, length: int = 24) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(21)
    return [{"input_ids": torch.randint(4, 128, (1, length), generator=g)} for _ in range(count)]


def test_stages_follow_the_layer(tiny_llama):
    name, layers = decoder_layers(tiny_llama)
    assert name == "model.layers" and len(layers) == 2
    calls = capture_first_layer_calls(tiny_llama, layers, _samples(3))
    assert len(calls) == 3 and calls[0].hidden().shape == (1, 24, 64)
    assert linear_stages(layers[1], calls) == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


def test_every_block_linear_is_quantized_and_keeps_its_decoded_weight(tiny_llama, caplog):
    original = {n: m.weight.detach().clone() for n, m in tiny_llama.named_modules()
                if isinstance(m, torch.nn.Linear)}  # fmt: skip
    tiny_llama.model.layers[0].unused = torch.nn.Linear(64, 32)  # no token ever reaches it
    with caplog.at_level(logging.WARNING, logger="fms_acceleration_peft.gptq_sequential"):
        results = quantize_decoder_layers(tiny_llama, _samples(6), GPTQRecipe(4, 32))
    assert len(results) == 15 and "lm_head" not in results
    assert "unused saw no calibration token; rounded to nearest" in caplog.text
    for name, quantized in results.items():
        weight = tiny_llama.get_submodule(name).weight
        torch.testing.assert_close(weight, quantized.dequantize(), rtol=0, atol=0)
        if name in original:
            error = (weight - original[name]).abs()
            assert 0 < error.mean() < quantized.scales.max()
    assert torch.equal(tiny_llama.lm_head.weight, original["lm_head"])  # outside the blocks


def test_a_model_without_decoder_layers_is_named():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    model.config = type("Config", (), {"num_hidden_layers": 4})()
    with pytest.raises(ValueError, match="Sequential: found no list of num_hidden_layers=4"):
        quantize_decoder_layers(model, [], GPTQRecipe())
