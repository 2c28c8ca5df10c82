"""Triton kernels wrapped in autograd Functions, with plain-PyTorch references.

Nothing in this subpackage imports fms_acceleration or transformers. Each public function takes
the Triton path on CUDA tensors (or everywhere when TRITON_INTERPRET=1) and the PyTorch
reference elsewhere; `backend("torch" | "triton" | "auto")` overrides the choice in a block.
"""

from ._dispatch import backend, device_guard, use_triton
from .cross_entropy import CrossEntropyFunction, check_targets, cross_entropy
from .fused_linear_cross_entropy import (
    FusedLinearCrossEntropyFunction,
    fused_linear_cross_entropy,
)
from .reference import (
    cross_entropy_reference,
    fused_linear_cross_entropy_reference,
    rms_norm_reference,
    rope_reference,
    swiglu_reference,
)
from .rms_norm import RMSNormFunction, rms_norm
from .rope import RoPEFunction, rope
from .swiglu import SwiGLUFunction, SwiGLUPackedFunction, swiglu, swiglu_packed

__all__ = [
    "CrossEntropyFunction",
    "FusedLinearCrossEntropyFunction",
    "RMSNormFunction",
    "RoPEFunction",
    "SwiGLUFunction",
    "SwiGLUPackedFunction",
    "backend",
    "check_targets",
    "cross_entropy",
    "cross_entropy_reference",
    "device_guard",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_reference",
    "rms_norm",
    "rms_norm_reference",
    "rope",
    "rope_reference",
    "swiglu",
    "swiglu_packed",
    "swiglu_reference",
    "use_triton",
]
