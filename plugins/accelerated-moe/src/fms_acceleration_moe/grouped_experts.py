"""The experts of a transformers 4.55 MoE block as one module of fused 3-D weights.

transformers 4.55 keeps Mixtral / Qwen-MoE / OLMoE experts as a ModuleList of per-expert MLPs
and Granite's as two `ParallelExperts`; grouped GEMMs need each projection as one (E, out, in)
tensor. GroupedExperts holds them in transformers 5's layout (gate_up_proj (E, 2I, H), gate
half first; down_proj (E, H, I)) and takes transformers 5's experts call, so one block forward
serves both lines. Its state dict is written and read in the model's original 4.55 layout, so
`save_pretrained`, the Trainer's checkpoints and peft adapters load into the unpatched model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from .kernels import experts_mlp

GATE_UP = "gate_up_proj"
DOWN = "down_proj"


class GroupedExperts(torch.nn.Module):
    """Fused expert weights with the original per-expert (or ParallelExperts) state dict."""

    def __init__(
        self,
        gate_up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        act_fn: Callable[[torch.Tensor], torch.Tensor],
        per_expert_names: tuple[str, str, str] | None,
    ) -> None:
        super().__init__()
        self.gate_up_proj = torch.nn.Parameter(gate_up_proj)
        self.down_proj = torch.nn.Parameter(down_proj)
        self.act_fn = act_fn
        self.num_experts = gate_up_proj.shape[0]
        self.per_expert_names = per_expert_names
        self._register_state_dict_hook(_write_original_layout)
        self._register_load_state_dict_pre_hook(_read_original_layout, with_module=True)

    @classmethod
    def from_module_list(
        cls, experts: torch.nn.ModuleList, names: tuple[str, str, str]
    ) -> GroupedExperts:
        """Stack per-expert (gate, up, down) Linears into fused weights (copies them once)."""
        gate, up, down = names
        with torch.no_grad():
            gate_up = torch.stack(
                [torch.cat([getattr(e, gate).weight, getattr(e, up).weight]) for e in experts]
            )
            down_w = torch.stack([getattr(e, down).weight for e in experts])
        act = experts[0].act_fn
        return cls(gate_up, down_w, act, names)

    @classmethod
    def from_parallel_experts(cls, block: torch.nn.Module) -> GroupedExperts:
        """Take Granite's ParallelExperts weights as they are (same layout, no copy)."""
        return cls(
            block.input_linear.weight.data, block.output_linear.weight.data, block.activation, None
        )

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """transformers 5's experts call: (N, H) tokens, their (N, k) experts and weights."""
        return experts_mlp(
            hidden_states,
            top_k_index,
            top_k_weights,
            self.gate_up_proj,
            self.down_proj,
            self.act_fn,
        )


def original_keys(
    per_expert_names: tuple[str, str, str] | None, num_experts: int, prefix: str
) -> dict[str, list[str]]:
    """Fused key (relative to `prefix`, the experts' own prefix) -> the 4.55 keys it stands for,
    in stacking order (gate, up of expert 0, gate, up of expert 1, ...)."""
    if per_expert_names is None:
        # Granite: the experts live beside the router, as input_linear / output_linear
        block = prefix[: -len("experts.")]
        return {
            GATE_UP: [f"{block}input_linear.weight"],
            DOWN: [f"{block}output_linear.weight"],
        }
    gate, up, down = per_expert_names
    experts = range(num_experts)
    return {
        GATE_UP: [f"{prefix}{j}.{n}.weight" for j in experts for n in (gate, up)],
        DOWN: [f"{prefix}{j}.{down}.weight" for j in experts],
    }


def split_fused(fused: str, tensor: torch.Tensor, originals: list[str]) -> dict[str, torch.Tensor]:
    """A fused (E, out, in) weight as the original tensors named by `originals`."""
    if len(originals) == 1:
        return {originals[0]: tensor}
    parts = tensor.chunk(2, dim=1) if fused == GATE_UP else (tensor,)
    return dict(zip(originals, [p[j] for j in range(tensor.shape[0]) for p in parts]))


def join_originals(fused: str, pieces: list[torch.Tensor]) -> torch.Tensor:
    """The fused (E, out, in) weight from the original tensors, in original_keys order."""
    if len(pieces) == 1:
        return pieces[0]
    if fused == GATE_UP:
        return torch.stack([torch.cat(pair) for pair in zip(pieces[0::2], pieces[1::2])])
    return torch.stack(pieces)


def _write_original_layout(
    module: GroupedExperts, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    keys = original_keys(module.per_expert_names, module.num_experts, prefix)
    for fused, originals in keys.items():
        tensor = state_dict.get(prefix + fused)
        # expert-parallel shards (DTensors) stay fused: checkpoint_utils converts them offline
        if tensor is None or isinstance(tensor, DTensor):
            continue
        del state_dict[prefix + fused]
        state_dict.update(split_fused(fused, tensor, originals))


def _read_original_layout(
    module: GroupedExperts,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    keys = original_keys(module.per_expert_names, module.num_experts, prefix)
    for fused, originals in keys.items():
        if all(k in state_dict for k in originals):
            state_dict[prefix + fused] = join_originals(
                fused, [state_dict.pop(k) for k in originals]
            )
