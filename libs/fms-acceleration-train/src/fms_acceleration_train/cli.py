"""`fms-acceleration train`: the argparse subcommand (entry point group fms_acceleration.cli)."""

from __future__ import annotations

import argparse
import sys

from .acceleration_defaults import resolve_acceleration
from .errors import TrainJobError, user_errors
from .flags import FlagModel
from .quiet import quiet_third_party_start
from .runner import TrainJobConfig, with_run_folder


class TrainCommand(FlagModel):
    """What the command runs beside the job of its TrainJobConfig."""

    error_type = TrainJobError

    no_acceleration: bool = False
    """train with plain transformers + peft (no framework plugins)"""
    compare: bool = False
    """also train the plain baseline (each run in a fresh process) and show both: tokens/s,
    peak memory, loss, held-out accuracy and the ratio"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the training job's options to `parser`."""
    TrainCommand.add_flags(parser)
    TrainJobConfig.add_flags(parser)


def config_from_args(
    args: argparse.Namespace, acceleration_config: str | None = None
) -> TrainJobConfig:
    """Build the job configuration from parsed arguments and the resolved acceleration config."""
    return TrainJobConfig.from_flags(args, acceleration_config=acceleration_config)


def run(args: argparse.Namespace) -> int:
    """Run the job; print the summary. Exit code 0, or 2 with a one-line error for bad input."""
    from .interrupt import TrainingInterrupted
    from .runner import run_train_job

    quiet_third_party_start()
    expected = user_errors()
    try:
        acceleration, note = resolve_acceleration(
            args.acceleration_config, args.no_acceleration, args.compare
        )
        if note:
            print(f"acceleration: {note}", flush=True)
        config = with_run_folder(config_from_args(args, acceleration))
        if args.compare:
            from .compare import run_comparison

            comparison = run_comparison(config)
        else:
            summary = run_train_job(config)
    except expected as e:
        print(f"fms-acceleration train: error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        print(f"fms-acceleration train: {e}", file=sys.stderr)
        return 130
    if args.compare:
        print(comparison.accelerated.format())
        print(comparison.format())
        print(f"summaries written to {config.output_dir}/{{baseline,accelerated}}/; comparison "
              f"to {config.output_dir}/comparison.json")  # fmt: skip
        return 0
    print(summary.format())
    print(f"summary written to {config.output_dir}/train_summary.json")
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `train` subcommand (entry point of group fms_acceleration.cli)."""
    parser = subparsers.add_parser(
        "train",
        help="fine-tune with LoRA through the framework and print a summary",
        description="Fine-tune a causal LM with LoRA using transformers.Trainer, accelerated by "
        "the plugins an --acceleration-config enables (by default the built-in padding-free "
        "configuration); saves the adapter and writes OUTPUT_DIR/train_summary.json (tokens/s, "
        "peak memory, loss, answer accuracy). --compare also trains the plain baseline.",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python -m fms_acceleration_train [options]`: the same as `fms-acceleration train`."""
    parser = argparse.ArgumentParser(prog="python -m fms_acceleration_train")
    add_arguments(parser)
    return run(parser.parse_args(argv))
