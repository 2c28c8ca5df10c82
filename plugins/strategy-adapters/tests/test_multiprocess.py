"""2-process runs on CPU (gloo, torchrun): FTS thaws a second phase under DDP and FSDP2.

The script (scripts/train_two_phases.py) trains through the framework with the
finetuning_schedule plugin; every rank sees different data, so parameters stay identical across
ranks only if the strategy adapter handled the parameters thawed mid-training.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fms_acceleration_fts")

SCRIPT = Path(__file__).resolve().parent / "scripts" / "train_two_phases.py"
PHASE0 = {"lm_head.weight", "model.norm.weight"}
PHASE1 = {
    "model.layers.1.mlp.down_proj.weight",
    "model.layers.1.mlp.up_proj.weight",
    "model.layers.1.mlp.gate_proj.weight",
    "model.layers.1.self_attn.o_proj.weight",
}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from fms_acceleration.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", seed=0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_processes(model_dir: Path, out: Path, *extra: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        str(SCRIPT),
        f"--model={model_dir}",
        f"--out={out}",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out / "report.json").read_text())


def check_trained_in_sync(report: dict) -> None:
    assert report["world_size"] == 2
    assert report["depth"] == 1
    assert [t["global_step"] for t in report["transitions"]] == [3]
    assert set(report["thawed"]) == PHASE0 | PHASE1
    for name, change in report["changed"].items():
        if name in PHASE0 | PHASE1:
            assert change > 1e-3, name  # trained
        else:
            assert change == 0.0, name  # never thawed
    assert max(report["rank_max_abs_diff"].values()) == 0.0


@pytest.mark.multiprocess
def test_ddp_two_processes_fts(tiny_model_dir, tmp_path):
    report = run_two_processes(tiny_model_dir, tmp_path, "--strategy=ddp")
    assert report["adapter"] == "DDPStrategyAdapter"
    assert report["distributed_type"] == "DistributedType.MULTI_CPU"
    # DDP was built in phase 0: only the adapter averages the phase-1 gradients
    assert report["synced_param_count"] == len(PHASE1)
    check_trained_in_sync(report)


@pytest.mark.multiprocess
def test_ddp_without_thaw_sync_diverges(tiny_model_dir, tmp_path):
    """Control: the same run with the adapter's gradient averaging off drifts apart."""
    report = run_two_processes(
        tiny_model_dir, tmp_path, "--strategy=ddp", '--adapter-cfg={"sync_thawed_grads": false}'
    )
    assert report["synced_param_count"] == 0
    diff = report["rank_max_abs_diff"]
    assert min(diff[n] for n in PHASE1) > 1e-3
    # per-rank gradient norms differ, so clipping drifts even the DDP-synced phase-0 params
    assert max(diff[n] for n in PHASE0) > 0.0


@pytest.mark.multiprocess
def test_fsdp2_bf16_two_processes_fts(tiny_model_dir, tmp_path):
    """FSDP2 with bf16 mixed precision; layer 1's shard group is frozen at lazy init."""
    report = run_two_processes(tiny_model_dir, tmp_path, "--strategy=fsdp2", "--bf16")
    assert report["adapter"] == "FSDPStrategyAdapter"
    assert report["distributed_type"] == "DistributedType.FSDP"
    assert report["dtensor_params"] == len(report["changed"])  # every parameter is sharded
    check_trained_in_sync(report)
