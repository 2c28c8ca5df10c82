"""Offline GPTQ quantization of a checkpoint directory (a GPTQ-LoRA base for `auto_gptq`).

    python -m fms_acceleration_peft.quantize --model DIR --output DIR --bits 4 --group-size 128 \
        [--calibration FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from fms_acceleration.yaml_loading import read_text_file

from .calibration import BUILTIN_CALIBRATION, read_calibration_file, tokenize_calibration
from .dtypes import resolve_dtype
from .gptq_loading import GPTQ_DTYPES, default_device, ensure_gptqmodel_cpu_workers

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)


class QuantizeArgumentError(ValueError):
    """A quantization argument cannot be used; the message names the flag and the value."""


def check_arguments(
    model: str | Path,
    output: str | Path,
    bits: int,
    group_size: int,
    calibration: str | Path | None = None,
    max_length: int = 256,
) -> None:
    """Raise QuantizeArgumentError naming the first flag whose value cannot work."""
    model, output = Path(model), Path(output)
    if not (model / "config.json").is_file():
        raise QuantizeArgumentError(
            f"--model {model}: not a checkpoint directory (no config.json found there)"
        )
    try:
        json.loads(read_text_file(model / "config.json", "model config", QuantizeArgumentError))
    except json.JSONDecodeError as err:
        raise QuantizeArgumentError(
            f"--model {model}: config.json is not valid JSON (line {err.lineno}: {err.msg})"
        ) from None
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise QuantizeArgumentError(f"--output {output}: exists and is not an empty directory")
    if output.resolve() == model.resolve():
        raise QuantizeArgumentError(f"--output {output}: must differ from --model")
    if bits not in SUPPORTED_BITS:
        allowed = ", ".join(map(str, SUPPORTED_BITS))
        raise QuantizeArgumentError(f"--bits {bits}: not supported; use one of {allowed}")
    if group_size not in SUPPORTED_GROUP_SIZES:
        allowed = ", ".join(map(str, SUPPORTED_GROUP_SIZES))
        raise QuantizeArgumentError(
            f"--group-size {group_size}: not supported; use one of {allowed} (-1: one group "
            "per row)"
        )
    if calibration is not None and not Path(calibration).is_file():
        what = "is a folder, expected a text file" if Path(calibration).is_dir() else "no such file"
        raise QuantizeArgumentError(f"--calibration {calibration}: {what}")
    if max_length < 16:
        raise QuantizeArgumentError(f"--max-length {max_length}: must be at least 16 tokens")


def quantize_checkpoint(
    model: str | Path,
    output: str | Path,
    bits: int = 4,
    group_size: int = 128,
    calibration: str | Path | None = None,
    dtype: torch.dtype | str = torch.bfloat16,
    max_length: int = 256,
) -> Path:
    """GPTQ-quantize the checkpoint in `model` and save it (with its tokenizer) to `output`."""
    check_arguments(model, output, bits, group_size, calibration, max_length)
    try:
        compute_dtype = resolve_dtype(dtype, str(model), torch.bfloat16)
    except ValueError as err:
        raise QuantizeArgumentError(f"--dtype {dtype}: {err}") from None
    if compute_dtype not in GPTQ_DTYPES:
        raise QuantizeArgumentError(f"--dtype {dtype}: use bfloat16 or float16")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model))
    except (OSError, ValueError, TypeError) as err:
        raise QuantizeArgumentError(
            f"--model {model}: no usable tokenizer there ({type(err).__name__}: "
            f"{str(err).splitlines()[0]}); the GPTQ checkpoint needs one for calibration"
        ) from None
    texts = (
        read_calibration_file(calibration, QuantizeArgumentError)
        if calibration
        else list(BUILTIN_CALIBRATION)
    )
    samples = tokenize_calibration(texts, tokenizer, max_length)
    if not samples:
        where = f"--calibration {calibration}" if calibration else "the built-in calibration text"
        raise QuantizeArgumentError(f"{where}: no sample has at least 10 tokens")

    ensure_gptqmodel_cpu_workers()
    from gptqmodel import GPTQModel, QuantizeConfig

    config = QuantizeConfig(bits=bits, group_size=group_size, desc_act=False, sym=True)
    device = default_device()
    try:
        quantized = GPTQModel.load(str(model), config, device=device, dtype=compute_dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise QuantizeArgumentError(
            f"--model {model}: the checkpoint cannot be loaded ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no detail'}); check its config.json "
            "and weight files"
        ) from None
    quantized.quantize(samples, tokenizer=tokenizer)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    quantized.save(str(output))
    tokenizer.save_pretrained(str(output))
    return output


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of `python -m fms_acceleration_peft.quantize`."""
    parser = argparse.ArgumentParser(
        prog="python -m fms_acceleration_peft.quantize",
        description="Write a GPTQ checkpoint for GPTQ-LoRA (peft.quantization.auto_gptq).",
    )
    parser.add_argument("--model", required=True, help="checkpoint directory to quantize")
    parser.add_argument("--output", required=True, help="empty or new directory to write")
    parser.add_argument("--bits", type=int, default=4, help="bits per weight (default 4)")
    parser.add_argument(
        "--group-size", type=int, default=128, help="columns sharing a scale (default 128)"
    )
    parser.add_argument(
        "--calibration",
        default=None,
        help="text file of calibration samples (blank-line separated); default: built-in text",
    )
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16 (default) or float16")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per calibration sample")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: quantize, print the output directory, exit 0 (2 on a bad argument)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        output = quantize_checkpoint(
            args.model,
            args.output,
            bits=args.bits,
            group_size=args.group_size,
            calibration=args.calibration,
            dtype=args.dtype,
            max_length=args.max_length,
        )
    except QuantizeArgumentError as err:
        parser.error(str(err))
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
