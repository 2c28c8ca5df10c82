"""FTSState: one declaration of the schedule state, the checkpoint file derived from it."""

from __future__ import annotations

import json

import pytest

from fms_acceleration_fts.fts_state import FTSState, read_state_file, write_state_file
from fms_acceleration_fts.param_groups import FTSTransitionError

SAVED = (
    "depth",
    "wait",
    "epochs_checked",
    "best_metric",
    "best_checkpoint",
    "best_depth",
    "es_best",
    "pending",
    "transitions",
)


def test_checkpoint_holds_the_saved_fields_and_the_schedule_shape(tmp_path):
    state = FTSState(depth=2, wait=1, epochs_checked=5, best_metric=0.25, es_best=0.25)
    state.transitions.append({"depth": 1, "global_step": 4, "epoch": 1.0, "reason": "x"})
    state.stopped, state.pending_best, state.resume_dir = "done", True, "/ckpt"
    assert FTSState.saved_fields() == SAVED
    content = state.to_checkpoint(n_phases=4, final_depth=3)
    assert list(content) == ["n_phases", "final_depth", *SAVED]
    assert (content["n_phases"], content["final_depth"], content["epochs_checked"]) == (4, 3, 5)
    path = tmp_path / "fts_state.json"
    write_state_file(str(path), content)
    assert read_state_file(str(path)) == json.loads(json.dumps(content))

    fresh = FTSState()
    fresh.restore(read_state_file(str(path)), n_phases=4)
    # depth is reached by thawing; run-only fields keep their values
    assert (fresh.depth, fresh.wait, fresh.epochs_checked, fresh.best_metric) == (0, 1, 5, 0.25)
    assert fresh.transitions == state.transitions and fresh.transitions is not state.transitions
    assert (fresh.stopped, fresh.pending_best, fresh.resume_dir) == (None, False, None)


def test_restore_refuses_another_schedule():
    with pytest.raises(FTSTransitionError) as err:
        FTSState().restore(FTSState().to_checkpoint(n_phases=3, final_depth=2), n_phases=5)
    assert str(err.value) == (
        "the checkpoint was written with a 3-phase schedule but this run's schedule has 5 "
        "phases: resume with the same ft_schedule"
    )


@pytest.mark.parametrize(
    "content,problems",
    [
        ({"n_phases": 3, "depth": True, "wait": 0, "epochs_checked": 1}, "depth"),
        ({"depth": 1, "wait": "0", "epochs_checked": 1}, "wait, n_phases"),
        ([1, 2], "depth, wait, epochs_checked, n_phases"),
    ],
    ids=["bool-depth", "string-wait-no-phases", "not-a-mapping"],
)
def test_damaged_counters_are_named(tmp_path, content, problems):
    path = tmp_path / "fts_state.json"
    path.write_text(json.dumps(content))
    with pytest.raises(FTSTransitionError) as err:
        read_state_file(str(path))
    assert str(err.value).startswith(f"{path} is damaged: {problems} missing or not an integer")
