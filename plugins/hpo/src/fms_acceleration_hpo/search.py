"""`fms-acceleration search`: an optuna study whose trials are runs of the training job.

One worker per command; the same command against the same storage adds a worker. Each worker:
1. under the study lock: backs up a sqlite study, creates or loads the study, re-enqueues failed
   trials (and with --retry-running the RUNNING trials of dead processes), restores the sampler;
2. runs trials until the study-wide total is reached (TrialBudget) or --timeout passes, printing
   one line per finished trial;
3. prints the table of every trial and, with --plot, writes the study's PNG.

Each trial trains in `<output-dir>/<study>_trial-<n>`, evaluating every `eval_every` steps
(reported to the pruner) and saving a checkpoint every `checkpoint_every` steps; a retried
trial keeps the folder of the trial it retries and resumes from its newest checkpoint.
Under torchrun the study lives on rank 0; the other ranks run the same trials, following rank 0
through TorchDistributedTrial.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from fms_acceleration import AccelerationFramework
from fms_acceleration.config_file import read_configuration
from fms_acceleration.framework_plugin import stanza_at
from fms_acceleration.validation import validate_model

from .errors import SearchError
from .framework_plugin_hpo import OptunaPlugin, distributed_world, trial_name
from .options import PATH, STANZA, HPOOptions
from .report import STEPS_ATTR, progress_callback, trials_table
from .request import SearchRequest
from .resume import OUTPUT_DIR_ATTR, WORKER_ATTR, this_process
from .sampler_state import checkpoint_sampler, sampler_config_hash
from .storage import StudyStorage
from .suggestions import apply_values, lowest_values, suggest_search_space
from .worker import open_study, run_worker

logger = logging.getLogger(__name__)
PLUGIN_ID = "hpo"
_GO, _STOP = "trial", "stop"


@dataclass
class SearchResult:
    """The study after this worker stopped (rank 0 only)."""

    study: optuna.Study
    table: str
    plot: Path | None
    notes: list[str]


class _Search:
    """Shared state of one worker's search."""

    def __init__(self, request: SearchRequest) -> None:
        self.request = request
        body, self.source = read_configuration(request.config)
        self.configuration = {"plugins": body}
        stanza = stanza_at(body, STANZA)
        if stanza is None:
            raise SearchError(
                f"{self.source}: no {PATH} stanza; the search reads its metric, sampler, pruner "
                "and search space from it (see sample-configurations/hpo-*.yaml)"
            )
        self.options = validate_model(HPOOptions, stanza, PATH)
        self.root = Path(request.train_options.get("output_dir") or "outputs/search")
        self.rank, self.world = distributed_world()
        self.trials_run = 0
        self._check_targets()

    def _check_targets(self) -> None:
        """Every target takes a value of its entry's type (checked at the lowest values)."""
        from fms_acceleration_train import TrainJobConfig

        AccelerationFramework(self.request.config)  # the file as written
        values = lowest_values(self.options.search_space)
        train, config = apply_values(
            values, self.options.search_space, self.request.train_options, self.configuration
        )
        where = f"{self.source} with the search space's lowest values applied"
        try:
            TrainJobConfig(**train)
            AccelerationFramework(config)
        except ValueError as err:
            raise SearchError(f"{where}: {err}") from None

    # --- one trial ---------------------------------------------------------------------------

    def trial_config(self, values: Mapping[str, Any], output_dir: Path) -> tuple[Any, dict]:
        from fms_acceleration_train import TrainJobConfig, last_complete_checkpoint

        train, config = apply_values(
            values, self.options.search_space, self.request.train_options, self.configuration
        )
        resume = "last" if last_complete_checkpoint(output_dir) is not None else None
        train.update(
            output_dir=str(output_dir),
            eval_steps=self.options.eval_every,
            save_steps=self.options.save_steps,
            resume_from_checkpoint=resume,
            evaluate=False,
        )
        return TrainJobConfig(**train), config

    def run_trial(self, trial: optuna.Trial | None, sampler_root: Path | None) -> float | None:
        """Train one trial (rank 0 holds `trial`; other ranks pass None and follow)."""
        from fms_acceleration_train import run_train_job

        if trial is not None:
            trial.set_user_attr(WORKER_ATTR, this_process())
            if OUTPUT_DIR_ATTR not in trial.user_attrs:
                folder = self.root / trial_name(self.request.study_name, trial.number)
                trial.set_user_attr(OUTPUT_DIR_ATTR, str(folder))
        shared: Any = trial
        if self.world > 1:
            from optuna_integration import TorchDistributedTrial

            shared = TorchDistributedTrial(trial)
        after_each = None
        if trial is not None and sampler_root is not None:
            config_hash = sampler_config_hash(self.options.sampler)

            def after_each() -> None:
                checkpoint_sampler(trial, sampler_root, config_hash)

        values = suggest_search_space(shared, self.options.search_space, after_each)
        output_dir = Path(shared.user_attrs[OUTPUT_DIR_ATTR])
        train_config, acceleration = self.trial_config(values, output_dir)
        framework = AccelerationFramework(acceleration)
        self.trials_run += 1
        if self.trials_run == 2:  # the ready-for-train table is the same for every trial
            logging.getLogger("fms_acceleration").setLevel(logging.WARNING)
        plugin: OptunaPlugin = framework.plugins[PLUGIN_ID]
        plugin.attach_trial(shared)
        plugin.quiet_progress = True
        try:
            summary = run_train_job(train_config, framework=framework)
            plugin.check_pruned()  # under torch.distributed nothing was raised in the Trainer
        finally:
            framework.undo_patches()
        if plugin.last_value is None:
            raise SearchError(
                f"trial {shared.number}: training ended without an evaluation to report "
                f"({PATH}.eval_every {self.options.eval_every})"
            )
        shared.set_user_attr(STEPS_ATTR, summary.steps)
        return plugin.last_value


