"""Patch rules that route every sparse MoE block of a model through the grouped GEMMs.

transformers 5: the block and its router stay as they are (so routing, the router-logits
recorders and the returned value are the model's own); the experts' forward is replaced.
transformers 4.55: the experts become a GroupedExperts (fused weights, original state dict) and
the block's forward is replaced by one that routes as the 4.55 block did and calls them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from fms_acceleration import ModelPatcherRule, ModelPatcherTrigger, compat

from ..grouped_experts import GroupedExperts
from ..kernels import experts_mlp
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


def _fused_experts_forward(experts: torch.nn.Module) -> Callable:
    def forward(
        self: torch.nn.Module,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        up, down = self.gate_up_proj, self.down_proj
        out = experts_mlp(hidden_states, top_k_index, top_k_weights, up, down, self.act_fn)
        return out.to(hidden_states.dtype)

    return forward


def _swap_legacy_experts(spec: MoeArchSpec, block: torch.nn.Module) -> None:
    if spec.per_expert_names is not None:
        block.experts = GroupedExperts.from_module_list(block.experts, spec.per_expert_names)
        return
    block.experts = GroupedExperts.from_parallel_experts(block)
    del block.input_linear, block.output_linear


def _one_of(modules: list[torch.nn.Module]) -> Callable[[torch.nn.Module], bool]:
    ids = {id(m) for m in modules}
    return lambda module: id(module) in ids


def build_moe_rules(model: torch.nn.Module, spec: MoeArchSpec) -> list[ModelPatcherRule]:
    """The rules routing this model's MoE blocks through the grouped GEMMs (4.55: after the
    experts of every block have been swapped for GroupedExperts, which happens here)."""
    blocks = [block for _, block in moe_blocks(model, spec)]
    if compat.fused_moe_experts():
        return [
            ModelPatcherRule(
                rule_id=f"{RULE_PREFIX}.experts.{spec.block}",
                trigger=ModelPatcherTrigger(check=_one_of([b.experts for b in blocks])),
                forward_builder=_fused_experts_forward,
            )
        ]
    for block in blocks:
        if not isinstance(block.experts if hasattr(block, "experts") else None, GroupedExperts):
            _swap_legacy_experts(spec, block)
    return [
        ModelPatcherRule(
            rule_id=f"{RULE_PREFIX}.block.{spec.block}",
            trigger=ModelPatcherTrigger(check=_one_of(blocks)),
            forward_builder=legacy_block_forward(spec),
        )
    ]
