"""What `fms-acceleration search` is asked: its own options, each declared once as a field that
is also its flag (optuna is not imported here: registering the command must stay cheap)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import Field

from fms_acceleration_train import Flag, FlagModel

from .errors import SearchError

# fields of SearchRequest that are not flags: filled in by the command, or by a caller in Python
NOT_FLAGS = frozenset({"train_options", "emit"})
# train options that are not flags of the search: CONFIG is the trials' acceleration config;
# each trial sets its evaluation and checkpoint steps and its resume itself (search.trial_config)
# and turns off the answer-accuracy check (and with it eval_max_new_tokens)
NOT_TRIAL_FLAGS = frozenset(
    {"acceleration_config", "eval_steps", "save_steps", "resume_from_checkpoint", "evaluate",
     "eval_max_new_tokens"}
)  # fmt: skip
# train options whose default differs in a search
TRIAL_DEFAULTS = {"output_dir": "outputs/search", "eval_split": 0.1}


class SearchRequest(FlagModel):
    """What `fms-acceleration search` was asked (its flags, the trials' train options)."""

    error_type = SearchError

    config: Annotated[str, Flag(positional=True)]
    """acceleration YAML with a plugins.training.hpo stanza"""
    trials: Annotated[int, Field(gt=0)]
    """trials in the whole study (all workers)"""
    storage: Annotated[str, Flag(metavar="URL")]
    """sqlite:///FILE, journal://FILE or postgresql://USER@HOST/DB"""
    study_name: Annotated[str, Flag(metavar="NAME")] = "search"
    """study name in the storage"""
    train_options: dict[str, Any]
    """TrainJobConfig fields of every trial (output_dir is the search's root)"""
    timeout: Annotated[float | None, Field(gt=0), Flag(metavar="SECONDS")] = None
    """start no new trial after this long"""
    retry_running: bool = False
    """also retry RUNNING trials whose process is dead (killed workers)"""
    backup: bool = True
    """back up a sqlite study before resuming"""
    plot: Annotated[str | None, Flag(metavar="FILE")] = None
    """write the study's PNG here"""
    emit: Callable[[str], None] = print
    """where progress lines go"""
