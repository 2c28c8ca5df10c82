"""Offline GPTQ quantization of a checkpoint directory (a GPTQ-LoRA base for `auto_gptq`).

    fms-acceleration-peft-quantize --model DIR --output DIR --bits 4 --group-size 128 \
        [--calibration FILE] [--desc-act] [--asym] [--quantizer fms|gptqmodel]

Our own GPTQ implementation (gptq_sequential) needs no GPTQ package; `--quantizer gptqmodel`
uses gptqmodel instead where it is installed. Both write the standard GPTQ checkpoint
(quantize_config.json, quantization_config in config.json, int32-packed safetensors) that
auto_gptq, gptqmodel, transformers and our loader read.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from fms_acceleration import compat
from fms_acceleration.yaml_loading import read_text_file

from .calibration import BUILTIN_CALIBRATION, read_calibration_file, tokenize_calibration
from .dtypes import resolve_dtype
from .gptq_checkpoint import QUANTIZE_CONFIG, GPTQSettings
from .gptq_format import PACKED_BITS
from .gptq_loading import GPTQ_DTYPES, OWN_DTYPES, default_device, ensure_gptqmodel_cpu_workers

QUANTIZERS = ("fms", "gptqmodel")
SUPPORTED_BITS = {"fms": PACKED_BITS, "gptqmodel": (2, 3, 4, 8)}
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
    quantizer: str = "fms",
    damp_percent: float = 0.01,
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
    if quantizer not in QUANTIZERS:
        raise QuantizeArgumentError(f"--quantizer {quantizer}: not one of {', '.join(QUANTIZERS)}")
    if quantizer == "gptqmodel" and importlib.util.find_spec("gptqmodel") is None:
        raise QuantizeArgumentError(
            "--quantizer gptqmodel: the package 'gptqmodel' is not installed (pip install "
            "'fms-acceleration-peft[gptq]'); the default --quantizer fms needs no package"
        )
    if bits not in SUPPORTED_BITS[quantizer]:
        allowed = ", ".join(map(str, SUPPORTED_BITS[quantizer]))
        raise QuantizeArgumentError(
            f"--bits {bits}: not supported by --quantizer {quantizer}; use one of {allowed}"
        )
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
    if not 0 < damp_percent <= 1:
        raise QuantizeArgumentError(
            f"--damp-percent {damp_percent}: must be in (0, 1] (a fraction of the mean Hessian "
            "diagonal)"
        )


def quantize_checkpoint(
    model: str | Path,
    output: str | Path,
    bits: int = 4,
    group_size: int = 128,
    calibration: str | Path | None = None,
    dtype: torch.dtype | str = torch.bfloat16,
    max_length: int = 256,
    *,
    desc_act: bool = False,
    sym: bool = True,
    damp_percent: float = 0.01,
    quantizer: str = "fms",
) -> Path:
    """GPTQ-quantize the checkpoint in `model` and save it (with its tokenizer) to `output`."""
    check_arguments(
        model, output, bits, group_size, calibration, max_length, quantizer, damp_percent
    )
    try:
        compute_dtype = resolve_dtype(dtype, str(model), torch.bfloat16)
    except ValueError as err:
        raise QuantizeArgumentError(f"--dtype {dtype}: {err}") from None
    allowed = GPTQ_DTYPES if quantizer == "gptqmodel" else OWN_DTYPES
    if compute_dtype not in allowed:
        names = " or ".join(str(d).removeprefix("torch.") for d in allowed)
        raise QuantizeArgumentError(f"--dtype {dtype}: use {names} with --quantizer {quantizer}")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model))
    except (OSError, ValueError, TypeError, ImportError) as err:
        # ImportError: with no tokenizer files, transformers 4.55 tries converters it lacks
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
    # An asymmetric zero of 0 cannot be stored in the original format (it stores zero - 1), and
    # gptqmodel refuses asymmetric "gptq" checkpoints it did not write: they go in "gptq_v2".
    checkpoint_format = "gptq" if sym or quantizer == "gptqmodel" else "gptq_v2"
    settings = GPTQSettings(
        bits, group_size, desc_act=desc_act, sym=sym, checkpoint_format=checkpoint_format
    )
    quantize = _quantize_with_gptqmodel if quantizer == "gptqmodel" else _quantize_with_fms
    output = Path(output)
    quantize(Path(model), output, samples, settings, compute_dtype, damp_percent)
    tokenizer.save_pretrained(str(output))
    return output


def _load_failure(model: Path, err: Exception) -> QuantizeArgumentError:
    detail = str(err).splitlines()[0] if str(err) else "no detail"
    return QuantizeArgumentError(
        f"--model {model}: the checkpoint cannot be loaded ({type(err).__name__}: {detail}); "
        "check its config.json and weight files"
    )


def _quantize_with_fms(
    model_dir: Path,
    output: Path,
    samples: list[dict[str, list[int]]],
    settings: GPTQSettings,
    dtype: torch.dtype,
    damp_percent: float,
) -> None:
    from transformers import AutoModelForCausalLM

    from fms_acceleration.packages import installed_version

    from .gptq_linear import GPTQLinear
    from .gptq_sequential import GPTQRecipe, quantize_decoder_layers

    device = default_device()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **compat.dtype_kwargs(dtype))
    except Exception as err:  # transformers/safetensors raise many kinds for a broken checkpoint
        raise _load_failure(model_dir, err) from None
    model.to(device).eval()
    recipe = GPTQRecipe(
        settings.bits,
        settings.group_size,
        settings.sym,
        settings.desc_act,
        damp_percent,
        min_zero=settings.zero_offset,  # "gptq" stores zero - 1: a zero of 0 cannot be written
    )
    batches = [
        {
            "input_ids": torch.tensor([s["input_ids"]], device=device),
            "attention_mask": torch.tensor([s["attention_mask"]], device=device),
        }
        for s in samples
    ]
    quantized = quantize_decoder_layers(model, batches, recipe)
    for name, codes in quantized.items():
        linear = model.get_submodule(name)
        layer = GPTQLinear(
            linear.in_features,
            linear.out_features,
            settings.bits,
            settings.group_size,
            bias=linear.bias is not None,
            zero_offset=settings.zero_offset,
            device=linear.weight.device,
        )
        layer.load_quantized(codes, linear.bias)
        model.set_submodule(name, layer)
    config = settings.as_config(
        damp_percent=damp_percent,
        true_sequential=True,
        static_groups=False,
        meta={"quantizer": [f"fms-acceleration-peft:{installed_version('fms-acceleration-peft')}"]},
    )
    model.config.quantization_config = config
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output))
    (output / QUANTIZE_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")


def _quantize_with_gptqmodel(
    model_dir: Path,
    output: Path,
    samples: list[dict[str, list[int]]],
    settings: GPTQSettings,
    dtype: torch.dtype,
    damp_percent: float,
) -> None:
    ensure_gptqmodel_cpu_workers()
    from gptqmodel import GPTQModel, QuantizeConfig

    config = QuantizeConfig(
        bits=settings.bits,
        group_size=settings.group_size,
        desc_act=settings.desc_act,
        sym=settings.sym,
        damp_percent=damp_percent,
    )
    try:
        quantized = GPTQModel.load(str(model_dir), config, device=default_device(), dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise _load_failure(model_dir, err) from None
    quantized.quantize(samples)
    output.mkdir(parents=True, exist_ok=True)
    quantized.save(str(output))


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of `python -m fms_acceleration_peft.quantize`."""
    parser = argparse.ArgumentParser(
        prog="fms-acceleration-peft-quantize",
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
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        help="dtype of the unquantized weights and the calibration pass: bfloat16 (default), "
        "float16, or float32 (--quantizer fms only)",
    )
    parser.add_argument("--max-length", type=int, default=256, help="tokens per calibration sample")
    parser.add_argument(
        "--desc-act",
        action="store_true",
        help="quantize columns in order of decreasing activation (g_idx records the groups)",
    )
    parser.add_argument(
        "--asym", action="store_true", help="asymmetric grids (a zero point per group)"
    )
    parser.add_argument(
        "--damp-percent",
        type=float,
        default=0.01,
        help="Hessian damping, a fraction of its mean diagonal (default 0.01)",
    )
    parser.add_argument(
        "--quantizer",
        default="fms",
        choices=QUANTIZERS,
        help="fms (default, our GPTQ, no package needed) or gptqmodel (if installed)",
    )
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
            desc_act=args.desc_act,
            sym=not args.asym,
            damp_percent=args.damp_percent,
            quantizer=args.quantizer,
        )
    except QuantizeArgumentError as err:
        parser.error(str(err))
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
