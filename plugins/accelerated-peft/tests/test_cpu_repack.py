"""The bitsandbytes CPU repack trap: an eval forward must not cost LoRA its gradients.

bitsandbytes 0.50 decides per `Linear4bit` instance (`support_avx512bf16_for_cpu`, set from the
CPU flags in `__init__`) whether an eval/no-grad CPU forward repacks the weight into an
inference layout; later forwards, training included, then go through `gemv_4bit`. What that
does depends on the CPU (`bnb_gemv_kind` runs each test under both kinds):
- with AVX512-BF16, bnb's compiled kernel computes the right values but autograd cannot see into
  it: every LoRA gradient upstream of a repacked layer is None (not merely different);
- without it (where the flag can only be faked), bnb's pure-torch default kernel is traced but
  reads the packed layout as the standard one: the loss and every LoRA gradient change.
The guard must keep training exact on both.
"""

from __future__ import annotations

import copy

import bitsandbytes.functional as bnb_functional
import bitsandbytes.nn.modules as bnb_modules
import pytest
import torch
from bitsandbytes.nn import Linear4bit
from peft import LoraConfig

from fms_acceleration import compat
from fms_acceleration.testing import build_framework
from fms_acceleration_peft import (
    BNBAccelerationPlugin,
    disable_cpu_weight_repacking,
    is_repacked_for_cpu,
)
from fms_acceleration_peft.bnb_cpu_repack import unpack_cpu_repacked
from fms_acceleration_peft.bnb_loading import load_4bit_model

CONFIG = {"plugins": {"peft": {"quantization": {"bitsandbytes": {"quant_type": "nf4"}}}}}


@pytest.fixture
def cpu_with_avx512bf16(monkeypatch):
    """Linear4bit instances created from now on believe the CPU has AVX512-BF16 (for tests of
    the repacked layout itself, which is the same on both kinds)."""
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)


def _lora():
    # init_lora_weights=False: B != 0, so lora_A gets a gradient from the first step on.
    return LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,
    )


def _loss_and_grads(model, input_ids):
    model.train()
    model.zero_grad()
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    grads = {
        n: None if p.grad is None else p.grad.clone()
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    return loss.detach(), grads


def _eval_forward(model, input_ids):
    model.eval()
    with torch.no_grad():
        model(input_ids=input_ids)


def _linears(model):
    return [m for m in model.modules() if isinstance(m, Linear4bit)]


def _assert_same(before, after, rtol=0.0, atol=0.0):
    (loss0, grads0), (loss1, grads1) = before, after
    torch.testing.assert_close(loss1, loss0, rtol=rtol, atol=atol)
    assert grads0.keys() == grads1.keys() and len(grads0) == 8  # 2 layers x q,v x A,B
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=rtol, atol=atol, msg=name)


