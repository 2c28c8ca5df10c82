"""Fused operations and kernels for fms-acceleration."""
