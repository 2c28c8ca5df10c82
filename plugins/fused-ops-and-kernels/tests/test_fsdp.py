"""Two processes (torchrun, gloo, CPU): fused linear cross-entropy on an FSDP2-sharded model
gives transformers' loss and gradients (fsdp_worker.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.multiprocess
def test_fused_linear_ce_under_fsdp2_matches_the_plain_loss(tmp_path):
    worker = os.path.join(os.path.dirname(__file__), "fsdp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--standalone", worker, str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for result in ranks:
        assert result["fused_rules"] == [
            "foak.loss.fused_linear_ce.forward",
            "foak.loss.fused_linear_ce.lm_head",
        ]
        assert result["plain_loss"] > 1.0  # a real loss over the 128-token vocabulary
        assert result["fused_loss"] == pytest.approx(result["plain_loss"], rel=1e-5)
        # every parameter has a gradient (lm_head, the layers through the hidden states, the
        # embedding) and it is the plain loss's
        assert "lm_head.weight" in result["grad_names"] and len(result["grad_names"]) > 10
        worst = max(result["max_grad_diff"].values())
        assert worst <= 1e-5 * result["max_grad"], result["max_grad_diff"]
    assert ranks[0]["fused_loss"] == ranks[1]["fused_loss"]  # both averaged over the ranks
