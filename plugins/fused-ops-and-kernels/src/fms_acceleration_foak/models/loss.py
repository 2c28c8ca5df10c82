"""Loss hooks: the causal-LM loss on the CE kernel, and the fused linear CE path.

fast_loss: true replaces the loss function a patched model resolves (ForCausalLMLoss) with
fast_causal_lm_loss for that model only: same label shift, ignore_index and
num_items_in_batch, but the logits go into the kernel in their own dtype (bf16 logits are not
copied to fp32 first) and the gradient comes back in that dtype. transformers' LOSS_MAPPING is
left alone, so the Trainer still sees ForCausalLMLoss when it counts shifted labels.

The fused path needs the hidden states that feed lm_head. Instead of copying each model's
forward, the causal LM's own forward runs unchanged with lm_head switched to pass its input
through (so the output "logits" are the final hidden states, including any scalar scaling such
as Granite's 1 / logits_scaling, which commutes with the projection); the loss is then computed
from those hidden states and lm_head's weight without materialising the logits.
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from fms_acceleration.model_patcher import forward_like

from ..kernels import cross_entropy, fused_linear_cross_entropy

_DEFER_LM_HEAD: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "foak_defer_lm_head", default=False
)
# The model whose forward is running with the fast loss (set by its patched forward only).
_FAST_LOSS_MODEL: contextvars.ContextVar[torch.nn.Module | None] = contextvars.ContextVar(
    "foak_fast_loss_model", default=None
)


def fast_causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """transformers' ForCausalLMLoss without the fp32 copy of the logits (the kernel reads them)."""
    if shift_labels is None:
        # Shift so that tokens < n predict n
        labels = F.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    logits = logits.reshape(-1, vocab_size)
    shift_labels = shift_labels.reshape(-1).to(logits.device)
    return cross_entropy(logits, shift_labels, ignore_index, num_items_in_batch)


class _FastLossGetter:
    """Getter of PreTrainedModel.loss_function: the fast loss for the running model's CE."""

    def __init__(self, previous: property, causal_lm_loss: Callable[..., Any]) -> None:
        assert previous.fget is not None, "PreTrainedModel.loss_function is a getter property"
        # public under this name: a later patch finds the property it wraps by it
        self.foak_previous = previous
        self._previous_get: Callable[[Any], Any] = previous.fget
        self._causal_lm_loss = causal_lm_loss

    def __call__(self, model: Any) -> Any:
        resolved = self._previous_get(model)
        if resolved is self._causal_lm_loss and _FAST_LOSS_MODEL.get() is model:
            return fast_causal_lm_loss
        return resolved


def build_loss_function_property(previous: property) -> property:
    """PreTrainedModel.loss_function that answers fast_causal_lm_loss for the running model.

    Only while a model's patched forward runs (build_fast_loss_forward), and only where the
    model would otherwise use ForCausalLMLoss; every other model, and any loss a user set on
    the model, resolves as before.
    """
    from transformers.loss.loss_utils import ForCausalLMLoss

    # another framework's patch already installed: wrap what it wrapped (the test is the same)
    previous = getattr(previous.fget, "foak_previous", previous)
    fget = _FastLossGetter(previous, ForCausalLMLoss)
    return property(fget, previous.fset, previous.fdel, previous.__doc__)


def build_fast_loss_forward(model: torch.nn.Module) -> Callable[..., Any]:
    """The causal LM's own forward, marked as running with the fast loss."""
    original = model.forward

    @forward_like(original)  # the Trainer inspects the signature
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        token = _FAST_LOSS_MODEL.set(model)
        try:
            return original(*args, **kwargs)
        finally:
            _FAST_LOSS_MODEL.reset(token)

    return forward


def build_deferrable_lm_head(lm_head: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """lm_head forward that returns its input unchanged while the fused loss path is running."""
    original = lm_head.forward

    @forward_like(original)
    def forward(self: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if _DEFER_LM_HEAD.get():
            return hidden_states
        return original(hidden_states, *args, **kwargs)

    return forward


def causal_lm_fused_loss(
    hidden: torch.Tensor,
    lm_head: torch.nn.Linear,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """ForCausalLMLoss semantics (shift, ignore_index, num_items_in_batch) via fused linear CE."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    n_hidden = hidden.shape[-1]
    return fused_linear_cross_entropy(
        hidden.reshape(-1, n_hidden),
        lm_head.weight,
        shift_labels.reshape(-1).to(hidden.device),
        bias=lm_head.bias,
        ignore_index=ignore_index,
        num_items_in_batch=num_items_in_batch,
    )


def build_fused_ce_forward(model: torch.nn.Module) -> Callable[..., Any]:
    """Causal-LM forward computing the training loss with fused linear CE (logits left None)."""
    original = model.forward
    params = list(inspect.signature(original).parameters)
    labels_position = params.index("labels") if "labels" in params else None
    lm_head = model.get_output_embeddings()

    # keep the original signature visible: the Trainer inspects it to keep dataset columns and
    # to decide whether to pass num_items_in_batch
    @forward_like(original)
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        positional = labels_position is not None and len(args) > labels_position
        at = labels_position if positional else None  # labels' index in args, if passed there
        labels = args[at] if at is not None else kwargs.get("labels")
        # Evaluation and generation need real logits: run the model untouched.
        if labels is None or not model.training or not torch.is_grad_enabled():
            return original(*args, **kwargs)
        args_list = list(args)
        if at is not None:
            args_list[at] = None
        else:
            del kwargs["labels"]
        head = model.get_output_embeddings()
        if head is not lm_head or not isinstance(head, torch.nn.Linear):
            raise RuntimeError(
                "fast_loss: fused_ce_liger needs lm_head to stay the torch.nn.Linear it was when "
                f"patched, found {type(head).__name__}; do not put lm_head in LoRA target_modules"
            )
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(model.config, "return_dict", True)
        token = _DEFER_LM_HEAD.set(True)
        try:
            outputs = original(*args_list, return_dict=True, **kwargs)
        finally:
            _DEFER_LM_HEAD.reset(token)
        loss = causal_lm_fused_loss(
            outputs.logits,
            head,
            labels,
            num_items_in_batch=kwargs.get("num_items_in_batch"),
            ignore_index=kwargs.get("ignore_index", -100),
            shift_labels=kwargs.get("shift_labels"),
        )
        aux_loss = getattr(outputs, "aux_loss", None)
        if aux_loss is not None:  # MoE: the model adds its router loss only when given labels
            loss = loss + model.router_aux_loss_coef * aux_loss.to(loss.device)
        fields = {k: v for k, v in outputs.items() if k not in ("loss", "logits")}
        result = type(outputs)(loss=loss, logits=None, **fields)
        return result if return_dict else result.to_tuple()

    return forward
