"""Patch rules built from an ArchSpec: a few generic pieces shared by every architecture."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from fms_acceleration import ModelPatcherRule, ModelPatcherTrigger
from fms_acceleration.compat import is_silu, transformers_version

from ..kernels import rms_norm, rope, swiglu, swiglu_packed
from .architectures import ArchSpec, unwrap_model
from .loss import (
    build_deferrable_lm_head,
    build_fast_loss_forward,
    build_fused_ce_forward,
    build_loss_function_property,
)

logger = logging.getLogger(__name__)

LOSS_FUNCTION = "transformers.modeling_utils.PreTrainedModel.loss_function"
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
    """Replace apply_rotary_pos_emb in the architecture's modeling module (none without one)."""
    if spec.rope_function is None:
        return []
    return [
        ModelPatcherRule(
            rule_id=f"foak.rope.{spec.causal_lm}",
            import_and_maybe_reload=(spec.rope_function, rope, None),
        )
    ]


def fast_loss_rules(model: torch.nn.Module) -> list[ModelPatcherRule]:
    """This model's ForCausalLMLoss becomes fast_causal_lm_loss (logits into the CE kernel).

    PreTrainedModel.loss_function answers the fast loss only inside this model's forward, so
    other models and transformers' LOSS_MAPPING (which the Trainer inspects) are unchanged.
    """
    from transformers.modeling_utils import PreTrainedModel

    previous = PreTrainedModel.__dict__["loss_function"]
    causal_lm = unwrap_model(model)
    return [
        ModelPatcherRule(
            rule_id="foak.loss.loss_function",
            import_and_maybe_reload=(
                LOSS_FUNCTION,
                build_loss_function_property(previous),
                None,
            ),
            applies_to_any_model=True,  # PreTrainedModel's, answering for this model only
        ),
        ModelPatcherRule(
            rule_id="foak.loss.cross_entropy",
            trigger=ModelPatcherTrigger(check=_is(causal_lm)),
            forward_builder=build_fast_loss_forward,
        ),
    ]


DENSE_ROLES = ("gate_proj", "up_proj", "down_proj")


def _swiglu_mlp_builder(
    roles: tuple[str, str, str],
) -> Callable[[torch.nn.Module], Callable[..., torch.Tensor]]:
    gate, up, down = roles

    def build(module: torch.nn.Module) -> Callable[..., torch.Tensor]:
        def forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
            return getattr(self, down)(swiglu(getattr(self, gate)(x), getattr(self, up)(x)))

        return forward

    return build


def _is_swiglu_mlp(
    cls: type[torch.nn.Module], roles: tuple[str, str, str] = DENSE_ROLES
) -> Callable[[torch.nn.Module], bool]:
    return lambda module: (
        isinstance(module, cls)
        and is_silu(getattr(module, "act_fn", None))
        and all(hasattr(module, role) for role in roles)
    )


def _swiglu_apply_gate(previous: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def apply_gate(self: torch.nn.Module, gate_up_out: torch.Tensor) -> torch.Tensor:
        if is_silu(getattr(self, "act_fn", None)) and getattr(self, "is_concatenated", True):
            return swiglu_packed(gate_up_out)
        return previous(self, gate_up_out)

    return apply_gate


def _mlp_rule(name: str, cls: type[torch.nn.Module], roles: tuple[str, str, str]):
    return ModelPatcherRule(
        rule_id=f"foak.swiglu.{name}",
        trigger=ModelPatcherTrigger(check=_is_swiglu_mlp(cls, roles)),
        forward_builder=_swiglu_mlp_builder(roles),
    )


def swiglu_rules(spec: ArchSpec) -> list[ModelPatcherRule]:
    """SwiGLU kernel in the dense MLPs (forward), the MoE experts' gating (_apply_gate, 5.x) or
    the per-expert MLPs (forward, 4.x).

    MoE experts run _apply_gate in transformers' batched_mm / grouped_mm implementations (the
    default); the eager per-expert loop computes silu(gate) * up inline and stays as it is.
    """
    rules = []
    mlp = spec.mlp_class()  # None exactly when spec.mlp is unset
    if spec.mlp and mlp is not None:
        rules.append(_mlp_rule(spec.mlp, mlp, DENSE_ROLES))
    experts = spec.experts_class()
    expert_mlp = spec.expert_mlp_class()  # found only when spec.expert_mlp is set
    if experts is None and expert_mlp is not None and spec.expert_mlp is not None:
        rules.append(_mlp_rule(spec.expert_mlp[0], expert_mlp, spec.expert_mlp[1]))
    elif experts is not None and spec.experts_gate is not None:  # the class implies the gate
        previous = experts.__dict__.get("_apply_gate")
        if previous is None:
            logger.warning(
                "fused_ops_and_kernels: %s has no _apply_gate in transformers %s; "
                "its experts keep their own SwiGLU",
                spec.experts,
                transformers_version(),
            )
        else:
            rules.append(
                ModelPatcherRule(
                    rule_id=f"foak.swiglu.{spec.experts}",
                    import_and_maybe_reload=(
                        spec.experts_gate,
                        _swiglu_apply_gate(previous),
                        None,
                    ),
                )
            )
    return rules


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
    fast_swiglu: bool = True,
) -> list[ModelPatcherRule]:
    """All kernel rules the configuration asks for (fused LoRA rules are built elsewhere).

    Fused LoRA rules registered after these replace the SwiGLU MLP forward again and keep it
    as their fallback.
    """
    rules: list[ModelPatcherRule] = []
    if fast_loss == FUSED_CE:
        rules += fused_linear_ce_rules(model)
    elif fast_loss:
        rules += fast_loss_rules(model)
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
    if fast_swiglu:
        swiglu = swiglu_rules(spec) if spec.has_swiglu else []
        if swiglu:
            rules += swiglu
        else:
            skipped.append("fast_swiglu")
    if skipped:
        logger.warning(
            "fused_ops_and_kernels: %s do(es) not apply to %s in transformers %s (it has no "
            "RMSNorm / rotary embedding / SwiGLU MLP there); the other kernels are patched",
            ", ".join(skipped),
            spec.causal_lm,
            transformers_version(),
        )
    return rules
