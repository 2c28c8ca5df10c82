"""TransformerLens-style names (``blocks.1.attn.W_Q``) for HF Llama-like models.

Schedules and checkpoints are written in TransformerLens names; the model trained is the plain
HF model (or a DDP/peft-wrapped one: the base adapter strips those layers first). With
``tl_shapes: true`` checkpoints also use TransformerLens tensor layouts (per-head attention
weights, ``d_model``-first MLP and unembedding).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from fms_acceleration_adapters import StrategyAdapter, StrategyAdapterError

# (HF name pattern, TL name template); {i} is the layer index.
_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn.W_Q",
    "self_attn.k_proj.weight": "attn.W_K",
    "self_attn.v_proj.weight": "attn.W_V",
    "self_attn.o_proj.weight": "attn.W_O",
    "self_attn.q_proj.bias": "attn.b_Q",
    "self_attn.k_proj.bias": "attn.b_K",
    "self_attn.v_proj.bias": "attn.b_V",
    "self_attn.o_proj.bias": "attn.b_O",
    "mlp.gate_proj.weight": "mlp.W_gate",
    "mlp.up_proj.weight": "mlp.W_in",
    "mlp.down_proj.weight": "mlp.W_out",
    "input_layernorm.weight": "ln1.w",
    "post_attention_layernorm.weight": "ln2.w",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "embed.W_E",
    "model.norm.weight": "ln_final.w",
    "lm_head.weight": "unembed.W_U",
}
_HF_TO_TL = {v: k for k, v in _GLOBAL_NAMES.items()}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_TL_LAYER = {v: k for k, v in _LAYER_NAMES.items()}


def hf_to_tl(name: str) -> str:
    """TransformerLens name of an HF Llama parameter name (unknown names pass through)."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _LAYER_RE.match(name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"blocks.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return name


def tl_to_hf(name: str) -> str:
    """HF Llama name of a TransformerLens parameter name (unknown names pass through)."""
    if name in _HF_TO_TL:
        return _HF_TO_TL[name]
    match = _BLOCK_RE.match(name)
    if match and match.group(2) in _TL_LAYER:
        return f"model.layers.{match.group(1)}.{_TL_LAYER[match.group(2)]}"
    return name


class TransformerLensAdapter(StrategyAdapter):
    """Single-device adapter whose logical names are TransformerLens names."""

    strategy_name: ClassVar[str] = "transformerlens"
    wrapper_prefixes: ClassVar[tuple[str, ...]] = ("module.",)

    class Options(StrategyAdapter.Options):
        tl_shapes: bool = False
        """checkpoints use TransformerLens tensor layouts"""
        n_heads: int | None = None
        """attention heads (default: config)"""
        n_kv_heads: int | None = None
        """key/value heads (default: config)"""

    def on_before_init_client(self, model: torch.nn.Module) -> None:
        """Read head counts from the model config unless given as options."""
        config = getattr(model, "config", None)
        if self.cfg["n_heads"] is None:
            self.cfg["n_heads"] = getattr(config, "num_attention_heads", None)
        if self.cfg["n_kv_heads"] is None:
            self.cfg["n_kv_heads"] = getattr(config, "num_key_value_heads", self.cfg["n_heads"])

    def logical_param_name(self, actual_name: str) -> str:
        """Strip DDP/peft layers (base class), then rename HF -> TransformerLens."""
        return hf_to_tl(super().logical_param_name(actual_name))

    # ------------------------------------------------------------------ checkpoints
    def _heads(self, kind: str) -> int:
        n = self.cfg["n_heads"] if kind == "q" else self.cfg["n_kv_heads"]
        if n is None:
            raise StrategyAdapterError(
                "strategy_adapter_cfg.tl_shapes=true needs the head counts: set n_heads and "
                "n_kv_heads, or let the client call on_before_init_client(model) first"
            )
        return n

    def _to_tl(self, tl_name: str, w: torch.Tensor) -> torch.Tensor:
        kind = tl_name.rsplit(".", 1)[-1]
        if kind in ("W_Q", "W_K", "W_V"):  # [heads*d_head, d_model] -> [heads, d_model, d_head]
            heads = self._heads("q" if kind == "W_Q" else "kv")
            return w.reshape(heads, -1, w.shape[-1]).transpose(1, 2).contiguous()
        if kind == "W_O":  # [d_model, heads*d_head] -> [heads, d_head, d_model]
            return w.T.reshape(self._heads("q"), -1, w.shape[0]).contiguous()
        if kind in ("W_in", "W_gate", "W_out", "W_U"):
            return w.T.contiguous()
        return w

    def _from_tl(self, tl_name: str, w: torch.Tensor) -> torch.Tensor:
        kind = tl_name.rsplit(".", 1)[-1]
        if kind in ("W_Q", "W_K", "W_V"):
            return w.transpose(1, 2).reshape(-1, w.shape[1]).contiguous()
        if kind == "W_O":
            return w.reshape(-1, w.shape[-1]).T.contiguous()
        if kind in ("W_in", "W_gate", "W_out", "W_U"):
            return w.T.contiguous()
        return w

    def to_logical_state_dict(self, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        """TransformerLens names (and, with ``tl_shapes``, layouts)."""
        out = super().to_logical_state_dict(state_dict)
        if self.cfg["tl_shapes"]:
            out = {k: self._to_tl(k, v) for k, v in out.items()}
        return out

    def from_logical_state_dict(
        self, state_dict: Mapping[str, Any], model: torch.nn.Module
    ) -> dict[str, Any]:
        """HF names and layouts of ``model``."""
        if self.cfg["tl_shapes"]:
            state_dict = {k: self._from_tl(k, v) for k, v in state_dict.items()}
        return super().from_logical_state_dict(state_dict, model)
