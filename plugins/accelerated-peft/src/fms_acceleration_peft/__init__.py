"""Quantized LoRA plugins for fms-acceleration: bitsandbytes QLoRA and GPTQ-LoRA.

Importing this package registers both plugins (ids "bitsandbytes" and "auto_gptq"). GPTQ runs on
this package's own kernels, loader and quantizer; gptqmodel and auto_gptq are imported only when
a stanza asks for them.
"""

from .bnb_cpu_repack import (
    disable_cpu_weight_repacking,
    is_repacked_for_cpu,
    unpack_cpu_repacked,
)
from .framework_plugin_autogptq import GPTQ_STANZA, AutoGPTQAccelerationPlugin
from .framework_plugin_bnb import BNB_STANZA, BNBAccelerationPlugin
from .gptq_linear import GPTQLinear
from .kbit_training import prepare_for_kbit_training
from .peft_wrapping import PEFT_WRAPPING_SLOT

# Plugin ids other plugins (e.g. fused-ops-and-kernels' base_layer) may require as providers.
BNB_PLUGIN_ID = "bitsandbytes"
GPTQ_PLUGIN_ID = "auto_gptq"

__all__ = [
    "BNB_PLUGIN_ID",
    "BNB_STANZA",
    "GPTQ_PLUGIN_ID",
    "GPTQ_STANZA",
    "PEFT_WRAPPING_SLOT",
    "AutoGPTQAccelerationPlugin",
    "BNBAccelerationPlugin",
    "GPTQLinear",
    "disable_cpu_weight_repacking",
    "is_repacked_for_cpu",
    "prepare_for_kbit_training",
    "unpack_cpu_repacked",
]
