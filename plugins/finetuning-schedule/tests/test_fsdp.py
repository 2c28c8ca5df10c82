"""FTS under FSDP2 (2 processes, gloo, CPU) against the same run in one process."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.mark.multiprocess
def test_fsdp2_matches_single_process_run(tmp_path, h):
    """Phase transitions, an optimizer and an LR-scheduler reinitialization on sharded (DTensor)
    parameters: both ranks end identical, and equal to the single-process run."""
    import fsdp_worker

    h.torchrun("fsdp_worker.py", str(tmp_path))
    sharded = json.loads((tmp_path / "fsdp.json").read_text())
    single = fsdp_worker.train(str(tmp_path / "single"), fsdp=False)

    assert sharded["world"] == 2 and sharded["adapter"] == "FSDPStrategyAdapter"
    assert single["adapter"] == "StrategyAdapter" and single["dtensors"] == 0
    assert sharded["dtensors"] == len(sharded["final"]) == 12  # every parameter sharded
    for run in (sharded, single):
        assert [tuple(t) for t in run["transitions"]] == [(1, 2), (2, 4)]
        assert (run["optimizer"], run["scheduler"]) == ("SGD", "StepLR")
        # phase 0 (the Trainer's 2 groups: lm_head decays, norm does not), phases 1 and 2
        assert [tuple(g) for g in run["groups"]] == [(0, 1), (0, 1), (1, 3), (2, 4)]
        assert run["changed"]["model.embed_tokens.weight"] == 0.0  # in no phase
    assert sharded["rank_spread"] == 0.0
    # lrs after each step: constant 1e-2 for phase 0; phase 1's SGD keeps it and adds its
    # groups at 5e-3; phase 2's StepLR restarts every group at its initial_lr (0.02 for the
    # rebuilt phase 0, 5e-3, 1e-2) and halves them each step
    expected = [
        [1e-2, 1e-2],
        [1e-2, 1e-2],
        [1e-2, 1e-2, 5e-3],
        [1e-2, 1e-2, 5e-3],
        [1e-2, 1e-2, 2.5e-3, 5e-3],
        [5e-3, 5e-3, 1.25e-3, 2.5e-3],
    ]
    for run in (sharded, single):
        assert len(run["lrs"]) == 6
        for got, want in zip(run["lrs"], expected):
            assert got == pytest.approx(want), run["lrs"]
    for name, values in single["final"].items():
        torch.testing.assert_close(
            torch.tensor(sharded["final"][name]), torch.tensor(values), atol=2e-5, rtol=1e-4
        )
