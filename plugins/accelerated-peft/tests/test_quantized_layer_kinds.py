"""The quantized layers this package describes to the core: which layers each kind matches, why
it refuses some, and that the bitsandbytes dequantizer reads a weight the CPU repack moved."""

from __future__ import annotations

import bitsandbytes.functional as bnb_functional
import bitsandbytes.nn.modules as bnb_modules
import pytest
import torch
from bitsandbytes.nn import Linear4bit

from fms_acceleration.quantized_linear import quantized_layer_kind, quantized_layer_kinds
from fms_acceleration_peft import GPTQLinear
from fms_acceleration_peft.quantized_layer_kinds import BNB_4BIT, GPTQMODEL

QLINEAR = "gptqmodel.nn_modules.qlinear"


def _gptqmodel_like(name: str, module: str, bases: tuple[type, ...] = (torch.nn.Module,)) -> type:
    """A class that sits where gptqmodel's would (gptqmodel itself is optional)."""
    return type(name, bases, {"__module__": module, "__qualname__": name})


def test_importing_the_package_registers_both_kinds():
    names = [kind.name for kind in quantized_layer_kinds()]
    assert names.count("bitsandbytes") == 1 and names.count("auto_gptq") == 1
    assert quantized_layer_kind(Linear4bit(64, 32)) is BNB_4BIT
    assert quantized_layer_kind(torch.nn.Linear(64, 32)) is None
    # our own GPTQ layer hands back its weight itself (DequantizableLinear): no kind
    assert quantized_layer_kind(GPTQLinear(64, 32, bits=4, group_size=32)) is None


def test_gptqmodel_layers_other_than_the_torch_kernel_are_refused():
    base = _gptqmodel_like("BaseQuantLinear", QLINEAR)
    torch_linear = _gptqmodel_like("TorchLinear", f"{QLINEAR}.torch", (base,))
    fused = _gptqmodel_like("TorchFusedQuantLinear", f"{QLINEAR}.torch_fused", (torch_linear,))
    marlin = _gptqmodel_like("MarlinQuantLinear", f"{QLINEAR}.marlin", (base,))
    for cls in (torch_linear, fused, marlin):
        assert quantized_layer_kind(cls()) is GPTQMODEL
    assert GPTQMODEL.unsupported_reason(torch_linear()) is None
    assert GPTQMODEL.unsupported_reason(fused()) is None  # the TorchLinear family
    reason = GPTQMODEL.unsupported_reason(marlin())
    assert "MarlinQuantLinear stores weights in its own layout" in reason
    assert "BACKEND.TORCH" in reason
    with_adapter, rotated = torch_linear(), torch_linear()
    with_adapter.adapter = object()
    rotated.online_partial_had = True
    assert "own gptqmodel adapter" in GPTQMODEL.unsupported_reason(with_adapter)
    assert "online Hadamard" in GPTQMODEL.unsupported_reason(rotated)
    # a class merely named like gptqmodel's, elsewhere, is not theirs
    assert quantized_layer_kind(_gptqmodel_like("TorchLinear", "mypackage.torch")()) is None


@pytest.mark.parametrize("double_quant", [True, False])
def test_bnb_dequantizer_guards_and_undoes_the_cpu_repack(monkeypatch, double_quant):
    """The dequantizer turns the repack off; a weight repacked before it is read back in the
    standard layout (up to the bf16 rounding of absmax that the repack does)."""
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    torch.manual_seed(11)
    source = torch.nn.Linear(192, 96, bias=False)
    layer = Linear4bit(192, 96, bias=False, compress_statistics=double_quant, quant_type="nf4")
    layer.load_state_dict(source.state_dict())
    layer = layer.to("cpu")  # quantizes
    expected = bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert layer.support_avx512bf16_for_cpu is True
    dequantize = BNB_4BIT.dequantizer(layer)
    assert layer.support_avx512bf16_for_cpu is False
    torch.testing.assert_close(dequantize(), expected, rtol=0, atol=0)
    weight = layer.weight
    weight.data, weight.quant_state = bnb_functional._convert_weight_packed_for_cpu(
        weight.data, weight.quant_state
    )
    restored = dequantize()
    assert weight.quant_state.packing_format_for_cpu is False
    assert restored.shape == (96, 192) and restored.dtype == expected.dtype
    assert (restored - expected).abs().max() <= expected.abs().max() * 2**-8
    # and it is the source weight, within nf4's quantization error (~9% relative here)
    error = (restored - source.weight).norm() / source.weight.norm()
    assert 0.02 < error.item() < 0.12
