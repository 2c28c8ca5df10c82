"""Models and a Trainer harness for the Fine-Tuning Scheduler parity tests.

The FTS test suite trains a Lightning "boring model" (four Linear layers, SGD lr 1e-3 with
StepLR(step_size=1, gamma=0.7) stepped per epoch) and asserts, epoch by epoch, the depth, the
thawed parameters, the param groups and the lr of every group. Here the same model trains under
`transformers.Trainer` with the finetuning_schedule plugin; with one optimizer step per epoch a
per-step scheduler is a per-epoch one, and the monitored metric is scripted (MetricSequence) so
the transitions happen at the epochs of FTS's tables. Importable by class_path from the schedule
(`fts_parity_models.LinearWarmupLR`): pytest puts this folder on sys.path.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import PretrainedConfig, Trainer, TrainerCallback, TrainingArguments

# FTS's implicit (generated) schedule of the boring model, and its explicit test schedule
BORING_NAMES = [f"model.{i}.{k}" for i in range(4) for k in ("weight", "bias")]
IMPLICIT = {i: {"params": [f"model.{3 - i}.bias", f"model.{3 - i}.weight"]} for i in range(4)}
EXPLICIT = {
    0: {
        "params": ["model.3.bias", "model.3.weight", "model.2.bias", "model.2.weight"],
        "max_transition_epoch": 3,
    },
    1: {"params": ["model.1.bias", "model.1.weight"], "lr": 1e-6},
    2: {"params": ["model.0.*"]},
}


def implicit_schedule() -> dict:
    """A fresh copy of the generated 4-phase schedule (2 tensors per phase)."""
    return {k: {"params": list(v["params"])} for k, v in IMPLICIT.items()}


def explicit_schedule() -> dict:
    """A fresh copy of FTS's explicit 3-phase test schedule."""
    return {k: {**v, "params": list(v["params"])} for k, v in EXPLICIT.items()}


class BoringModel(nn.Module):
    """FTS's boring model (4 Linear layers) with a `config`, as the framework requires."""

    def __init__(self, batchnorm: bool = False) -> None:
        super().__init__()
        self.config = PretrainedConfig()
        if batchnorm:
            # FTS's BatchNorm variant; momentum=None (cumulative average): running_mean is then
            # the mean over every batch seen, whatever their order (checkable by hand)
            self.model = nn.Sequential(
                OrderedDict(
                    [
                        ("lin_base", nn.Linear(32, 32)),
                        ("bn", nn.BatchNorm1d(32, momentum=None)),
                        ("lin_classif", nn.Linear(32, 2)),
                    ]
                )
            )
        else:
            self.model = nn.Sequential(
                nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 2)
            )

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
        out = self.model(x)
        loss = nn.functional.mse_loss(out, labels) if labels is not None else None
        return {"loss": loss, "logits": out}


class RandomRows(torch.utils.data.Dataset):
    """Seeded random (x, labels) rows."""

    def __init__(self, n: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 32, generator=gen)
        self.labels = torch.randn(n, 2, generator=gen)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.labels[i]}


class LinearWarmupLR(LambdaLR):
    """Linear warmup to the base lr over `num_warmup_steps`, then linear decay to 0."""

    def __init__(self, optimizer, num_warmup_steps: int, num_training_steps: int, last_epoch=-1):
        def factor(step: int) -> float:
            if step < num_warmup_steps:
                return step / max(1, num_warmup_steps)
            return max(
                0.0, (num_training_steps - step) / max(1, num_training_steps - num_warmup_steps)
            )

        super().__init__(optimizer, factor, last_epoch)


class MetricSequence(TrainerCallback):
    """Replaces eval_loss of the k-th evaluation by values[k] (before FTS sees it)."""

    def __init__(self, values: Sequence[float]) -> None:
        self.values = list(values)
        self.calls = 0

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        metrics["eval_loss"] = self.values[min(self.calls, len(self.values) - 1)]
        self.calls += 1


class EpochRecorder(TrainerCallback):
    """At each epoch start (after FTS's transition): depth, thawed count, groups, lrs, optimizer."""

    def __init__(self, fts) -> None:
        self.fts = fts
        self.rows: dict[int, tuple] = {}
        self.lrs: dict[int, tuple] = {}
        self.initial_lrs: dict[int, tuple] = {}
        self.waits: dict[int, int] = {}  # early stopping's count of evaluations without improvement

    def on_epoch_begin(self, args, state, control, optimizer=None, **kw):
        epoch = round(state.epoch or 0.0)
        raw = optimizer.optimizer
        self.rows[epoch] = (
            self.fts.depth,
            self.fts.final_depth - self.fts.depth,
            len(self.fts.thawed_names()),
            len(raw.param_groups),
            tuple(len(g["params"]) for g in raw.param_groups),
            type(raw).__name__,
            raw.defaults["lr"],
        )
        self.lrs[epoch] = tuple(round(g["lr"], 9) for g in raw.param_groups)
        self.initial_lrs[epoch] = tuple(
            round(g.get("initial_lr", g["lr"]), 9) for g in raw.param_groups
        )
        self.waits[epoch] = self.fts.state.wait


def sgd_steplr(steps_per_epoch: int = 1, all_params: bool = False, lr: float = 1e-3):
    """The boring model's optimizer: SGD(lr, weight_decay 1e-6) + StepLR(gamma 0.7) per epoch."""

    def build(model: nn.Module):
        params = (
            model.parameters() if all_params else [p for p in model.parameters() if p.requires_grad]
        )
        opt = torch.optim.SGD(params, lr=lr, weight_decay=1e-6)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=steps_per_epoch, gamma=0.7)

    return build


def run_boring(
    tmp: str,
    stanza: dict[str, Any],
    metrics: Sequence[float],
    *,
    epochs: int,
    steps_per_epoch: int = 1,
    optimizers: Callable[[nn.Module], tuple] | None = None,
    model: nn.Module | None = None,
    before_optimizer: Callable[[nn.Module], None] | None = None,
    resume: str | None = None,
    **arg_overrides: Any,
) -> tuple[Trainer, Any, EpochRecorder]:
    """Train the boring model with the FTS stanza (resuming from a checkpoint folder if given);
    return (trainer, plugin, recorder)."""
    from fms_acceleration.testing import build_framework
    from fms_acceleration_fts import FinetuningSchedulePlugin

    torch.manual_seed(42)
    model = BoringModel() if model is None else model
    batch = 2 if steps_per_epoch > 1 else 4
    kwargs = dict(
        output_dir=tmp,
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=4,
        num_train_epochs=epochs,
        eval_strategy="epoch",
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=42,
        data_seed=42,
        max_grad_norm=0.0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    kwargs.update(arg_overrides)
    args = TrainingArguments(**kwargs)
    framework = build_framework(
        {"plugins": {"training": {"finetuning_schedule": stanza}}}, [FinetuningSchedulePlugin]
    )
    model, _ = framework.augmentation(model, args, modifiable_args=())
    if before_optimizer is not None:
        before_optimizer(model)
    build = optimizers or sgd_steplr(steps_per_epoch)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=RandomRows(batch * steps_per_epoch, seed=0),
        eval_dataset=RandomRows(4, seed=1),
        optimizers=build(model),
        callbacks=[MetricSequence(metrics)],
    )
    plugin = framework.plugins["finetuning_schedule"]
    for cb in framework.get_callbacks_and_ready_for_train(
        model, trainer.accelerator, trainer=trainer
    ):
        trainer.add_callback(cb)
    recorder = EpochRecorder(plugin.callback)
    trainer.add_callback(recorder)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, plugin, recorder
