"""What the client trains: a tiny random-init Llama with its tokenizer, a pre-tokenized JSONL
dataset (the client's data format 1), a GPTQ checkpoint of the Llama for the GPTQ rows and a
tiny Mixtral for the MoE rows."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

# the tiny tokenizer's first ids are its special tokens (unk, pad, bos, eos); words follow
FIRST_WORD_ID = 4
VOCAB = 128
PROMPT_TOKENS = 3
GPTQ_BITS = 4
# a divisor of the tiny model's widths (64, 128), so every linear layer has whole groups
GPTQ_GROUP_SIZE = 32


def dataset_rows(n: int = 32, seed: int = 0) -> list[dict[str, list[int]]]:
    """Pre-tokenized examples of 8..24 tokens that count upward; the prompt tokens are masked.

    Lengths differ so padding, padding-free and multipack see different batches of one data.
    """
    rng = random.Random(seed)
    words = VOCAB - FIRST_WORD_ID
    rows = []
    for _ in range(n):
        length = rng.randint(8, 24)
        start = rng.randrange(words)
        ids = [FIRST_WORD_ID + (start + k) % words for k in range(length)]
        labels = [-100] * PROMPT_TOKENS + ids[PROMPT_TOKENS:]
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """One JSON object per line."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def calibration_text(rows: list[dict[str, list[int]]], tokenizer) -> str:
    """The dataset as text in the tokenizer's words, one sample per blank-line separated block."""
    return (
        "\n\n".join(" ".join(tokenizer.convert_ids_to_tokens(r["input_ids"])) for r in rows) + "\n"
    )


def build_fixtures(folder: Path) -> tuple[Path, Path]:
    """Save the tiny model (with its tokenizer) and the dataset under `folder`; return both."""
    from fms_acceleration.testing import save_tiny_model

    model = save_tiny_model(folder / "tiny-llama", "llama", vocab_size=VOCAB)
    data = write_jsonl(folder / "train.jsonl", dataset_rows())
    return model, data


def save_moe_model(folder: Path) -> Path:
    """Save a tiny random-init Mixtral (with its tokenizer) under `folder` for the MoE rows."""
    from fms_acceleration.testing import save_tiny_model

    return save_tiny_model(folder / "tiny-mixtral", "mixtral", vocab_size=VOCAB)


def quantize_gptq(model: Path, data: Path, output: Path, log: Path) -> Path:
    """Quantize `model` with our GPTQ quantizer (calibrated on the dataset) into `output`.

    Raises RuntimeError with the quantizer's last output lines when it fails.
    """
    from transformers import AutoTokenizer

    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    calibration = output.parent / "gptq-calibration.txt"
    calibration.write_text(
        calibration_text(rows, AutoTokenizer.from_pretrained(model)), encoding="utf-8"
    )
    command = [
        sys.executable, "-m", "fms_acceleration_peft.quantize",
        "--model", str(model),
        "--output", str(output),
        "--bits", str(GPTQ_BITS),
        "--group-size", str(GPTQ_GROUP_SIZE),
        "--calibration", str(calibration),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    log.write_text(done.stdout + done.stderr, encoding="utf-8")
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-5:])
        raise RuntimeError(f"the GPTQ quantizer failed (exit {done.returncode}):\n{tail}")
    return output
