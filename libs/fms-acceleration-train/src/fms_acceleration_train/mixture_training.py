"""Training on the built-in mixture: the mixed training set (learned by online data mixing, or
uniform), the held-out loss of every domain measured as training goes, and what the summary
reports about the mixture.

The job trains on the mixture when the acceleration configuration turns on online data mixing
(`training.odm.odm`, package fms-acceleration-odm), or, as the baseline of `--compare`, on the
uniform mixture of the same domains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import fmean
from typing import Any

from .data import PaddingCollator, pad_token_id, tokenize
from .errors import TrainJobError
from .mixture_data import MIXTURE_NAME, Domain, mixture_domains

ODM_PLUGIN = "odm"
UNIFORM = "uniform"
LEARNED = "odm"


ODM_STANZA = "training.odm.odm"


def configures_odm(acceleration_config: str | None) -> bool:
    """Whether the acceleration YAML has an online-data-mixing stanza."""
    if acceleration_config is None:
        return False
    from fms_acceleration.config_file import read_configuration
    from fms_acceleration.dotted_paths import lookup

    body, _ = read_configuration(acceleration_config)
    return lookup(body, ODM_STANZA)[1] is not None


def odm_options(framework: Any) -> Any:
    """The ODM plugin's validated options if the framework runs it, else None."""
    if framework is None:
        return None
    plugin = framework.plugins.get(ODM_PLUGIN)
    return getattr(plugin, "options", None)


@dataclass
class HeldOutCurve:
    """Mean held-out loss over the domains at each evaluation: [step, mean, {domain: loss}]."""

    domains: list[str]
    points: list[list[Any]] = field(default_factory=list)

    def callback(self) -> Any:
        """A TrainerCallback that records every evaluation."""
        from transformers import TrainerCallback

        curve = self

        class RecordHeldOut(TrainerCallback):
            # the Trainer evaluates a dict of datasets one at a time: collect a step's domains
            def on_evaluate(self, args, state, control, metrics=None, **kwargs):
                found = {
                    d: round(float(metrics[f"eval_{d}_loss"]), 6)
                    for d in curve.domains
                    if metrics and f"eval_{d}_loss" in metrics
                }
                if not found:
                    return
                if not curve.points or curve.points[-1][0] != state.global_step:
                    curve.points.append([state.global_step, None, {}])
                point = curve.points[-1]
                point[2].update(found)
                if len(point[2]) == len(curve.domains):
                    point[1] = round(fmean(point[2].values()), 6)

        return RecordHeldOut()


@dataclass
class MixturePlan:
    """The mixture a run trains on, and how it is measured."""

    mode: str  # LEARNED or UNIFORM
    domains: list[Domain]
    options: Any = None  # the ODM plugin's options when LEARNED

    @property
    def description(self) -> str:
        """The dataset line of the summary."""
        how = "learned by online data mixing" if self.mode == LEARNED else "uniform"
        return f"{MIXTURE_NAME}, {how}"

    def train_examples(self) -> int:
        """Training examples over all domains."""
        return sum(len(d.train) for d in self.domains)

    def datasets(self, tokenizer: Any, seq_len: int, output_dir: str, seed: int) -> tuple:
        """(the mixed training set, {domain: held-out rows} for the Trainer's evaluation)."""
        from fms_acceleration_odm import OnlineMixingDataset

        collator = PaddingCollator(pad_token_id(tokenizer))
        train = {d.name: tokenize(d.train, tokenizer, seq_len) for d in self.domains}
        reward = {d.name: tokenize(d.reward, tokenizer, seq_len) for d in self.domains}
        kwargs = self.options.dataset_kwargs() if self.options is not None else {}
        # uniform: the same stream of the same domains, with weights that never change
        mixed = OnlineMixingDataset(
            train,
            None,
            reward,
            dict.fromkeys(reward, collator),
            eval_batch_size=8,
            output_dir=output_dir,
            seed=seed,
            **kwargs,
        )
        held = {d.name: tokenize(d.held_out, tokenizer, seq_len) for d in self.domains}
        return mixed, held

    def evaluation_arguments(self, args: Any, eval_every: int, batch_size: int) -> None:
        """Evaluate the held-out sets every `eval_every` steps (and at the last step)."""
        args.eval_strategy = "steps"
        args.eval_steps = eval_every
        args.per_device_eval_batch_size = batch_size

    def report(self, mixed: Any, framework: Any) -> dict[str, Any]:
        """The summary's `data_mixing` entry: mode, final mixture, samples per domain, files."""
        report: dict[str, Any] = {
            "mode": self.mode,
            "categories": list(mixed.category_list),
            "final_sampling_ratio": [round(x, 4) for x in mixed.sampling_ratio],
            "samples_per_category": list(mixed.curr_cat_count),
        }
        plugin = framework.plugins.get(ODM_PLUGIN) if framework is not None else None
        if plugin is not None:
            report.update(plugin.artifacts)
        return report


def plan_mixture(config: Any, framework: Any) -> MixturePlan | None:
    """The mixture this run trains on, or None for the job's usual dataset."""
    options = odm_options(framework)
    if options is None and not config.uniform_mixture:
        return None
    if config.dataset is not None:
        raise TrainJobError(
            "--dataset: online data mixing in the train job uses its built-in mixture of "
            "domains (each with held-out rows); leave --dataset out"
        )
    if config.eval_split:
        raise TrainJobError(
            f"--eval-split {config.eval_split}: the built-in mixture holds out rows of every "
            "domain itself; leave --eval-split out"
        )
    mode = LEARNED if options is not None else UNIFORM
    return MixturePlan(mode, mixture_domains(), options)


def steps_to_target(baseline: list[list[Any]], learned: list[list[Any]]) -> dict[str, Any]:
    """Steps each run needed to reach the baseline's final mean held-out loss.

    The baseline reaches it at its last evaluation by definition; the learned run at its first
    evaluation at or below it (None if never).
    """
    baseline = [p for p in baseline if p[1] is not None]
    learned = [p for p in learned if p[1] is not None]
    if not baseline or not learned:
        return {}
    target = baseline[-1][1]
    base_steps = next(step for step, loss, _ in baseline if loss <= target)
    odm_steps = next((step for step, loss, _ in learned if loss <= target), None)
    fewer = None if odm_steps is None else round(1.0 - odm_steps / base_steps, 4)
    return {
        "target_heldout_loss": target,
        "baseline_steps": base_steps,
        "odm_steps": odm_steps,
        "fewer_steps": fewer,
        "final_heldout_loss": {"baseline": target, "odm": learned[-1][1]},
    }


def mixture_rows(baseline: Any, learned: Any, target: dict[str, Any]) -> list[tuple[str, ...]]:
    """Rows of the --compare table for runs on the built-in mixture (none otherwise)."""
    if not target:
        return []
    odm = target["odm_steps"]
    fewer = target["fewer_steps"]
    return [
        ("data mixture", baseline.data_mixing.get("mode", "-"),
         learned.data_mixing.get("mode", "-"), ""),
        ("held-out loss (final)", f"{target['final_heldout_loss']['baseline']:.4f}",
         f"{target['final_heldout_loss']['odm']:.4f}", ""),
        (f"steps to {target['target_heldout_loss']:.4f}", str(target["baseline_steps"]),
         "not reached" if odm is None else str(odm),
         "" if fewer is None else f"{fewer:.0%} fewer"),
    ]  # fmt: skip
