"""The job's built-in acceleration (padding-free, fused CE) and `--compare` (baseline and
accelerated in fresh processes, side by side), on a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fms_acceleration_train import acceleration_defaults, cli
from fms_acceleration_train.acceleration_defaults import DEFAULT_CONFIG, resolve_acceleration
from fms_acceleration_train.errors import TrainJobError

ROOT = Path(__file__).resolve().parents[3]
NOTE = "built-in (padding-free, fused CE); --no-acceleration trains without it, --compare runs both"
ACTIVE = ["fused_ops_and_kernels", "padding_free"]


@pytest.fixture()
def dataset(tmp_path):
    """Rows of 4 to 10 tiny-tokenizer words, so that padding matters."""
    lines = [
        json.dumps({"prompt": " ".join(f"tok{i + j}" for j in range(1 + i % 5)),
                    "response": f"tok{i + 7} tok9"})
        for i in range(10, 26)
    ]  # fmt: skip
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "data.jsonl"


def _argv(tmp_path, tiny_model, dataset, *extra):
    return [
        "--model", str(tiny_model), "--dataset", str(dataset), "--output-dir",
        str(tmp_path / "out"), "--max-steps", "3", "--batch-size", "4", "--seq-len", "16",
        "--learning-rate", "1e-2", "--target-modules", "q_proj", "v_proj", "--log-every", "1",
        *extra,
    ]  # fmt: skip


def test_the_default_is_the_padding_free_fused_ce_sample_configuration():
    sample = ROOT / "sample-configurations" / "foak-fused-ce-padding-free-sample-configuration.yaml"
    shipped = yaml.safe_load(DEFAULT_CONFIG.read_text(encoding="utf-8"))
    assert shipped == yaml.safe_load(sample.read_text(encoding="utf-8"))
    assert shipped == {
        "plugins": {
            "training": {
                "attention": {"padding_free": {"method": "huggingface"}},
                "fused_ops_and_kernels": {
                    "fast_loss": "fused_ce_liger",
                    "fast_rms_layernorm": False,
                    "fast_rope_embeddings": False,
                    "fast_swiglu": False,
                },
            }
        }
    }


@pytest.mark.parametrize(
    ("explicit", "disabled", "compare", "expected"),
    [
        (None, False, False, (str(DEFAULT_CONFIG), NOTE)),
        (None, False, True, (str(DEFAULT_CONFIG), NOTE)),
        ("mine.yaml", False, True, ("mine.yaml", None)),
        (None, True, False, (None, None)),
    ],
)
def test_resolve_acceleration(explicit, disabled, compare, expected):
    assert resolve_acceleration(explicit, disabled, compare) == expected


@pytest.mark.parametrize(
    ("explicit", "disabled", "compare", "message"),
    [
        ("x.yaml", True, False, "--no-acceleration and --acceleration-config exclude each other"),
        (None, True, True, "--compare runs the plain baseline and an accelerated run; drop "
         "--no-acceleration"),
    ],
)  # fmt: skip
def test_contradicting_options_are_refused(explicit, disabled, compare, message):
    with pytest.raises(TrainJobError) as info:
        resolve_acceleration(explicit, disabled, compare)
    assert str(info.value) == message


def test_without_the_plugin_package_the_job_trains_plain_and_says_so(monkeypatch):
    monkeypatch.setattr(acceleration_defaults, "installed_version", lambda name: None)
    assert resolve_acceleration(None, False, False) == (
        None,
        "the built-in acceleration (padding-free, fused CE) needs fms-acceleration-aadp, "
        "fms-acceleration-foak (pip install fms-acceleration-aadp fms-acceleration-foak); "
        "training without acceleration",
    )
    with pytest.raises(TrainJobError, match="^--compare: the built-in acceleration"):
        resolve_acceleration(None, False, True)


def test_no_options_train_with_the_builtin_acceleration(tmp_path, tiny_model, dataset, capsys):
    assert cli.main(_argv(tmp_path, tiny_model, dataset)) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"acceleration: {NOTE}\n")
    assert "  acceleration      built-in (padding-free, fused CE)\n" in out
    assert "  active plugins    fused_ops_and_kernels, padding_free\n" in out
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["acceleration_config"] == str(DEFAULT_CONFIG)
    assert summary["active_plugins"] == ACTIVE
    # non-padding tokens of 3 steps x 4 rows (the first 12 rows of the shuffled data)
    assert 12 * 5 <= summary["train_tokens"] <= 12 * 10


def test_builtin_acceleration_with_the_builtin_dataset_and_its_evaluation(tmp_path, tiny_model):
    # generation before and after training goes through the patched model (left padding, cache)
    argv = ["--model", str(tiny_model), "--output-dir", str(tmp_path / "out"), "--max-steps", "2",
            "--seq-len", "48", "--target-modules", "q_proj", "v_proj"]  # fmt: skip
    assert cli.main(argv) == 0
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["active_plugins"] == ACTIVE and summary["eval_examples"] == 48
    assert 0.0 <= summary["accuracy_after"] <= 1.0 and len(summary["eval_samples"]) == 3


def test_compare_trains_both_and_shows_them_side_by_side(tmp_path, tiny_model, dataset, capsys):
    assert cli.main(_argv(tmp_path, tiny_model, dataset, "--compare", "--no-eval")) == 0
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "out" / "comparison.json").read_text())
    base, fast = data["baseline"], data["accelerated"]
    assert base["active_plugins"] == [] and fast["active_plugins"] == ACTIVE
    assert base["saved_to"] == str(tmp_path / "out" / "baseline" / "adapter")
    assert (tmp_path / "out" / "accelerated" / "train_summary.json").is_file()
    # the same rows in the same order: the same non-padding tokens and, packed or padded,
    # the same losses
    assert base["train_tokens"] == fast["train_tokens"]
    assert fast["losses"] == pytest.approx(base["losses"], abs=1e-4)
    assert data["speedup_tokens_per_s"] == pytest.approx(  # written with 4 decimals
        fast["train_tokens_per_s"] / base["train_tokens_per_s"], abs=5e-5
    )
    table = out[out.index("fms-acceleration train --compare") :].splitlines()
    assert table[0] == "fms-acceleration train --compare (3 steps x batch 4, same data and seed)"
    assert table[1].split() == ["baseline", "accelerated", "ratio"]
    speed = next(line for line in table if line.strip().startswith("train tokens/s"))
    assert speed.split()[-1] == f"{data['speedup_tokens_per_s']:.2f}x"
    plugins = next(line for line in table if line.strip().startswith("active plugins"))
    assert plugins.split()[2:] == ["none", "fused_ops_and_kernels,", "padding_free"]
