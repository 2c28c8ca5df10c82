"""The padding-free plugin: flattened batches, attention kept within each example, no cache."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from types import MethodType
from typing import Any, Literal

import torch

from fms_acceleration import (
    AccelerationPlugin,
    AccelerationPluginConfigError,
    AcceleratorPatcherComponent,
    Choice,
    ModelPatcherRule,
    ModelPatcherTrigger,
    StanzaModel,
)
from fms_acceleration.errors import AccelerationFrameworkError
from fms_acceleration.model_patcher import forward_like

from .flattening import FlatteningCollator, is_packed
from .packed_attention import build_packed_attention

PADDING_FREE_PATH = "training.attention.padding_free"
# transformers' table of attention functions; the sdpa entry is swapped while patched
SDPA_ENTRY = "transformers.modeling_utils.AttentionInterface._global_mapping.sdpa"
# implementations that read the collator's cu_seq_lens_* kwargs (ours for sdpa, HF's for flash)
_READS_BOUNDARIES = ("sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4")


class PackedBatchError(AccelerationFrameworkError):
    """A packed batch reached the model in a way that lets its examples attend to each other."""


class PaddingFreeOptions(StanzaModel):
    """The `training.attention.padding_free` stanza."""

    method: Choice[Literal["huggingface"]] = "huggingface"
    """how batches are flattened: huggingface (transformers' DataCollatorWithFlattening)"""


def find_backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder under the causal-LM head (e.g. LlamaModel), which takes position_ids."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = getattr(base, "base_model_prefix", "")
    backbone = getattr(base, prefix, None) if prefix else None
    if not isinstance(backbone, torch.nn.Module):
        backbone = base
    if "position_ids" not in inspect.signature(backbone.forward).parameters:
        raise AccelerationPluginConfigError(
            f"plugins.{PADDING_FREE_PATH}: {type(backbone).__name__}.forward takes no "
            "position_ids; padding-free needs a decoder that numbers positions per example"
        )
    return backbone


def _argument(arguments: dict[str, Any], name: str) -> Any:
    """A named argument of a bound call, or the same name among its **kwargs."""
    if name in arguments:
        return arguments[name]
    return next((v.get(name) for v in arguments.values() if isinstance(v, dict)), None)


def build_cache_guard(backbone: torch.nn.Module) -> Callable[..., Any]:
    """Backbone forward that runs packed rows without a cache and refuses what would mix them.

    transformers keeps packed examples apart (block-causal mask or varlen kernels) only when
    there is no attention mask and no cache: a packed row that arrives with either is an error,
    and one that leaves use_cache unset runs with use_cache=False.
    """
    original = backbone.forward
    signature = inspect.signature(original)
    variadic = next(
        (p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), "kwargs"
    )

    @forward_like(original)
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind_partial(*args, **kwargs)
        arguments = bound.arguments
        position_ids = arguments.get("position_ids")
        mask = _argument(arguments, "attention_mask")
        if position_ids is None or not is_packed(position_ids, mask):
            return original(*args, **kwargs)
        name = type(self).__name__
        if any(_argument(arguments, n) is not None for n in ("cache", "past_key_values")):
            problem = "with a cache (past_key_values)"
        elif _argument(arguments, "use_cache") is True:
            problem = "with use_cache=True"
        elif getattr(mask, "ndim", 0) == 2:
            problem = "with a 2-D attention_mask"
        else:
            # everything by keyword: transformers' decorators read use_cache by position too
            call = {k: v for k, v in arguments.items() if k != variadic}
            call.update(arguments.get(variadic, {}))
            if _argument(arguments, "use_cache") is None:
                call["use_cache"] = False
            return original(**call)
        raise PackedBatchError(
            f"padding-free: a packed batch (position_ids restart inside a row) reached "
            f"{name}.forward {problem}, so its examples would attend to each other. Train "
            "packed batches with use_cache=False and no attention_mask (as the padding-free "
            "collator makes them), or remove plugins.training.attention.padding_free."
        )

    return forward


def _flattening_builder(boundaries: bool) -> Callable[[Any], Any]:
    """Collator replacement: the flattening collator, inside the Trainer's column remover."""

    def build(collate_fn: Any) -> Any:
        inner = getattr(collate_fn, "data_collator", None)
        if inner is not None and hasattr(collate_fn, "_remove_columns"):
            # transformers' RemoveColumnsCollator: keep it, replace what it wraps (on a copy,
            # so the Trainer's own collator is untouched)
            wrapper = copy.copy(collate_fn)
            wrapper.data_collator = build(inner)
            return wrapper
        return FlatteningCollator(return_flash_attn_kwargs=boundaries)

    return build


def build_token_counter(original: MethodType) -> Callable[[Any], Any]:
    """Trainer._track_num_input_tokens that counts a flattened batch's tokens as non-padding.

    A flattened batch has no attention mask to count by (the Trainer then warns at every step
    and counts all tokens); every one of its tokens is a real one, which is what is counted.
    """
    trainer: Any = original.__self__  # the transformers Trainer (not imported here)

    def track(inputs: dict[str, Any]) -> Any:
        flattened = "attention_mask" not in inputs and "position_ids" in inputs
        if not flattened or trainer.args.include_num_input_tokens_seen != "non_padding":
            return original(inputs)
        main = getattr(trainer.model, "main_input_name", "input_ids")
        if main not in inputs:
            return original(inputs)
        count = torch.as_tensor(inputs[main].numel(), device=trainer.args.device)
        trainer.state.num_input_tokens_seen += trainer.accelerator.gather(count).sum().item()
        return None

    return track


class PaddingFreeAccelerationPlugin(AccelerationPlugin):
    """Replaces the data collator with a flattening one and keeps packed examples apart."""

    slots = frozenset({"data_collator"})

    def __init__(self, configurations: dict[str, Any]):
        super().__init__(configurations)
        self.method = self.stanza(PADDING_FREE_PATH)["method"]

    @property
    def requires_augmentation(self) -> bool:
        return True

    def augmentation(self, model: torch.nn.Module, train_args: Any, modifiable_args: tuple):
        """Register the collator, the cache guard and (for sdpa) per-example attention."""
        backbone = find_backbone(model)
        implementation = getattr(backbone.config, "_attn_implementation", None) or "eager"
        self.model_patcher.register(
            ModelPatcherRule(
                rule_id="padding-free-cache-guard",
                trigger=ModelPatcherTrigger(check=type(backbone)),
                forward_builder=build_cache_guard,
            )
        )
        if implementation == "sdpa":
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            self.model_patcher.register(
                ModelPatcherRule(
                    rule_id="padding-free-sdpa-per-example",
                    import_and_maybe_reload=(
                        SDPA_ENTRY,
                        build_packed_attention(sdpa_attention_forward),
                        None,
                    ),
                    applies_to_any_model=True,
                )
            )
        self.accelerator_patcher.replace(
            "padding-free-collator",
            AcceleratorPatcherComponent.data_collator,
            replacement_builder=_flattening_builder(implementation in _READS_BOUNDARIES),
        )
        from transformers import Trainer

        if hasattr(Trainer, "_track_num_input_tokens"):
            self.trainer_patcher.wrap_method(
                "padding-free-token-count", "_track_num_input_tokens", build_token_counter
            )
        return model, modifiable_args


AccelerationPlugin.register_plugin(
    PaddingFreeAccelerationPlugin,
    configuration_and_paths=[PADDING_FREE_PATH],
    plugin_id="padding_free",
    schemas={PADDING_FREE_PATH: PaddingFreeOptions},
    package_name="fms-acceleration-aadp",
)
