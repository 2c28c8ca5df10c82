"""Which modules of a peft-wrapped model take the fused LoRA path, as ModelPatcher rules."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from peft.tuners.lora import LoraLayer

from fms_acceleration import AccelerationPluginConfigError, ModelPatcherRule, ModelPatcherTrigger
from fms_acceleration.compat import is_silu

from ..models.architectures import ARCHITECTURES
from .base_layers import BASE_LAYER_KINDS, base_layer_kind, missing_provider_reason
from .forwards import FusedProjectionGroup, fused_linear_forward, fused_mlp_forward
from .peft_layers import LoRAProjectionSource, active_adapter, lora_skip_reason

logger = logging.getLogger(__name__)

BASE_LAYER_PATH = "plugins.peft.quantization.fused_ops_and_kernels.base_layer"
QKV_ROLES = ("q_proj", "k_proj", "v_proj")
OUT_ROLE = "o_proj"
MLP_ROLES = ("gate_proj", "up_proj", "down_proj")
RULE_QKV = "fused_lora_qkv"
RULE_LINEAR = "fused_lora_linear"
RULE_MLP = "fused_lora_mlp"


# Model types whose attention fused LoRA knows (ArchSpec.attention); their dense MLP, if any, is
# ArchSpec.mlp. MoE experts are fused 3-D parameters in transformers 5 (no per-expert nn.Linear
# for LoRA to wrap), so they stay unfused.
FUSED_LORA_MODEL_TYPES: tuple[str, ...] = tuple(
    sorted(t for t, spec in ARCHITECTURES.items() if spec.attention)
)


@dataclass
class FusedLoRAPlan:
    """What fused LoRA will patch in one model: module names per rule, and what it leaves alone."""

    model_type: str
    base_layer: str
    fused: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    qkv: dict[torch.nn.Module, tuple[FusedProjectionGroup, str]] = field(default_factory=dict)
    linear: dict[torch.nn.Module, LoRAProjectionSource] = field(default_factory=dict)
    mlp: dict[torch.nn.Module, tuple[LoRAProjectionSource, ...]] = field(default_factory=dict)

    def summary(self) -> str:
        """One line per rule (count of modules) and per distinct skip reason."""
        lines = [f"fused LoRA on {self.model_type} over {self.base_layer} layers:"]
        lines += [f"  {rule}: {len(names)} modules" for rule, names in self.fused.items()]
        reasons: dict[str, int] = {}
        for reason in self.skipped.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        lines += [f"  not fused ({n}): {reason}" for reason, n in reasons.items()]
        return "\n".join(lines)

    def _fuse(self, rule: str, name: str) -> None:
        self.fused.setdefault(rule, []).append(name)


def _model_type(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise AccelerationPluginConfigError(
            f"fused_lora needs a transformers model with a config; got {type(model).__name__}"
        )
    return model_type


def _check_base_layers(lora: list[tuple[str, LoraLayer]], base_layer: str) -> None:
    if base_layer not in BASE_LAYER_KINDS:
        raise AccelerationPluginConfigError(
            f"{BASE_LAYER_PATH}: {base_layer!r} is not one of {list(BASE_LAYER_KINDS)}"
        )
    if not lora:
        raise AccelerationPluginConfigError(
            "fused_lora needs a peft LoRA-wrapped model (peft.get_peft_model, or the "
            "accelerated-peft plugin); this model has no LoRA layer on its attention or MLP "
            f"projections {[*QKV_ROLES, OUT_ROLE, *MLP_ROLES]}"
        )
    for name, module in lora:
        missing = missing_provider_reason(module.get_base_layer())
        if missing is not None:
            raise AccelerationPluginConfigError(
                f"{BASE_LAYER_PATH} is {base_layer!r}, but the base layer of {name}: {missing}"
            )
    kinds = [(n, base_layer_kind(m.get_base_layer())) for n, m in lora]
    wrong = [(n, kind) for n, kind in kinds if kind != base_layer]
    if wrong:
        shown = ", ".join(f"{n} ({kind})" for n, kind in wrong[:3])
        raise AccelerationPluginConfigError(
            f"{BASE_LAYER_PATH} is {base_layer!r} but {len(wrong)} LoRA layers wrap other base "
            f"layers, e.g. {shown}; set base_layer to what the model was loaded with"
        )


def _source(plan: FusedLoRAPlan, name: str, module: torch.nn.Module) -> LoRAProjectionSource | None:
    reason = lora_skip_reason(module)
    if reason is not None:
        plan.skipped[name] = reason
        return None
    return LoRAProjectionSource(module, active_adapter(module))


def _plan_attention(plan: FusedLoRAPlan, name: str, attn: torch.nn.Module) -> None:
    qkv = {}
    for role in QKV_ROLES:
        child = getattr(attn, role, None)
        if isinstance(child, LoraLayer) and (src := _source(plan, f"{name}.{role}", child)):
            qkv[role] = (child, src)
    if len(qkv) == 1:  # a lone adapted projection (e.g. LoRA on q_proj only): fuse it alone
        ((role, (child, src)),) = qkv.items()
        plan.linear[child] = src
        plan._fuse(RULE_LINEAR, f"{name}.{role}")
    elif qkv:
        group = FusedProjectionGroup({r: s for r, (_, s) in qkv.items()}, {})
        for role, (child, _) in qkv.items():
            plan.qkv[child] = (group, role)
            plan._fuse(RULE_QKV, f"{name}.{role}")
    out = getattr(attn, OUT_ROLE, None)
    if isinstance(out, LoraLayer) and (src := _source(plan, f"{name}.{OUT_ROLE}", out)):
        plan.linear[out] = src
        plan._fuse(RULE_LINEAR, f"{name}.{OUT_ROLE}")


def _plan_mlp(plan: FusedLoRAPlan, name: str, mlp: torch.nn.Module) -> None:
    sources = {}
    for role in MLP_ROLES:
        child = getattr(mlp, role, None)
        if isinstance(child, LoraLayer) and (src := _source(plan, f"{name}.{role}", child)):
            sources[role] = (child, src)
    if len(sources) == len(MLP_ROLES) and is_silu(getattr(mlp, "act_fn", None)):
        plan.mlp[mlp] = tuple(src for _, src in sources.values())
        plan._fuse(RULE_MLP, name)
        return
    if len(sources) == len(MLP_ROLES):
        plan.skipped[name] = f"MLP activation {type(mlp.act_fn).__name__} is not SiLU"
    for role, (child, src) in sources.items():
        plan.linear[child] = src
        plan._fuse(RULE_LINEAR, f"{name}.{role}")


def plan_fused_lora(model: torch.nn.Module, base_layer: str) -> FusedLoRAPlan:
    """Decide which q/k/v/o and MLP modules of a peft LoRA model take the fused path."""
    model_type = _model_type(model)
    if model_type not in FUSED_LORA_MODEL_TYPES:
        raise AccelerationPluginConfigError(
            f"fused_lora supports model types {list(FUSED_LORA_MODEL_TYPES)}; got {model_type!r}"
        )
    arch = ARCHITECTURES[model_type]
    blocks = [
        (name, module, kind)
        for name, module in model.named_modules()
        for kind, cls in (("attention", arch.attention), ("mlp", arch.mlp))
        if type(module).__name__ == cls
    ]
    roles = {"attention": (*QKV_ROLES, OUT_ROLE), "mlp": MLP_ROLES}
    lora = [
        (f"{name}.{role}", child)
        for name, module, kind in blocks
        for role in roles[kind]
        if isinstance(child := getattr(module, role, None), LoraLayer)
    ]
    _check_base_layers(lora, base_layer)
    plan = FusedLoRAPlan(model_type, base_layer)
    for name, module, kind in blocks:
        (_plan_attention if kind == "attention" else _plan_mlp)(plan, name, module)
    if arch.experts or arch.expert_mlp:
        plan.skipped[f"<{model_type} MoE experts>"] = (
            "MoE experts are fused 3-D parameters in transformers 5; left unfused"
        )
    return plan


def rules_from_plan(plan: FusedLoRAPlan) -> list[ModelPatcherRule]:
    """ModelPatcher rules replacing the forwards the plan selected (each falls back by itself)."""

    def qkv_builder(module: torch.nn.Module):
        group, role = plan.qkv[module]
        group.fallbacks[role] = module.forward
        return group.forward_for(role)

    def linear_builder(module: torch.nn.Module):
        return fused_linear_forward(plan.linear[module], module.forward)

    def mlp_builder(module: torch.nn.Module):
        gate, up, down = plan.mlp[module]  # _plan_mlp stores one source per MLP_ROLES entry
        return fused_mlp_forward(gate, up, down, module.forward)

    rules = []
    for rule_id, targets, builder in (
        (RULE_QKV, plan.qkv, qkv_builder),
        (RULE_LINEAR, plan.linear, linear_builder),
        (RULE_MLP, plan.mlp, mlp_builder),
    ):
        if targets:
            trigger = ModelPatcherTrigger(check=lambda m, targets=targets: m in targets)
            rules.append(ModelPatcherRule(rule_id, trigger=trigger, forward_builder=builder))
    return rules


def build_fused_lora_rules(model: torch.nn.Module, base_layer: str) -> list[ModelPatcherRule]:
    """Rules that fuse LoRA on the attention projections and MLPs of a peft LoRA model."""
    plan = plan_fused_lora(model, base_layer)
    logger.info(plan.summary())
    for rule_id, names in plan.fused.items():
        logger.debug("%s: %s", rule_id, ", ".join(names))
    for name, reason in plan.skipped.items():
        logger.debug("not fused %s: %s", name, reason)
    return rules_from_plan(plan)
