"""Patch rules that route every sparse MoE block of a model through the grouped GEMMs.

transformers 5: the block and its router stay as they are (so routing, the router-logits
recorders and the returned value are the model's own); the experts' forward is replaced.
transformers 4.55: the experts become a GroupedExperts (fused weights, original state dict; a
recorded module replacement that undo reverts) and the block's forward is replaced by one that
routes as the 4.55 block did and calls them. On both lines the experts' forward takes the
adapters peft put on them and, with expert parallelism, this process's shard of the experts;
peft's ParamWrappers around transformers 5 experts get a forward of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from fms_acceleration import ModelPatcher, ModelPatcherRule, ModelPatcherTrigger, compat

from ..grouped_experts import DOWN, GATE_UP, GroupedExperts, full_tensor
from ..kernels import ExpertLoRA, GateFn, experts_mlp, swiglu
from ..kernels.expert_parallel import ExpertShard, experts_mlp_ep, replicated_grad
from ..peft_adapters import is_param_wrapper, param_wrapper_loras, unwrap_param_wrappers
from .architectures import SOFTMAX_TOPK, MoeArchSpec, unwrap_model

RULE_PREFIX = "scattermoe"


def moe_blocks(model: torch.nn.Module, spec: MoeArchSpec) -> list[tuple[str, torch.nn.Module]]:
    """(name, block) of every sparse MoE block in the model."""
    cls = spec.block_class()
    return [(n, m) for n, m in unwrap_model(model).named_modules() if isinstance(m, cls)]


def route_legacy(
    spec: MoeArchSpec, block: torch.nn.Module, x: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(router logits, top-k weights, top-k experts) exactly as the 4.55 block computes them."""
    router = getattr(block, spec.router)
    if spec.routing == SOFTMAX_TOPK:
        logits = router(x)
        probs = F.softmax(logits, dim=1, dtype=torch.float)
        weights, index = torch.topk(probs, top_k, dim=-1)
        if spec.norm_topk_attr is None or getattr(block, spec.norm_topk_attr):
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(x.dtype), index
    logits = router.layer(x).float()
    top_logits, index = logits.topk(top_k, dim=1)
    return logits, torch.softmax(top_logits, dim=1).type_as(x), index


def _legacy_top_k(spec: MoeArchSpec, block: torch.nn.Module) -> int:
    return block.top_k if hasattr(block, "top_k") else getattr(block, spec.router).top_k


def legacy_block_forward(spec: MoeArchSpec) -> Callable[[torch.nn.Module], Callable]:
    """Forward builder for a 4.55 block whose experts are a GroupedExperts."""

    def build(block: torch.nn.Module) -> Callable:
        top_k = _legacy_top_k(spec, block)

        def forward(self: torch.nn.Module, hidden_states: torch.Tensor):
            batch, length, hidden = hidden_states.shape
            jitter = getattr(self, "jitter_noise", 0)
            if self.training and jitter > 0:
                noise = torch.empty_like(hidden_states).uniform_(1.0 - jitter, 1.0 + jitter)
                hidden_states = hidden_states * noise
            x = hidden_states.reshape(-1, hidden)
            logits, weights, index = route_legacy(spec, self, x, top_k)
            out = self.experts(x, index, weights)
            if spec.shared_expert:
                out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
            return out.reshape(batch, length, hidden), logits

        return forward

    return build


def experts_gate(experts: torch.nn.Module) -> GateFn:
    """The experts' `_apply_gate` (a kernel patched there, a model's own gating), or the SwiGLU
    Function where it is transformers' default act_fn(gate) * up with SiLU."""
    default = compat.default_experts_gate()
    own = getattr(type(experts), "_apply_gate", None)
    if default is not None and own is default and compat.is_silu(getattr(experts, "act_fn", None)):
        return swiglu
    return experts._apply_gate


def run_experts(
    experts: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    shard: ExpertShard | None = None,
    gate_up_loras: Sequence[ExpertLoRA] = (),
    down_loras: Sequence[ExpertLoRA] = (),
) -> torch.Tensor:
    """An experts module (transformers 5's or a GroupedExperts) through the grouped GEMMs, its
    gating through the module's `_apply_gate` (so a kernel patched there runs here too; see
    experts_gate)."""
    gate_up, down = experts.gate_up_proj, experts.down_proj
    gate_fn = experts_gate(experts)
    if shard is None:
        out = experts_mlp(
            hidden_states,
            top_k_index,
            top_k_weights,
            gate_up,
            down,
            gate_fn,
            gate_up_loras,
            down_loras,
        )
    else:
        out = experts_mlp_ep(
            hidden_states,
            top_k_index,
            top_k_weights,
            replicated_grad(gate_up.to_local(), shard),
            replicated_grad(down.to_local(), shard),
            gate_fn,
            shard,
            gate_up_loras,
            down_loras,
        )
    return out.to(hidden_states.dtype)


def _own_loras(experts: torch.nn.Module) -> tuple[list[ExpertLoRA], list[ExpertLoRA]]:
    return experts.expert_loras() if isinstance(experts, GroupedExperts) else ([], [])


