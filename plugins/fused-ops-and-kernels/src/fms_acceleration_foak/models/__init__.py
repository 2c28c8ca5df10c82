"""Integration of the kernels into transformers models: architecture table and patch rules."""

from .architectures import ARCHITECTURES, ArchSpec, arch_spec_for
from .rules import build_kernel_rules

__all__ = ["ARCHITECTURES", "ArchSpec", "arch_spec_for", "build_kernel_rules"]
