"""Two processes (torchrun, gloo, CPU): every rank draws the same categories and reaches the
same weights; rewards are summed over both ranks' shares of the evaluation sets."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.multiprocess
def test_two_ranks_draw_the_same_categories_and_weights(tmp_path):
    worker = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        worker,
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads((tmp_path / f"result_{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in results] == [0, 1] and results[0]["world"] == 2
    assert results[0]["steps"] == results[1]["steps"] == 5
    assert results[0]["ratio"] == results[1]["ratio"]
    logs = [records(tmp_path / "odm.jsonl"), records(tmp_path / "odm_rank_1.jsonl")]
    arms = [[r["arm_idx"] for r in log if r["action"] == "sample"] for log in logs]
    n = min(len(a) for a in arms)
    # each step takes 2 rows per rank from the common stream: at least 5 x 4 drawn on each
    assert n >= 20 and arms[0][:n] == arms[1][:n]
    assert len(set(arms[0])) > 1
    updates = [[r for r in log if r["action"] == "update"] for log in logs]
    assert [u["step"] for u in updates[0]] == [1, 2, 3, 4, 5]
    for a, b in zip(*updates):
        assert a["current_sampling_weights"] == b["current_sampling_weights"]
        assert a["rewards"] == b["rewards"]
        # 5 evaluation rows per category, split 3 + 2 over the ranks, summed
        assert a["count"] == [5, 5, 5]
    assert results[0]["validation_loss"] == results[1]["validation_loss"]
