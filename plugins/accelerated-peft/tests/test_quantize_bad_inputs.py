"""Bad inputs to `python -m fms_acceleration_peft.quantize`: each is one line naming the flag,
exit code 2, no traceback, and nothing written."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from fms_acceleration_peft.quantize import main as quantize_main


def _checkpoint_copy(tiny_llama_dir: str, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, copy)
    return copy


def _break_config(model: Path) -> None:
    (model / "config.json").write_text('{"model_type": "llama",', encoding="utf-8")


def _drop_tokenizer(model: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)


def _truncate_weights(model: Path) -> None:
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])


def _latin1_calibration(model: Path) -> Path:
    path = model.parent / "calib.txt"
    path.write_bytes("tok1 tok2 caf\xe9\n".encode("latin-1"))
    return path


CASES = {
    "corrupt config.json": (_break_config, [], "config.json is not valid JSON (line 1"),
    "no tokenizer": (_drop_tokenizer, [], ": no usable tokenizer there"),
    "truncated weights": (_truncate_weights, [], ": the checkpoint cannot be loaded"),
    "non-UTF-8 calibration file": (
        None,
        ["--calibration", "<latin1>"],
        "calib.txt: the calibration file is not UTF-8 text (byte 0xe9 at line 1)",
    ),
    "calibration is a folder": (
        None,
        ["--calibration", "<folder>"],
        ": is a folder, expected a text file",
    ),
    "float32 with gptqmodel": (
        None,
        ["--dtype", "float32", "--quantizer", "gptqmodel"],
        "--dtype float32: use bfloat16 or float16 with --quantizer gptqmodel"
        if importlib.util.find_spec("gptqmodel")
        else "--quantizer gptqmodel: the package 'gptqmodel' is not installed",
    ),
    "asymmetric 3-bit": (None, ["--bits", "3", "--asym"], "--bits 3: not supported by"),
    "unknown dtype": (None, ["--dtype", "int8"], "--dtype int8: dtype='int8' is not a floating"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_clear_line(case, tiny_llama_dir, tmp_path, capsys):
    damage, extra, message = CASES[case]
    model = _checkpoint_copy(tiny_llama_dir, tmp_path)
    if damage is not None:
        damage(model)
    replacements = {"<latin1>": str(_latin1_calibration(model)), "<folder>": str(tmp_path)}
    extra = [replacements.get(arg, arg) for arg in extra]
    output = tmp_path / "quantized"
    with pytest.raises(SystemExit) as exit_info:
        quantize_main(["--model", str(model), "--output", str(output), *extra])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert message in err, err
    assert "Traceback" not in err
    assert not output.exists() or not any(output.iterdir())
