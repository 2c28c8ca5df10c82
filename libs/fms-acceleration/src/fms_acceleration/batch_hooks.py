"""Helios-style plugin hooks applied to a transformers.Trainer.

- `process_training_batch(batch, state)`: the one plugin holding the slot `training_batch` sees
  every training batch where the Trainer fetches it (`get_batch_samples`), after the dataloader
  (accelerate) has already moved it to the device. The Trainer's own code then counts
  `num_items_in_batch` over the batches the hook returned, so dropped rows are not counted.
- `process_validation_batch(batch, step)`: the one plugin holding `validation_batch` sees every
  evaluation batch at `prediction_step`; `step` is the batch's index in the current evaluation.
- `should_training_stop(state)`: asked of every plugin that overrides it, after each optimizer
  step and after each evaluation; the answers are OR-ed and, under torch.distributed, reduced
  across ranks (MAX), so that every rank stops at the same step.

The wrappers are installed through the framework's TrainerPatcher, so `undo_patches()` removes
them. Nothing here imports transformers until a Trainer callback is built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import MethodType
from typing import Any

from .errors import AccelerationFrameworkError, AccelerationPluginConfigError
from .framework_plugin import TRAINING_BATCH_SLOT, VALIDATION_BATCH_SLOT, AccelerationPlugin

# hook method -> the unique slot a plugin must declare to override it
HOOK_SLOTS = {
    "process_training_batch": TRAINING_BATCH_SLOT,
    "process_validation_batch": VALIDATION_BATCH_SLOT,
}
TRAINING_BATCH_RULE = "training-batch-hook"
VALIDATION_BATCH_RULE = "validation-batch-hook"


def overrides(plugin: AccelerationPlugin, hook: str) -> bool:
    """Whether the plugin's class replaces the base class's (do-nothing) `hook`."""
    return getattr(type(plugin), hook) is not getattr(AccelerationPlugin, hook)


def check_hook_slots(plugins: Sequence[AccelerationPlugin]) -> None:
    """A plugin overriding a batch hook must declare the hook's unique slot."""
    for plugin in plugins:
        for hook, slot in HOOK_SLOTS.items():
            if overrides(plugin, hook) and slot not in plugin.taken_slots():
                raise AccelerationPluginConfigError(
                    f"plugin '{plugin.plugin_id}' ({type(plugin).__name__}) overrides {hook} but "
                    f"does not declare the slot '{slot}': add it to the class attribute `slots` "
                    f"(only one active plugin may process these batches)."
                )


def _checked(plugin: AccelerationPlugin, hook: str, batch: Any) -> Any:
    if batch is None:
        raise AccelerationFrameworkError(
            f"plugin '{plugin.plugin_id}': {hook} returned None; it must return the batch"
        )
    return batch


def training_batch_builder(plugin: AccelerationPlugin) -> Callable[[MethodType], Callable]:
    """Builder for the `get_batch_samples` rule: batches pass through the plugin one by one."""

    def builder(original: MethodType) -> Callable:
        trainer: Any = original.__self__  # the transformers Trainer (not imported here)

        def get_batch_samples(epoch_iterator: Any, *args: Any, **kwargs: Any) -> Any:
            # Feeding the processed batches to the Trainer's own method keeps its counting of
            # num_items_in_batch (and its cross-device averaging) over what the model will see.
            processed = (
                _checked(
                    plugin,
                    "process_training_batch",
                    plugin.process_training_batch(batch, trainer.state),
                )
                for batch in epoch_iterator
            )
            return original(processed, *args, **kwargs)

        return get_batch_samples

    return builder


class BatchCounter:
    """Index of the next batch within the current evaluation (reset when one ends)."""

    def __init__(self) -> None:
        self.value = 0

    def take(self) -> int:
        """Return the current index and advance."""
        current, self.value = self.value, self.value + 1
        return current

    def reset(self) -> None:
        self.value = 0


def validation_batch_builder(
    plugin: AccelerationPlugin, counter: BatchCounter
) -> Callable[[Callable], Callable]:
    """Builder for the `prediction_step` rule: each evaluation batch passes through the plugin."""

    def builder(original: Callable) -> Callable:
        def prediction_step(model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            batch = plugin.process_validation_batch(inputs, counter.take())
            return original(
                model, _checked(plugin, "process_validation_batch", batch), *args, **kwargs
            )

        return prediction_step

    return builder


def any_rank(flag: bool, device: Any = None) -> bool:
    """True when `flag` is true on any rank (all_reduce MAX); the flag itself without
    torch.distributed. Every rank must call it at the same point."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    # gloo reduces CPU tensors; nccl needs the rank's GPU
    on = device if dist.get_backend() == "nccl" and device is not None else "cpu"
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=on)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def stop_requested(stoppers: Sequence[AccelerationPlugin], state: Any, device: Any = None) -> bool:
    """Ask every plugin (no short-circuit: an answer may record something) and OR the answers
    across plugins and ranks."""
    answers = [bool(plugin.should_training_stop(state)) for plugin in stoppers]
    return any_rank(any(answers), device)


def hooks_callback(stoppers: Sequence[AccelerationPlugin], counter: BatchCounter | None) -> Any:
    """A Trainer callback that applies the plugins' stop requests and resets the evaluation
    batch index after each evaluation."""
    from transformers import TrainerCallback

    stoppers = tuple(stoppers)

    class PluginHooksCallback(TrainerCallback):
        """Stops training when any plugin (on any rank) asks to."""

        def _maybe_stop(self, args: Any, state: Any, control: Any) -> None:
            if stoppers and stop_requested(stoppers, state, getattr(args, "device", None)):
                control.should_training_stop = True

        def on_step_end(self, args, state, control, **kwargs):
            self._maybe_stop(args, state, control)

        def on_evaluate(self, args, state, control, **kwargs):
            if counter is not None:
                counter.reset()
            # a decision taken on these metrics (e.g. pruning) stops at this very step
            self._maybe_stop(args, state, control)

        def on_predict(self, args, state, control, **kwargs):
            if counter is not None:
                counter.reset()

    return PluginHooksCallback()
