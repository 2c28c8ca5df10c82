"""Guard against bitsandbytes' CPU weight repacking, which has no backward, and undo it.

bitsandbytes 0.50 `Linear4bit.forward` repacks its weight into an AVX512-BF16 inference layout
the first time it runs on CPU in eval mode without grad (`support_avx512bf16_for_cpu` is set in
`__init__` from the CPU flags). Once repacked, `matmul_4bit` takes the `gemv_4bit` inference path
for every later call, training included, and that path has no autograd: everything upstream of
the layer silently stops receiving gradients after the first evaluation. `dequantize_4bit` does
not read that layout either, so the dequantizer this package registers for fused LoRA undoes it
too. bitsandbytes is imported only when a repacked layer is met.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "REPACK_FLAG",
    "disable_cpu_weight_repacking",
    "is_repacked_for_cpu",
    "unpack_cpu_repacked",
]

# The instance attribute `Linear4bit.__init__` sets and `Linear4bit.forward` checks.
REPACK_FLAG = "support_avx512bf16_for_cpu"


def is_repacked_for_cpu(module: nn.Module) -> bool:
    """True when the module's 4-bit weight is in the CPU inference (no backward) layout."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def unpack_cpu_repacked(module: nn.Module) -> bool:
    """Restore a repacked `Linear4bit` weight to the standard 4-bit layout in place; True if it was.

    bitsandbytes 0.50's `_convert_weight_packed_for_cpu_inverse` re-quantizes a double-quantized
    absmax, but leaves a single-quantized one as the repack stored it: bf16, in a 2-D
    (K/blocksize, N) layout that `dequantize_4bit` misreads (max error ~7% of the weight scale).
    Undo that layout here; the bf16 rounding of absmax done by the repack cannot be undone.
    """
    if not is_repacked_for_cpu(module):
        return False
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    with torch.no_grad():
        weight = module.weight
        data, state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
        if not state.nested and state.absmax.dim() == 2:
            state.absmax = state.absmax.t().reshape(-1).float()
        weight.data, weight.quant_state = data, state
    return True


def disable_cpu_weight_repacking(model: nn.Module) -> int:
    """Turn the repack off on every `Linear4bit` (undoing any repack done); return how many."""
    from bitsandbytes.nn import Linear4bit

    guarded = 0
    for module in model.modules():
        if not isinstance(module, Linear4bit):
            continue
        setattr(module, REPACK_FLAG, False)
        unpack_cpu_repacked(module)
        guarded += 1
    return guarded
