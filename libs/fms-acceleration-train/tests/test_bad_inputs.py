"""Bad inputs to `fms-acceleration train`, table-driven: each ends with one line that names the
flag, file or value, exit code 2, no traceback, and nothing of the user's overwritten."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fms_acceleration_train.cli import main


def _dataset(folder: Path) -> Path:
    path = folder / "data.jsonl"
    rows = [{"prompt": f"tok{i} tok{i + 1}", "response": f"tok{i + 2}"} for i in range(10, 20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def _busy(folder: Path) -> Path:
    (folder / "busy").mkdir()
    return _write(folder / "busy", "train_summary.json", b"{}").parent


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:  # argparse's own errors
        return exit_.code


def _model_with(folder: Path, tiny: Path, damage) -> Path:
    copy = folder / "model-copy"
    shutil.copytree(tiny, copy)
    damage(copy)
    return copy


# case -> (arguments, with {model} {data} {dir} filled in; expected text of the error line)
CASES = {
    "zero steps": (["--max-steps", "0"], "--max-steps: 0 must be greater than 0."),
    "negative steps": (["--max-steps", "-3"], "--max-steps: -3 must be greater than 0."),
    "steps not a number": (["--max-steps", "ten"], "argument --max-steps: invalid int value"),
    "zero batch": (["--batch-size", "0"], "--batch-size: 0 must be greater than 0."),
    "short sequences": (["--seq-len", "4"], "--seq-len: 4 must be greater than or equal to 8."),
    "lr nan": (["--learning-rate", "nan"], "--learning-rate: .nan is not a finite number."),
    "lr inf": (["--learning-rate", "inf"], "--learning-rate: .inf is not a finite number."),
    "negative lr": (["--learning-rate", "-0.1"], "--learning-rate: -0.1 must be greater than 0."),
    "rank zero": (["--lora-r", "0"], "--lora-r: 0 must be greater than 0."),
    "dropout one": (["--lora-dropout", "1"], "--lora-dropout: 1.0 must be less than 1."),
    "negative dropout": (
        ["--lora-dropout", "-0.5"],
        "--lora-dropout: -0.5 must be greater than or equal to 0.",
    ),
    "negative seed": (["--seed", "-1"], "--seed: -1 must be greater than or equal to 0."),
    "negative threads": (
        ["--cpu-threads", "-2"],
        "--cpu-threads: -2 must be greater than or equal to 0.",
    ),
    "zero log interval": (["--log-every", "0"], "--log-every: 0 must be greater than 0."),
    "unknown dtype": (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
    "missing acceleration config": (
        ["--acceleration-config", "{dir}/nope.yaml"],
        "--acceleration-config: '{dir}/nope.yaml' file not found.",
    ),
    "acceleration config not UTF-8": (
        ["--acceleration-config", "<latin1.yaml>"],
        "latin1.yaml: the configuration file is not UTF-8 text (byte 0xe9 at line 1)",
    ),
    "acceleration config with a typo": (
        ["--acceleration-config", "<typo.yaml>"],
        "typo.yaml': plugins.trainng: unknown stanza 'trainng' (did you mean 'training'?)",
    ),
    "missing dataset": (["--dataset", "{dir}/none.jsonl"], "dataset file not found: {dir}/none"),
    "dataset is a folder": (
        ["--dataset", "{dir}"],
        "{dir}: is a folder, expected a dataset file.",
    ),
    "dataset not UTF-8": (
        ["--dataset", "<latin1.jsonl>"],
        "latin1.jsonl: the dataset file is not UTF-8 text (byte 0xe9 at line 1)",
    ),
    "dataset line not JSON": (
        ["--dataset", "<broken.jsonl>"],
        "broken.jsonl line 2: not valid JSON (Expecting property name enclosed in double",
    ),
    "dataset line not an object": (
        ["--dataset", "<list.jsonl>"],
        "list.jsonl line 1: expected an object with 'prompt' and 'response', got list",
    ),
    "dataset without responses": (
        ["--dataset", "<noresp.jsonl>"],
        "noresp.jsonl line 1: 'response' must be a non-empty string, got None",
    ),
    "empty dataset": (["--dataset", "<empty.jsonl>"], "empty.jsonl: no examples"),
    "model folder missing": (
        ["--model", "{dir}/absent"],
        "--model must be a local HF model directory; not found: {dir}/absent",
    ),
    "model without config": (["--model", "{dir}"], "--model {dir} has no config.json"),
    "model with a corrupt config": (
        ["--model", "<corrupt-config>"],
        "config.json: the model config (config.json) is not valid JSON (line 1",
    ),
    "model of an unknown architecture": (
        ["--model", "<unknown-arch>"],
        "model_type 'llama9000' is not an architecture this transformers version knows",
    ),
    "model with truncated weights": (
        ["--model", "<truncated>"],
        "model.safetensors: truncated (5000 of",
    ),
    "model without weights": (
        ["--model", "<no-weights>"],
        ": no weights (model.safetensors, model.safetensors.index.json, pytorch_model.bin)",
    ),
    "output dir is a file": (
        ["--output-dir", "{dir}/data.jsonl"],
        "--output-dir: '{dir}/data.jsonl' is a file; give a folder.",
    ),
    "output dir under a file": (
        ["--output-dir", "{dir}/data.jsonl/sub"],
        "--output-dir: '{dir}/data.jsonl/sub' is under {dir}/data.jsonl, which is a file; give a "
        "folder.",
    ),
    "output dir holds results": (
        ["--output-dir", "<busy>"],
        "busy: is not empty (results of an earlier run would be overwritten); pass --overwrite",
    ),
    "unknown target module": (
        ["--target-modules", "q_prj"],
        "--target-modules ['q_prj']: Target modules {{'q_prj'}} not found in the base model",
    ),
}


def _materialise(arg: str, folder: Path, tiny: Path) -> str:
    makers = {
        "<latin1.yaml>": lambda: _write(
            folder, "latin1.yaml", "plugins: {} # caf\xe9".encode("latin-1")
        ),
        "<typo.yaml>": lambda: _write(folder, "typo.yaml", b"plugins:\n  trainng:\n    x: {}\n"),
        "<latin1.jsonl>": lambda: _write(
            folder, "latin1.jsonl", '{"prompt": "caf\xe9"}'.encode("latin-1")
        ),
        "<broken.jsonl>": lambda: _write(
            folder, "broken.jsonl", b'{"prompt": "a", "response": "b"}\n{prompt: 1}\n'
        ),
        "<list.jsonl>": lambda: _write(folder, "list.jsonl", b'["a", "b"]\n'),
        "<noresp.jsonl>": lambda: _write(folder, "noresp.jsonl", b'{"prompt": "a"}\n'),
        "<empty.jsonl>": lambda: _write(folder, "empty.jsonl", b"\n\n"),
        "<corrupt-config>": lambda: _model_with(
            folder, tiny, lambda m: (m / "config.json").write_text('{"model_type":')
        ),
        "<unknown-arch>": lambda: _model_with(
            folder, tiny, lambda m: (m / "config.json").write_text('{"model_type": "llama9000"}')
        ),
        "<truncated>": lambda: _model_with(
            folder,
            tiny,
            lambda m: (m / "model.safetensors").write_bytes(
                (m / "model.safetensors").read_bytes()[:5000]
            ),
        ),
        "<no-weights>": lambda: _model_with(
            folder, tiny, lambda m: (m / "model.safetensors").unlink()
        ),
        "<busy>": lambda: _busy(folder),
    }
    if arg in makers:
        return str(makers[arg]())
    return arg.format(dir=folder, model=tiny)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_ends_with_one_line(case, tmp_path, tiny_model, capsys):
    arguments, expected = CASES[case]
    options = {
        "--model": str(tiny_model),
        "--dataset": str(_dataset(tmp_path)),
        "--output-dir": str(tmp_path / "out"),
        "--max-steps": "1",
    }
    given = [_materialise(a, tmp_path, tiny_model) for a in arguments]
    options.update(dict(zip(given[::2], given[1::2])))
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    code = _run([*(x for pair in options.items() for x in pair), "--no-eval"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected.format(dir=tmp_path) in err, err
    assert "Traceback" not in err
    if not expected.startswith("argument "):  # argparse adds its usage lines
        errors = [line for line in err.splitlines() if "error" in line]
        assert len(errors) == 1 and errors[0].startswith("fms-acceleration train: error: "), err
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing rewritten
