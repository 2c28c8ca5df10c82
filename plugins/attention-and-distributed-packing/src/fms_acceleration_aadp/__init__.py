"""Padding-free training and multipack sampling (plugin package fms-acceleration-aadp)."""

from .flattening import FlatteningCollator, PaddingFreeDataError, is_packed
from .framework_plugin_multipack import MultipackDataloaderAccelerationPlugin, MultipackOptions
from .framework_plugin_padding_free import (
    PackedBatchError,
    PaddingFreeAccelerationPlugin,
    PaddingFreeOptions,
)
from .multipack import MultipackBatchSampler, MultipackDataLoader, MultipackError, pack_epoch

__all__ = [
    "FlatteningCollator",
    "MultipackBatchSampler",
    "MultipackDataLoader",
    "MultipackDataloaderAccelerationPlugin",
    "MultipackError",
    "MultipackOptions",
    "PackedBatchError",
    "PaddingFreeAccelerationPlugin",
    "PaddingFreeDataError",
    "PaddingFreeOptions",
    "is_packed",
    "pack_epoch",
]
