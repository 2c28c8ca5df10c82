"""Mixture-of-experts acceleration for fms-acceleration: grouped expert GEMMs with fused
gather/scatter (Triton on GPU, PyTorch on CPU), expert parallelism, checkpoint conversion.

Importing the package registers ScatterMoEAccelerationPlugin; the kernels live in
fms_acceleration_moe.kernels, which does not import the framework.
"""

from .framework_plugin_scattermoe import ScatterMoEAccelerationPlugin

__all__ = ["ScatterMoEAccelerationPlugin"]
