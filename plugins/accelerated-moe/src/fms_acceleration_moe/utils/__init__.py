"""Checkpoint conversion and the reference's state-dict helpers."""

from .checkpoint_utils import recover_safetensors_from_dcp
from .scattermoe_state_dict import get_checkpoint_meta_from_sharded_safetensor

__all__ = ["get_checkpoint_meta_from_sharded_safetensor", "recover_safetensors_from_dcp"]
