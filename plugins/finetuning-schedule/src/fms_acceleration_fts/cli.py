"""`fms-acceleration gen-schedule MODEL_DIR -o FILE`: write the default fine-tuning schedule."""

from __future__ import annotations

import argparse
import os
import sys

from .schedule import default_schedule_filename, write_schedule


def build_meta_model(model_dir: str):
    """The model of MODEL_DIR with parameters on the meta device (names only, no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def gen_schedule(args: argparse.Namespace) -> int:
    """Generate the default schedule of a model directory and write it; return the exit code."""
    from fms_acceleration_adapters import select_strategy_adapter

    try:
        model = build_meta_model(args.model_dir)
    except (OSError, ValueError) as err:
        print(
            f"gen-schedule: cannot read a model config from {args.model_dir!r}: {err}",
            file=sys.stderr,
        )
        return 2
    adapter = select_strategy_adapter("single_device", phase_size=args.phase_size)
    schedule = adapter.gen_default_schedule(model)
    out = args.output or default_schedule_filename(type(model).__name__)
    if os.path.isdir(out):
        out = os.path.join(out, default_schedule_filename(type(model).__name__))
    write_schedule(schedule, out)
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
        help="output YAML file (default ./<ModelClass>_ft_schedule.yaml)",
    )
    parser.add_argument("--phase-size", type=int, default=2, help="tensors per phase (default 2)")
    parser.set_defaults(func=gen_schedule)
