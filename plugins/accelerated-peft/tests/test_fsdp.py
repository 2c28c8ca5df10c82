"""FSDP2 (fully_shard, gloo, 2 CPU processes) shards the 4-bit base weights of both plugins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("fsdp_worker.py")


def _torchrun(plugin_id: str, model_dir: str, tmp_path: Path) -> list[dict]:
    out = tmp_path / f"{plugin_id}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--standalone", str(WORKER), plugin_id, model_dir, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_COMPILE_DISABLE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads(Path(f"{out}.rank{rank}").read_text()) for rank in (0, 1)]


def _check(results: list[dict], quantized_suffixes: tuple[str, ...], expected_count: int):
    for rank, result in enumerate(results):
        assert result["world_size"] == 2
        shards = {
            name: sizes
            for name, sizes in result["quantized"].items()
            if name.endswith(quantized_suffixes)
        }
        assert len(shards) == expected_count, (rank, sorted(shards))
        for name, (full, local) in shards.items():
            assert local * 2 == full, (rank, name, full, local)  # dim-0 halves on each rank
        losses = result["losses"]
        # FSDP reproduces the unsharded forward on the same batch, then the loss falls
        assert losses[0] == pytest.approx(result["unsharded_loss"], abs=1e-3)
        assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.multiprocess
def test_fsdp_shards_bitsandbytes_weights(tiny_llama_dir, tmp_path):
    results = _torchrun("bitsandbytes", tiny_llama_dir, tmp_path)
    # Params4bit storage (bf16 quant storage) of all 14 block linears
    _check(results, ("proj.weight", "proj.base_layer.weight"), 14)


@pytest.mark.multiprocess
def test_fsdp_shards_gptq_integer_tensors(gptq_dir, tmp_path):
    results = _torchrun("auto_gptq", gptq_dir, tmp_path)
    _check(results, ("qweight", "qzeros", "scales", "g_idx"), 14 * 4)