def test_trap_is_real_without_the_guard(bnb_gemv_kind, tiny_llama_dir):
    """Shows what the guard prevents, on both kinds: after an eval forward repacks every layer,
    LoRA gradients are None (AVX512-BF16 kernel) or wrong (default kernel)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, **compat.dtype_kwargs(torch.bfloat16), quantization_config=quant
    )
    assert all(m.support_avx512bf16_for_cpu for m in _linears(model))
    torch.manual_seed(0)
    model = get_peft_model(model, _lora())
    ids = torch.randint(4, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    loss0, grads0 = _loss_and_grads(model, ids)
    assert len(grads0) == 8 and all(g is not None and g.abs().max() > 0 for g in grads0.values())
    _eval_forward(model, ids)
    assert all(is_repacked_for_cpu(m) for m in _linears(model))
    loss1, grads1 = _loss_and_grads(model, ids)
    change = abs(loss1.item() - loss0.item()) / loss0.item()
    if bnb_gemv_kind == "avx512bf16":
        # the forward is right up to absmax's bf16 rounding, but training learns nothing
        assert change < 1e-3, change
        assert all(g is None for g in grads1.values()), grads1
    else:
        assert change > 2e-3, change
        for name, g in grads1.items():
            assert g is not None and not torch.allclose(g, grads0[name], rtol=1e-2), name


def test_plugin_guard_keeps_training_exact_after_eval(bnb_gemv_kind, tiny_llama_dir):
    framework = build_framework(CONFIG, [BNBAccelerationPlugin])
    model = framework.model_loader(tiny_llama_dir, dtype=torch.bfloat16)
    assert len(_linears(model)) == 14
    assert not any(m.support_avx512bf16_for_cpu for m in _linears(model))
    torch.manual_seed(0)
    model, (peft_config,) = framework.augmentation(model, None, modifiable_args=(_lora(),))
    assert peft_config is None
    ids = torch.randint(4, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    before = _loss_and_grads(model, ids)
    _eval_forward(model, ids)
    assert not any(is_repacked_for_cpu(m) for m in _linears(model))
    _assert_same(before, _loss_and_grads(model, ids))


def test_guard_undoes_a_repack_that_already_happened(bnb_gemv_kind, tiny_llama_dir):
    model = load_4bit_model(tiny_llama_dir, "nf4", torch.bfloat16)
    for module in _linears(model):  # as if loaded elsewhere, without the guard
        module.support_avx512bf16_for_cpu = True
    from peft import get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(model, _lora())
    ids = torch.randint(4, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    before = _loss_and_grads(model, ids)
    _eval_forward(model, ids)
    assert sum(is_repacked_for_cpu(m) for m in _linears(model)) == 14
    assert disable_cpu_weight_repacking(model) == 14
    assert not any(is_repacked_for_cpu(m) for m in _linears(model))
    _eval_forward(model, ids)
    # bitsandbytes' inverse re-quantizes the double-quantized absmax, so the weights come back
    # within quantization error (the repacked path is off by ~1e-1 in loss, see above).
    _assert_same(before, _loss_and_grads(model, ids), rtol=2e-2, atol=1e-3)


def _repacked_single_quant_linear(quant_type, in_features=192, out_features=96, seed=5):
    """A single-quant (no double quant) Linear4bit whose weight an eval forward repacked."""
    torch.manual_seed(seed)
    source = torch.nn.Linear(in_features, out_features, bias=False)
    layer = Linear4bit(
        in_features,
        out_features,
        bias=False,
        compute_dtype=torch.bfloat16,
        compress_statistics=False,
        quant_type=quant_type,
    )
    layer.load_state_dict(source.state_dict())
    layer = layer.to("cpu")  # quantizes
    original = (layer.weight.data.clone(), copy.deepcopy(layer.weight.quant_state))
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(3, in_features, dtype=torch.bfloat16))
    assert is_repacked_for_cpu(layer)
    return layer, original


def _dequantized(data, state, absmax=None):
    if absmax is not None:
        state = copy.deepcopy(state)
        state.absmax = absmax
    return bnb_functional.dequantize_4bit(data, state)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_guard_restores_single_quant_weights(cpu_with_avx512bf16, quant_type):
    """bnb 0.50's inverse leaves a non-nested absmax in its packed (K/64, N) bf16 layout."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    layer, (data0, state0) = _repacked_single_quant_linear(quant_type)
    assert not state0.nested and state0.absmax.dtype == torch.float32
    original = _dequantized(data0, state0)
    assert disable_cpu_weight_repacking(torch.nn.Sequential(layer)) == 1
    state = layer.weight.quant_state
    assert not is_repacked_for_cpu(layer)
    assert torch.equal(layer.weight.data, data0)  # the 4-bit codes come back bit for bit
    assert state.absmax.shape == (96 * 192 // 64,) and state.absmax.dtype == torch.float32
    # the repack rounded absmax to bf16 (not undoable); the layout and everything else is exact
    rounded = state0.absmax.bfloat16().float()
    torch.testing.assert_close(state.absmax, rounded, rtol=0, atol=0)
    restored = _dequantized(layer.weight.data, state)
    assert restored.shape == original.shape == (96, 192)
    torch.testing.assert_close(restored, _dequantized(data0, state0, rounded), rtol=0, atol=1e-6)
    assert (restored - original).abs().max() <= original.abs().max() * 2**-8
    # bnb's inverse alone (no absmax fix) is far off: the bug this guards against
    again, _ = _repacked_single_quant_linear(quant_type)
    data, raw = _convert_weight_packed_for_cpu_inverse(again.weight.data, again.weight.quant_state)
    assert raw.absmax.dim() == 2
    broken = _dequantized(data, raw).float()
    assert (broken - original).abs().max() > 20 * original.abs().max() * 2**-8


def test_unpack_cpu_repacked_is_a_no_op_on_standard_layout(cpu_with_avx512bf16):
    layer, (data0, state0) = _repacked_single_quant_linear("nf4")
    assert unpack_cpu_repacked(layer) is True
    assert unpack_cpu_repacked(layer) is False
    assert unpack_cpu_repacked(torch.nn.Linear(4, 4)) is False
    restored = _dequantized(layer.weight.data, layer.weight.quant_state)
    expected = _dequantized(data0, state0, state0.absmax.bfloat16().float())
    torch.testing.assert_close(restored, expected, rtol=0, atol=1e-6)
