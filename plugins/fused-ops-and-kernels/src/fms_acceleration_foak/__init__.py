"""Fused operations and kernels for fms-acceleration.

Importing the package registers FastKernelsAccelerationPlugin with the framework; the kernels
themselves live in fms_acceleration_foak.kernels, which does not import the framework.
"""

from .framework_plugin_fast_kernels import FastKernelsAccelerationPlugin

__all__ = ["FastKernelsAccelerationPlugin"]
