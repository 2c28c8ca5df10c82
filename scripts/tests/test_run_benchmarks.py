"""The benchmark runner's scenario file and tables (`tox -e run-benches` does the runs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import run_benchmarks as bench

import generate_sample_configurations as gen

SCENARIOS = Path(bench.__file__).resolve().parent / "scenarios.yaml"


def test_scenarios_file_of_the_repo_parses_and_names_known_samples():
    scenarios = bench.load_scenarios(SCENARIOS)
    assert {s.device for s in scenarios} == {"cpu", "cuda"}
    known = set(gen.SAMPLES) | {bench.BASELINE}
    for s in scenarios:
        assert set(s.framework_configs) <= known, s.name
        assert s.baseline in s.framework_configs


def test_bad_scenario_names_the_scenario(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("scenarios:\n  - name: x\n    device: tpu\n")
    with pytest.raises(ValueError, match="scenario x: device must be cpu or cuda"):
        bench.load_scenarios(path)
    path.write_text("scenarios:\n  - name: y\n    device: cpu\n    baseline: b\n")
    with pytest.raises(ValueError, match="scenario y: baseline 'b' is not one of"):
        bench.load_scenarios(path)


def test_cli_arguments_and_markdown_ratios():
    assert bench._cli_arguments({"max_steps": 8, "no_eval": True, "full_finetuning": False}) == [
        "--max-steps",
        "8",
        "--no-eval",
    ]
    scenario = bench.Scenario("s", "cpu", ("none", "fast"), "none", {}, (None,), {}, 60)
    runs = [
        bench.Run("s", "none", "m", "ok", 100.0, 10.0, 9.0, 2000.0, 0.5, 1.0),
        bench.Run("s", "fast", "m", "ok", 150.0, 8.0, 6.0, 1500.0, 0.5, 1.0),
        bench.Run("s", "broken", "m", "failed (exit 1)", error="boom"),
    ]
    env = {"date": "d", "device": "cpu: x", "python": "3", "versions": "v"}
    table = bench.markdown(runs, [scenario], env, "noisy")
    assert "| s | none* | m | ok | 100.0 | 1.00x | 2000 | 1.00x |" in table
    assert "| s | fast | m | ok | 150.0 | 1.50x | 1500 | 0.75x |" in table
    assert "| s | broken | m | failed (exit 1): boom | - | - | - | - |" in table
    assert "- note: noisy" in table


def test_scenarios_are_read_with_the_strict_loader(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("scenarios:\n  - name: x\n    device: cpu\n    device: cuda\n")
    with pytest.raises(ValueError, match=r"s\.yaml: duplicate key 'device' at line 4 \(first"):
        bench.load_scenarios(path)


def test_one_run_trains_in_its_own_process_and_reads_the_summary(tmp_path):
    from fms_acceleration.testing import save_tiny_model

    model = save_tiny_model(tmp_path / "tiny", seed=4)
    scenario = bench.Scenario(
        name="smoke",
        device="cpu",
        framework_configs=(bench.BASELINE, "aadp-padding-free"),
        baseline=bench.BASELINE,
        arguments={"max_steps": 2, "batch_size": 2, "seq_len": 16, "no_eval": True},
        models=(str(model),),
        config_overrides={},
        timeout_s=300,
    )
    work = tmp_path / "work"
    work.mkdir()
    runs = [bench.execute(scenario, name, str(model), work) for name in scenario.framework_configs]
    assert [run.status for run in runs] == ["ok", "ok"], [run.error for run in runs]
    assert all(run.train_tokens_per_s > 0 for run in runs)


def test_kernel_benchmarks_of_the_repo_are_options_of_the_kernel_benchmark():
    benches = bench.load_kernel_benchmarks(SCENARIOS)
    assert {b.device for b in benches} == {"cpu", "cuda"}
    for b in benches:
        impls = b.arguments["impls"]
        assert "foak" in impls and "cce" in impls, b.name  # ours and Cut Cross-Entropy
        assert ("liger" in impls) == (b.device == "cuda"), b.name  # Liger: CUDA only
    cpu = next(b for b in benches if b.name == "flce-peers-cpu-bf16")
    assert cpu.arguments["dtype"] == "bfloat16" and cpu.arguments["threads"] == 1


def test_bad_kernel_benchmark_names_the_entry(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        "kernel_benchmarks:\n  - name: k\n    device: cpu\n    arguments: {vocabs: 3}\n"
    )
    with pytest.raises(ValueError, match=r"kernel benchmark k: arguments .* are not options"):
        bench.load_kernel_benchmarks(path)
    path.write_text("kernel_benchmarks:\n  - name: k\n    device: gpu\n")
    with pytest.raises(ValueError, match="kernel benchmark k: device must be cpu or cuda"):
        bench.load_kernel_benchmarks(path)
