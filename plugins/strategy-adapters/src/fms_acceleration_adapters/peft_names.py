"""Translation between PEFT parameter names and the base model's names (pure string logic)."""

from __future__ import annotations

# PeftModel -> LoraModel (base_model) -> the transformers model (model)
PEFT_PREFIX = "base_model.model."
# A tuner layer keeps the wrapped layer under ``base_layer``; ModulesToSaveWrapper keeps the
# trainable copy under ``modules_to_save.<adapter>``, which is what runs in the forward pass.
_TRANSPARENT_SEGMENTS = ("base_layer",)
_ACTIVE_COPY_SEGMENTS = ("modules_to_save",)


def peft_logical_name(actual_name: str, adapter_name: str = "default") -> str:
    """Base-model name of a PEFT parameter.

    ``base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight`` ->
    ``model.layers.0.self_attn.q_proj.weight``;
    ``...q_proj.lora_A.default.weight`` -> ``...q_proj.lora_A.weight``;
    ``base_model.model.lm_head.modules_to_save.default.weight`` -> ``lm_head.weight``.
    Names without the PEFT prefix are returned unchanged.
    """
    if not actual_name.startswith(PEFT_PREFIX):
        return actual_name
    parts = actual_name[len(PEFT_PREFIX) :].split(".")
    out: list[str] = []
    i = 0
    while i < len(parts):
        seg = parts[i]
        nxt = parts[i + 1] if i + 1 < len(parts) else None
        if seg in _TRANSPARENT_SEGMENTS:
            i += 1
        elif seg in _ACTIVE_COPY_SEGMENTS and nxt == adapter_name:
            i += 2
        elif seg == adapter_name and out:
            # the adapter-name key of a ModuleDict/ParameterDict (lora_A.default, ...)
            i += 1
        else:
            out.append(seg)
            i += 1
    return ".".join(out)
