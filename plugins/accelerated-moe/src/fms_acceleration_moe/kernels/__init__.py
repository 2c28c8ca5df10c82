"""Grouped expert GEMMs (Triton and PyTorch) and the MoE MLP built from them.

Nothing here imports the framework: the kernels can be used and tested on their own.
"""

from .dispatch import backend, use_triton
from .experts_mlp import ExpertLoRA, combine, expert_rows, experts_mlp
from .gating import GateFn, gated, swiglu, swiglu_and_grad
from .grouped_gemm import grouped_linear
from .routing import ExpertGroups, group_by_expert, offsets_from_counts

__all__ = [
    "ExpertGroups",
    "ExpertLoRA",
    "GateFn",
    "backend",
    "combine",
    "expert_rows",
    "experts_mlp",
    "gated",
    "group_by_expert",
    "grouped_linear",
    "offsets_from_counts",
    "swiglu",
    "swiglu_and_grad",
    "use_triton",
]
