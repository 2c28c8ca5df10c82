"""The architecture table and the patch rules built from it."""

from .architectures import ARCHITECTURES, SUPPORTED_CAUSAL_LMS, MoeArchSpec, arch_spec_for
from .blocks import build_moe_rules, moe_blocks

__all__ = [
    "ARCHITECTURES",
    "SUPPORTED_CAUSAL_LMS",
    "MoeArchSpec",
    "arch_spec_for",
    "build_moe_rules",
    "moe_blocks",
]
