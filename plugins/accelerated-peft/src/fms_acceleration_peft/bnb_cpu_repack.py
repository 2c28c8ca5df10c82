"""Guard against bitsandbytes' CPU weight repacking, which has no backward.

bitsandbytes 0.50 `Linear4bit.forward` repacks its weight into an AVX512-BF16 inference layout
the first time it runs on CPU in eval mode without grad (`support_avx512bf16_for_cpu` is set in
`__init__` from the CPU flags). Once repacked, `matmul_4bit` takes the `gemv_4bit` inference path
for every later call, training included, and that path has no autograd: everything upstream of
the layer silently stops receiving gradients after the first evaluation.
"""

from __future__ import annotations

from torch import nn

from fms_acceleration.bnb_cpu_layout import REPACK_FLAG, is_repacked_for_cpu, unpack_cpu_repacked

__all__ = [
    "REPACK_FLAG",
    "disable_cpu_weight_repacking",
    "is_repacked_for_cpu",
    "unpack_cpu_repacked",
]


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
