"""4-bit loading: every block linear is replaced; memory shrinks by the expected factor."""

from __future__ import annotations

import pytest
import torch
from bitsandbytes.nn import Linear4bit
from transformers import AutoModelForCausalLM

from fms_acceleration import compat
from fms_acceleration.testing import build_framework, save_tiny_model
from fms_acceleration_peft import BNBAccelerationPlugin
from fms_acceleration_peft.bnb_loading import count_4bit_linears
from fms_acceleration_peft.memory import model_bytes, module_group_bytes

# Per decoder layer of the tiny llama: q, k, v, o, gate, up, down; 2 layers.
LINEARS_PER_LAYER = 7
TINY_LAYERS = 2


def _load(path, quant_type, dtype=torch.bfloat16):
    config = {"plugins": {"peft": {"quantization": {"bitsandbytes": {"quant_type": quant_type}}}}}
    framework = build_framework(config, [BNBAccelerationPlugin])
    assert framework.requires_custom_loading
    return framework.model_loader(path, dtype=dtype)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_every_block_linear_is_4bit(tiny_llama_dir, quant_type):
    model = _load(tiny_llama_dir, quant_type)
    assert count_4bit_linears(model) == LINEARS_PER_LAYER * TINY_LAYERS
    for name, module in model.named_modules():
        if ".layers." in name and isinstance(module, torch.nn.Linear):
            assert isinstance(module, Linear4bit), name
            assert module.weight.quant_type == quant_type
            assert module.weight.quant_state.nested  # double quantization
            # quant storage = compute dtype, so FSDP sees one floating dtype per block
            assert module.weight.dtype == torch.bfloat16
            assert module.compute_dtype == torch.bfloat16
            assert module.support_avx512bf16_for_cpu is False
    # lm_head stays a plain linear (transformers keeps the output layer unquantized)
    assert type(model.lm_head) is torch.nn.Linear
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.bfloat16


def test_memory_footprint_against_bf16_and_fp32(tmp_path):
    # hidden 256 so each layer's fixed 1 KiB codebooks do not swamp its packed weights
    path = save_tiny_model(tmp_path, hidden_size=256, intermediate_size=512)
    quantized = _load(path, "nf4")
    bf16 = AutoModelForCausalLM.from_pretrained(path, **compat.dtype_kwargs(torch.bfloat16))
    fp32 = AutoModelForCausalLM.from_pretrained(path, **compat.dtype_kwargs(torch.float32))

    def in_blocks(name, module):
        return ".layers." in name and isinstance(module, torch.nn.Linear)

    block_ratio = module_group_bytes(quantized, in_blocks) / module_group_bytes(bf16, in_blocks)
    # 4 bits of 16 plus double-quantized absmax (8 bits per 64 weights + fp32 per 256 blocks)
    assert 0.255 < block_ratio < 0.275, block_ratio
    # Whole model: the 128x256 embedding and lm_head stay bf16, so the ratio is higher.
    whole_bf16 = model_bytes(quantized) / model_bytes(bf16)
    whole_fp32 = model_bytes(quantized) / model_bytes(fp32)
    assert 0.29 < whole_bf16 < 0.32, whole_bf16
    assert whole_fp32 == pytest.approx(whole_bf16 / 2, rel=0.02)
