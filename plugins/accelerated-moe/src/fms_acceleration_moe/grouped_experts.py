"""The experts of a transformers 4.55 MoE block as one module of fused 3-D weights.

transformers 4.55 keeps Mixtral / Qwen-MoE / OLMoE experts as a ModuleList of per-expert MLPs
and Granite's as two `ParallelExperts`; grouped GEMMs need each projection as one (E, out, in)
tensor. GroupedExperts holds them in transformers 5's layout (gate_up_proj (E, 2I, H), gate
half first; down_proj (E, H, I)) and takes transformers 5's experts call, so one block forward
serves both lines.

The per-expert MLPs stay inside it as children `0` ... `E-1`, with their Linear weights taken
out (the fused tensors hold the values). So the module tree keeps the original names: peft's
`target_modules` (`w1`, `gate_proj`, ...) wraps the per-expert Linears as on the original
model, their LoRA weights keep the original keys, and the grouped GEMMs read them. The state
dict is written and read in the model's original 4.55 layout, so `save_pretrained`, the
Trainer's checkpoints and peft adapters load into the unpatched model; undoing the swap puts
the trained values back into the per-expert Linears.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from fms_acceleration import compat

from .kernels import ExpertLoRA, experts_mlp, gated, swiglu
from .peft_adapters import per_expert_loras

GATE_UP = "gate_up_proj"
DOWN = "down_proj"
BASE_LAYER = "base_layer"


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a tensor that may be a DTensor (expert or FSDP shards)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def base_linear(module: torch.nn.Module) -> torch.nn.Module:
    """The nn.Linear inside a peft LoRA layer (or the module itself)."""
    return getattr(module, BASE_LAYER, module)


def _parameter(tensor: torch.Tensor) -> torch.nn.Parameter:
    return tensor if isinstance(tensor, torch.nn.Parameter) else torch.nn.Parameter(tensor)


def _take_out_weight(linear: torch.nn.Module) -> None:
    # an empty stand-in keeps device and dtype (peft reads them when it wraps the Linear)
    weight = linear.weight
    del linear.weight
    linear.weight = weight.detach().new_empty(0)


def _put_back_weight(linear: torch.nn.Module, value: torch.Tensor, requires_grad: bool) -> None:
    if "weight" not in linear._parameters:
        del linear.weight
    linear.weight = torch.nn.Parameter(value.detach().clone(), requires_grad=requires_grad)


class GroupedExperts(torch.nn.Module):
    """Fused expert weights with the original per-expert (or ParallelExperts) state dict."""

    def __init__(
        self,
        gate_up_proj: torch.Tensor | torch.nn.Parameter,
        down_proj: torch.Tensor | torch.nn.Parameter,
        act_fn: Callable[[torch.Tensor], torch.Tensor],
        per_expert_names: tuple[str, str, str] | None,
        shells: Sequence[torch.nn.Module] = (),
    ) -> None:
        super().__init__()
        self.gate_up_proj = _parameter(gate_up_proj)
        self.down_proj = _parameter(down_proj)
        self.act_fn = act_fn
        self.num_experts = gate_up_proj.shape[0]
        self.per_expert_names = per_expert_names
        for index, shell in enumerate(shells):
            self.add_module(str(index), shell)
        self._register_state_dict_hook(_write_original_layout)
        self._register_load_state_dict_pre_hook(_read_original_layout, with_module=True)

    @classmethod
    def from_module_list(
        cls, experts: torch.nn.ModuleList, names: tuple[str, str, str]
    ) -> GroupedExperts:
        """Stack per-expert (gate, up, down) Linears into fused weights; the Linears stay as
        children without their weights."""
        gate, up, down = names
        first = base_linear(getattr(experts[0], gate)).weight
        with torch.no_grad():
            gate_up = torch.stack(
                [
                    torch.cat([base_linear(getattr(e, n)).weight for n in (gate, up)])
                    for e in experts
                ]
            )
            down_w = torch.stack([base_linear(getattr(e, down)).weight for e in experts])
        for expert in experts:
            for name in names:
                _take_out_weight(base_linear(getattr(expert, name)))
        grouped = cls(
            torch.nn.Parameter(gate_up, requires_grad=first.requires_grad),
            torch.nn.Parameter(down_w, requires_grad=first.requires_grad),
            experts[0].act_fn,
            names,
            shells=list(experts),
        )
        return grouped

    @classmethod
    def from_parallel_experts(cls, block: torch.nn.Module) -> GroupedExperts:
        """Take Granite's ParallelExperts parameters themselves (same layout, shared)."""
        return cls(block.input_linear.weight, block.output_linear.weight, block.activation, None)

    def carry_back_into(self, experts: torch.nn.ModuleList) -> None:
        """Put the fused values back into the per-expert Linears (undoing the swap)."""
        gate, up, down = self.per_expert_names or ("", "", "")
        gate_up, down_w = full_tensor(self.gate_up_proj), full_tensor(self.down_proj)
        requires_grad = self.gate_up_proj.requires_grad
        for j, expert in enumerate(experts):
            gate_w, up_w = gate_up[j].chunk(2)
            for name, value in ((gate, gate_w), (up, up_w), (down, down_w[j])):
                _put_back_weight(base_linear(getattr(expert, name)), value, requires_grad)

    def _apply_gate(self, gate_up_out: torch.Tensor) -> torch.Tensor:
        """act_fn(gate) * up of the packed up projection (transformers 5's experts hook)."""
        if compat.is_silu(self.act_fn):
            return swiglu(gate_up_out)
        return gated(self.act_fn)(gate_up_out)

    def expert_loras(self) -> tuple[list[ExpertLoRA], list[ExpertLoRA]]:
        """The LoRA updates peft put on the per-expert Linears: (gate_up, down)."""
        if self.per_expert_names is None:
            return [], []
        gate, up, down = self.per_expert_names
        width = self.gate_up_proj.shape[1] // 2
        experts = [self._modules[str(j)] for j in range(self.num_experts)]

        def layers(name: str) -> list[torch.nn.Module]:
            return [getattr(expert, name) for expert in experts]

        gate_up = per_expert_loras(layers(gate), (0, width)) + per_expert_loras(
            layers(up), (width, 2 * width)
        )
        return gate_up, per_expert_loras(layers(down), None)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """transformers 5's experts call: (N, H) tokens, their (N, k) experts and weights."""
        gate_up_loras, down_loras = self.expert_loras()
        return experts_mlp(
            hidden_states,
            top_k_index,
            top_k_weights,
            self.gate_up_proj,
            self.down_proj,
            self._apply_gate,
            gate_up_loras,
            down_loras,
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


def _module_keys(module: GroupedExperts, prefix: str) -> dict[str, list[str]]:
    """original_keys as this module's children are named now: a per-expert Linear that peft
    wrapped keeps its weight under `<name>.base_layer.weight`, as on the original model."""
    keys = original_keys(module.per_expert_names, module.num_experts, prefix)
    if module.per_expert_names is None:
        return keys
    out: dict[str, list[str]] = {}
    for fused, names in keys.items():
        out[fused] = []
        for key in names:
            path = key[len(prefix) : -len(".weight")]
            wrapped = hasattr(module.get_submodule(path), BASE_LAYER)
            out[fused].append(f"{prefix}{path}.{BASE_LAYER}.weight" if wrapped else key)
    return out


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
    keys = _module_keys(module, prefix)
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
    for keys in (
        _module_keys(module, prefix),
        original_keys(module.per_expert_names, module.num_experts, prefix),
    ):
        for fused, originals in keys.items():
            if all(k in state_dict for k in originals):
                state_dict[prefix + fused] = join_originals(
                    fused, [state_dict.pop(k) for k in originals]
                )