def experts_forward(shard: ExpertShard | None) -> Callable[[torch.nn.Module], Callable]:
    """Forward builder for an experts module (4.55: the LoRA peft put on its per-expert
    Linears too)."""

    def build(experts: torch.nn.Module) -> Callable:
        def forward(
            self: torch.nn.Module,
            hidden_states: torch.Tensor,
            top_k_index: torch.Tensor,
            top_k_weights: torch.Tensor,
        ) -> torch.Tensor:
            gate_up_loras, down_loras = _own_loras(self)
            return run_experts(
                self, hidden_states, top_k_index, top_k_weights, shard, gate_up_loras, down_loras
            )

        return forward

    return build


def wrapped_experts_forward(shard: ExpertShard | None) -> Callable[[torch.nn.Module], Callable]:
    """Forward builder for peft's ParamWrappers around transformers 5 experts: the adapters
    run as grouped LoRA GEMMs instead of being merged into a (E, out, in) weight per call."""

    def build(outer: torch.nn.Module) -> Callable:
        experts, wrappers = unwrap_param_wrappers(outer)

        def forward(
            self: torch.nn.Module,
            hidden_states: torch.Tensor,
            top_k_index: torch.Tensor,
            top_k_weights: torch.Tensor,
        ) -> torch.Tensor:
            gate_up, down = (
                param_wrapper_loras(wrappers[name]) if name in wrappers else []
                for name in (GATE_UP, DOWN)
            )
            return run_experts(
                experts, hidden_states, top_k_index, top_k_weights, shard, gate_up, down
            )

        return forward

    return build


def _carry_back_experts(original: torch.nn.ModuleList, grouped: GroupedExperts) -> None:
    grouped.carry_back_into(original)


def _carry_back_parallel_experts(grouped: GroupedExperts, fused: str):
    def carry_back(original: torch.nn.Module, _gone: None) -> None:
        # the ParallelExperts shared its parameter with the GroupedExperts; it may have moved
        original.weight.data = full_tensor(getattr(grouped, fused)).detach()

    return carry_back


def swap_legacy_experts(
    patcher: ModelPatcher, spec: MoeArchSpec, name: str, block: torch.nn.Module
) -> GroupedExperts:
    """Replace a 4.55 block's experts with a GroupedExperts, recorded: undo puts the original
    modules back with the trained values."""
    rule_id = f"{RULE_PREFIX}.swap.{spec.block}"
    if spec.per_expert_names is not None:
        grouped = GroupedExperts.from_module_list(block.experts, spec.per_expert_names)
        patcher.replace_member(
            rule_id, block, "experts", grouped, where=name, carry_back=_carry_back_experts
        )
        return grouped
    grouped = GroupedExperts.from_parallel_experts(block)
    patcher.replace_member(rule_id, block, "experts", grouped, where=name)
    for module_name, fused in (("input_linear", GATE_UP), ("output_linear", DOWN)):
        carry_back = _carry_back_parallel_experts(grouped, fused)
        patcher.replace_member(rule_id, block, module_name, None, where=name, carry_back=carry_back)
    return grouped


def _one_of(modules: list[torch.nn.Module]) -> Callable[[torch.nn.Module], bool]:
    ids = {id(m) for m in modules}
    return lambda module: id(module) in ids


def experts_modules(model: torch.nn.Module, spec: MoeArchSpec) -> list[tuple[str, torch.nn.Module]]:
    """(name, experts module) of every MoE block, inside any peft ParamWrappers."""
    return [
        (f"{name}.experts", unwrap_param_wrappers(block.experts)[0])
        for name, block in moe_blocks(model, spec)
    ]


def build_moe_rules(
    model: torch.nn.Module, spec: MoeArchSpec, patcher: ModelPatcher
) -> list[ModelPatcherRule]:
    """The rules routing this model's MoE blocks through the grouped GEMMs. On 4.55 the
    experts of every block are first swapped for GroupedExperts (recorded on `patcher`)."""
    blocks = moe_blocks(model, spec)
    rules = []
    if not compat.fused_moe_experts():
        for name, block in blocks:
            if not isinstance(getattr(block, "experts", None), GroupedExperts):
                swap_legacy_experts(patcher, spec, name, block)
        rules.append(
            ModelPatcherRule(
                rule_id=f"{RULE_PREFIX}.block.{spec.block}",
                trigger=ModelPatcherTrigger(check=_one_of([b for _, b in blocks])),
                forward_builder=legacy_block_forward(spec),
            )
        )
    return rules


def experts_rule(
    model: torch.nn.Module, spec: MoeArchSpec, shard: ExpertShard | None
) -> ModelPatcherRule:
    """The grouped GEMMs in the forward of every block's experts module."""
    experts = [module for _, module in experts_modules(model, spec)]
    return ModelPatcherRule(
        rule_id=f"{RULE_PREFIX}.experts.{spec.block}",
        trigger=ModelPatcherTrigger(check=_one_of(experts)),
        forward_builder=experts_forward(shard),
    )


def peft_experts_rule(
    model: torch.nn.Module, spec: MoeArchSpec, shard: ExpertShard | None
) -> ModelPatcherRule | None:
    """The grouped LoRA GEMMs in the forward of peft's ParamWrappers around the experts
    (transformers 5 with target_parameters), or None when peft wrapped none."""
    outers = [
        block.experts for _, block in moe_blocks(model, spec) if is_param_wrapper(block.experts)
    ]
    if not outers:
        return None
    return ModelPatcherRule(
        rule_id=f"{RULE_PREFIX}.lora.{spec.block}",
        trigger=ModelPatcherTrigger(check=_one_of(outers)),
        forward_builder=wrapped_experts_forward(shard),
    )
