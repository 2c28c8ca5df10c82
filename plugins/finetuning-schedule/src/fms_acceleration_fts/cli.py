"""`fms-acceleration gen-schedule MODEL_DIR -o FILE`: write the default fine-tuning schedule."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .schedule import default_schedule_filename, dump_schedule


def build_meta_model(model_dir: str):
    """The model of MODEL_DIR with parameters on the meta device (names only, no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"{value} is not a phase size: each phase needs at least 1 tensor"
        )
    return value


def _local_model_dir_problem(model_dir: str) -> str | None:
    """What is wrong with a local model folder (None for a good one or a hub id)."""
    looks_local = os.path.isabs(model_dir) or model_dir.startswith((".", "~"))
    if not os.path.exists(model_dir):
        return "no such folder" if looks_local else None
    if not os.path.isdir(model_dir):
        return "it is a file; pass the model's folder"
    config = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config):
        return "the folder has no config.json"
    try:
        with open(config, encoding="utf-8") as fh:
            json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{config} is not valid JSON ({err})"
    return None


def _fail(message: str) -> int:
    print(f"gen-schedule: {message}", file=sys.stderr)
    return 2


def gen_schedule(args: argparse.Namespace) -> int:
    """Generate the default schedule of a model directory and write it; return the exit code."""
    from fms_acceleration_adapters import select_strategy_adapter

    problem = _local_model_dir_problem(args.model_dir)
    if problem:
        return _fail(f"cannot read a model config from {args.model_dir!r}: {problem}")
    try:
        model = build_meta_model(args.model_dir)
    except (OSError, ValueError, KeyError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        return _fail(f"cannot read a model config from {args.model_dir!r}: {reason}")
    adapter = select_strategy_adapter("single_device", phase_size=args.phase_size)
    schedule = adapter.gen_default_schedule(model)
    name = default_schedule_filename(type(model).__name__)
    out = args.output or name
    if os.path.isdir(out):
        out = os.path.join(out, name)
    if os.path.exists(out) and not args.force:
        return _fail(f"{out} exists; pass --force to overwrite it, or choose another -o")
    parent = os.path.dirname(out)
    try:
        if parent:
            os.makedirs(parent, exist_ok=True)
        with open(out, "w", encoding="utf-8") as fh:
            fh.write(dump_schedule(schedule))
    except OSError as err:
        return _fail(f"cannot write {out}: {err.strerror or err}")
    print(f"wrote {len(schedule)} phases for {type(model).__name__} to {out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the gen-schedule subcommand to the fms-acceleration CLI."""
    parser = subparsers.add_parser(
        "gen-schedule",
        help="write the default fine-tuning schedule (reverse parameter order) of a model",
    )
    parser.add_argument("model_dir", help="model directory or hub id with a config.json")
    parser.add_argument(
        "-o",
        "--output",
        default=None,
        help="output YAML file or folder (default ./<ModelClass>_ft_schedule.yaml)",
    )
    parser.add_argument(
        "--phase-size", type=_positive_int, default=2, help="tensors per phase (default 2)"
    )
    parser.add_argument(
        "--force", action="store_true", help="overwrite the output file if it exists"
    )
    parser.set_defaults(func=gen_schedule)
