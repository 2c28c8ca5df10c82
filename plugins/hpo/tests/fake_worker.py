"""A study worker whose trials only sleep and report (run by test_workers.py as a process):
storage, the study lock, resume and the trial total are what is under test."""

from __future__ import annotations

import random
import sys
import time

import optuna

from fms_acceleration_hpo import HPOOptions, StudyStorage
from fms_acceleration_hpo.worker import open_study, run_worker

OPTIONS = HPOOptions.model_validate(
    {
        "sampler": {"type": "random", "seed": 0},
        "pruner": {"type": "nop"},
        "search_space": [{"name": "x", "type": "float", "low": -1.0, "high": 1.0}],
    }
)


def main(url: str, study_name: str, trials: int, root: str, worker: int) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = StudyStorage.parse(url)
    opened = open_study(storage, study_name, OPTIONS, root)
    pause = random.Random(worker)

    def objective(trial: optuna.Trial) -> float:
        from fms_acceleration_hpo.resume import WORKER_ATTR, this_process

        trial.set_user_attr(WORKER_ATTR, this_process())
        x = trial.suggest_float("x", -1.0, 1.0)
        for step in (1, 2):
            time.sleep(pause.uniform(0.02, 0.15))
            trial.report(x * x + 1 / step, step)
        return x * x

    run_worker(opened, storage, study_name, trials, objective)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