def _broadcast(value: Any) -> Any:
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _init_distributed() -> bool:
    """Under torchrun, join the process group before the first trial (the Trainer reuses it);
    True when this call created it."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        return True
    return False


def _leave_distributed() -> None:
    import torch.distributed as dist

    # exiting with a live gloo group can abort the process in teardown
    dist.barrier()
    dist.destroy_process_group()


def _check_fresh_output(search: _Search, study: optuna.Study) -> None:
    """A new study must not train into the trial folders of an earlier one."""
    if study.get_trials(deepcopy=False):
        return
    pattern = f"{trial_name(search.request.study_name, 0)[:-1]}*"
    stale = sorted(p.name for p in search.root.glob(pattern) if p.is_dir())
    if stale:
        more = ", ..." if len(stale) > 3 else ""
        raise SearchError(
            f"--output-dir {search.root} already has trial folders of a study named "
            f"'{search.request.study_name}' ({', '.join(stale[:3])}{more}), but "
            f"{search.request.storage} has no trials of it: they would mix with this new "
            "study. Pass another --output-dir or --study-name, or move them away."
        )


def _follow(search: _Search) -> None:
    """Ranks > 0: run the trials rank 0 starts until it says stop."""
    while _broadcast(None) == _GO:
        try:
            search.run_trial(None, None)
            search.request.emit(f"[search] rank {search.rank}: trial finished")
        except optuna.TrialPruned as pruned:
            search.request.emit(f"[search] rank {search.rank}: trial {pruned}")
        except Exception as err:  # rank 0 records the failure; keep following
            search.request.emit(f"[search] rank {search.rank}: trial failed: {err}")


def run_search(request: SearchRequest) -> SearchResult | None:
    """Run this worker's share of the study; the result on rank 0, None on the other ranks."""
    joined = _init_distributed()
    framework_logger = logging.getLogger("fms_acceleration")
    level = framework_logger.level
    try:
        search = _Search(request)
        if search.rank != 0:
            _follow(search)
            return None
        try:
            return _lead(search)
        finally:
            if search.world > 1:
                _broadcast(_STOP)
    finally:
        framework_logger.setLevel(level)
        if joined:
            _leave_distributed()


def _lead(search: _Search) -> SearchResult:
    request, options = search.request, search.options
    storage = StudyStorage.parse(request.storage)
    opened = open_study(
        storage,
        request.study_name,
        options,
        search.root,
        retry_running=request.retry_running,
        backup=request.backup,
        check=lambda study: _check_fresh_output(search, study),
    )
    study = opened.study
    for note in opened.notes:
        request.emit(f"[search] {note}")
    request.emit(
        f"[search] study '{request.study_name}' in {storage.display}: "
        f"{len(study.get_trials(deepcopy=False))} trials so far, {request.trials} in total"
    )

    def objective(trial: optuna.Trial) -> float:
        if search.world > 1:
            _broadcast(_GO)
        return search.run_trial(trial, opened.sampler_root)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    run_worker(
        opened,
        storage,
        request.study_name,
        request.trials,
        objective,
        timeout=request.timeout,
        callbacks=[progress_callback(options.metric, request.emit)],
    )
    table = trials_table(study, options.metric)
    plot = None
    if request.plot:
        from .plots import write_study_plot

        plot = write_study_plot(study, request.plot)
    return SearchResult(study, table, plot, opened.notes)
