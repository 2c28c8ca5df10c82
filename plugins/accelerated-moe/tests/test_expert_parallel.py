"""Expert parallelism over 2 and 4 processes (torchrun, gloo, CPU) gives the losses, the
gathered gradients and the clipped grad norm of ep_degree 1, under FSDP2 and DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(__file__), "ep_worker.py")


def run_worker(tmp_path, processes: int, eps: list[int]) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
           "--standalone", WORKER, str(tmp_path), *map(str, eps)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(processes)]


def _max_diff(a, b) -> float:
    if isinstance(a, list):
        return max((_max_diff(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    return abs(a - b)


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("processes,eps", [(2, [2]), (4, [2, 4])], ids=["2proc", "4proc"])
def test_expert_parallel_matches_ep_degree_1(tmp_path, processes, eps):
    ranks = run_worker(tmp_path, processes, eps)
    for result in ranks:
        for wrapper in ("fsdp2", "ddp"):
            base = result[f"{wrapper}-ep1"]
            assert base["loss"] > 3.0  # a real loss over a 96-token vocabulary
            assert not any(r.startswith("scattermoe.ep.") for r in base["rules"])
            for ep in eps:
                run = result[f"{wrapper}-ep{ep}"]
                assert any(r.startswith("scattermoe.ep.") for r in run["rules"]), run["rules"]
                assert run["loss"] == pytest.approx(base["loss"], rel=1e-5, abs=1e-6)
                assert sorted(run["grads"]) == sorted(base["grads"])
                experts = [n for n in base["grads"] if "experts" in n]
                assert experts, sorted(base["grads"])
                for name, grad in base["grads"].items():
                    assert _max_diff(run["grads"][name], grad) <= 1e-5, (wrapper, ep, name)
                # the norm covers every gradient once, clipping scales all of them by it
                assert base["norm"] > 0.05  # so clipping at 0.05 changes the gradients
                assert run["norm"] == pytest.approx(base["norm"], rel=1e-5)
                for name, grad in base["clipped"].items():
                    assert _max_diff(run["clipped"][name], grad) <= 1e-6, (wrapper, ep, name)
                assert run["experts_back"] and base["experts_back"]
    # every process saw the same averaged loss
    assert len({round(r["fsdp2-ep1"]["loss"], 6) for r in ranks}) == 1


def test_expert_shards_refuse_lora_and_fsdp1(make_moe):
    """Adapters on experts that expert parallelism would shard, and FSDP version 1 (which
    flattens every parameter of a wrapped module), are refused with the key and the way out."""
    import types

    peft = pytest.importorskip("peft")
    from fms_acceleration import AccelerationPluginConfigError, compat
    from fms_acceleration_moe.expert_parallel import refuse_fsdp1
    from fms_acceleration_moe.lora_targets import refuse_lora_on_expert_shards
    from fms_acceleration_moe.models import ARCHITECTURES

    targets = ["w1", "w2", "w3"] if not compat.fused_moe_experts() else None
    extra = {"target_modules": targets} if targets else {"target_parameters": ["gate_up_proj"]}
    model = peft.get_peft_model(make_moe("mixtral"), peft.LoraConfig(r=2, **extra))
    with pytest.raises(AccelerationPluginConfigError) as caught:
        refuse_lora_on_expert_shards(model, ARCHITECTURES["mixtral"], 2)
    for fragment in ("plugins.training.moe.scattermoe.ep_degree", "2", "LoRA", "ep_degree: 1"):
        assert fragment in str(caught.value)
    fsdp1 = types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=types.SimpleNamespace()))
    with pytest.raises(AccelerationPluginConfigError, match="FSDP version 1.*fsdp_version: 2"):
        refuse_fsdp1(fsdp1, 2)
    fsdp1.state.fsdp_plugin.fsdp_version = 2
    refuse_fsdp1(fsdp1, 2)  # FSDP2 is fine


@pytest.mark.multiprocess
@pytest.mark.slow
def test_the_train_job_under_torchrun_trains_alike_with_ep_degree_2(tmp_path):
    """The Trainer path (accelerate's DDP on CPU, its grad-norm clipping): the ep2 sample
    trains a tiny Mixtral step for step like the ep1 sample."""
    pytest.importorskip("fms_acceleration_train")
    from fms_acceleration import compat
    from fms_acceleration.testing import save_tiny_model

    if not compat.at_least("transformers", "5.0.0.dev0"):
        pytest.skip("the train job runs on transformers 5 (its from_pretrained takes dtype=)")

    model = save_tiny_model(tmp_path / "mixtral", arch="mixtral")
    samples = os.path.join(os.path.dirname(__file__), *[os.pardir] * 3, "sample-configurations")
    if not os.path.isdir(samples):
        pytest.skip("sample-configurations/ is not beside this checkout")
    losses = {}
    for ep in (1, 2):
        config = os.path.join(samples, f"moe-scattermoe-granite-ep{ep}-sample-configuration.yaml")
        out = tmp_path / f"ep{ep}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--standalone", "-m", "fms_acceleration_train", "--model", str(model),
               "--acceleration-config", config, "--max-steps", "3", "--batch-size", "4",
               "--seq-len", "32", "--no-eval", "--output-dir", str(out)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        summary = json.loads((out / "train_summary.json").read_text())
        assert summary["active_plugins"] == ["scattermoe"] and summary["steps"] == 3
        losses[ep] = summary["losses"]
    assert len(losses[1]) == 3 and losses[1][0] > 3.0
    assert losses[2] == pytest.approx(losses[1], rel=1e-5)
