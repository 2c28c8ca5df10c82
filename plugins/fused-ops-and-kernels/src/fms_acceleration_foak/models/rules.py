"""Patch rules built from an ArchSpec: a few generic pieces shared by every architecture."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from fms_acceleration import ModelPatcherRule, ModelPatcherTrigger

from ..kernels import rms_norm, rope
from .architectures import ArchSpec, unwrap_model
from .loss import build_deferrable_lm_head, build_fused_ce_forward, fast_fixed_cross_entropy

logger = logging.getLogger(__name__)

FIXED_CROSS_ENTROPY = "transformers.loss.loss_utils.fixed_cross_entropy"
FUSED_CE = "fused_ce_liger"


def _rms_norm_forward(module: torch.nn.Module) -> Callable[..., torch.Tensor]:
    eps = getattr(module, "variance_epsilon", None)
    if eps is None:
        eps = module.eps

    def forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        # read the weight at call time: FSDP / device moves may replace the Parameter object
        return rms_norm(hidden_states, self.weight, eps)

    return forward


def _is(target: torch.nn.Module) -> Callable[[torch.nn.Module], bool]:
    return lambda module: module is target


def rms_norm_rules(spec: ArchSpec) -> list[ModelPatcherRule]:
    """Replace the forward of every RMSNorm instance of this architecture."""
    return [
        ModelPatcherRule(
            rule_id=f"foak.rms_norm.{spec.rms_norm}",
            trigger=ModelPatcherTrigger(check=spec.rms_norm_class()),
            forward_builder=_rms_norm_forward,
        )
    ]


def rope_rules(spec: ArchSpec) -> list[ModelPatcherRule]:
    """Replace apply_rotary_pos_emb in the architecture's modeling module."""
    return [
        ModelPatcherRule(
            rule_id=f"foak.rope.{spec.causal_lm}",
            import_and_maybe_reload=(spec.rope_function, rope, None),
        )
    ]


def fast_loss_rules() -> list[ModelPatcherRule]:
    """Route transformers' loss mapping (ForCausalLMLoss & co.) through the CE kernel.

    Only fixed_cross_entropy is swapped, so LOSS_MAPPING keeps ForCausalLMLoss itself (the
    Trainer inspects it to count num_items_in_batch over shifted labels).
    """
    return [
        ModelPatcherRule(
            rule_id="foak.loss.cross_entropy",
            import_and_maybe_reload=(FIXED_CROSS_ENTROPY, fast_fixed_cross_entropy, None),
            applies_to_any_model=True,
        )
    ]


def fused_linear_ce_rules(model: torch.nn.Module) -> list[ModelPatcherRule]:
    """Run the causal LM's own forward with lm_head deferred, then fused linear CE."""
    causal_lm = unwrap_model(model)
    lm_head = causal_lm.get_output_embeddings()
    return [
        ModelPatcherRule(
            rule_id="foak.loss.fused_linear_ce.lm_head",
            trigger=ModelPatcherTrigger(check=_is(lm_head)),
            forward_builder=build_deferrable_lm_head,
        ),
        ModelPatcherRule(
            rule_id="foak.loss.fused_linear_ce.forward",
            trigger=ModelPatcherTrigger(check=_is(causal_lm)),
            forward_builder=build_fused_ce_forward,
        ),
    ]


def build_kernel_rules(
    model: torch.nn.Module,
    spec: ArchSpec,
    fast_loss: bool | str,
    fast_rms_layernorm: bool,
    fast_rope_embeddings: bool,
) -> list[ModelPatcherRule]:
    """All kernel rules the configuration asks for (fused LoRA rules are built elsewhere)."""
    rules: list[ModelPatcherRule] = []
    if fast_loss == FUSED_CE:
        rules += fused_linear_ce_rules(model)
    elif fast_loss:
        rules += fast_loss_rules()
    skipped = []
    if fast_rms_layernorm:
        if spec.rms_norm:
            rules += rms_norm_rules(spec)
        else:
            skipped.append("fast_rms_layernorm")
    if fast_rope_embeddings:
        if spec.rope:
            rules += rope_rules(spec)
        else:
            skipped.append("fast_rope_embeddings")
    if skipped:
        logger.warning(
            "fused_ops_and_kernels: %s do(es) not apply to %s (no RMSNorm / rotary embedding); "
            "only the loss is patched",
            ", ".join(skipped),
            spec.causal_lm,
        )
    return rules
