"""Strategy adapters: per-distributed-strategy naming, schedule checks and checkpoint keys."""

from .base import AdapterOptions, StrategyAdapter
from .ddp import DDPStrategyAdapter
from .errors import StrategyAdapterError
from .fsdp import FSDPStrategyAdapter
from .peft import PeftStrategyAdapter
from .peft_names import peft_logical_name
from .registry import (
    BUILTIN_ADAPTERS,
    ENTRY_POINT_GROUP,
    StrategyAdapterWarning,
    adapter_name_for,
    check_custom_strategy_adapters,
    discover_strategy_adapters,
    distributed_type_of,
    has_strategy_adapter,
    resolve_strategy_adapter,
    select_strategy_adapter,
    strategy_adapter_class,
    strategy_adapter_entry_points,
    strategy_names,
)

__all__ = [
    "BUILTIN_ADAPTERS",
    "ENTRY_POINT_GROUP",
    "AdapterOptions",
    "DDPStrategyAdapter",
    "FSDPStrategyAdapter",
    "PeftStrategyAdapter",
    "StrategyAdapter",
    "StrategyAdapterError",
    "StrategyAdapterWarning",
    "adapter_name_for",
    "check_custom_strategy_adapters",
    "discover_strategy_adapters",
    "distributed_type_of",
    "has_strategy_adapter",
    "peft_logical_name",
    "resolve_strategy_adapter",
    "select_strategy_adapter",
    "strategy_adapter_class",
    "strategy_adapter_entry_points",
    "strategy_names",
]
