"""Two processes (torchrun, gloo, CPU): multipack + padding-free under DDP through the Trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.multiprocess
def test_each_example_once_and_tokens_balanced_across_two_processes(tmp_path):
    worker = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--standalone", worker, str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    lengths, ranks = result["lengths"], result["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["measured"] == list(range(len(lengths))) for r in ranks)
    # every example exactly once over the two processes, none on both
    reads = ranks[0]["read"] + ranks[1]["read"]
    assert sorted(reads) == list(range(len(lengths)))
    # the same number of steps on both, each process's tokens are what its examples hold
    assert ranks[0]["steps"] == ranks[1]["steps"] == len(ranks[0]["tokens"]) > 1
    totals = [sum(r["tokens"]) for r in ranks]
    assert totals == [sum(lengths[i] for i in r["read"]) for r in ranks]
    assert abs(totals[0] - totals[1]) / (sum(totals) / 2) < 0.10
    # tokens seen are gathered over both processes, and DDP kept the replicas identical
    assert ranks[0]["tokens_seen"] == ranks[1]["tokens_seen"] == sum(lengths)
    assert ranks[0]["weights"] == ranks[1]["weights"]
