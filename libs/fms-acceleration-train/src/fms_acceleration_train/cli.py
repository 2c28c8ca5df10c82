"""`fms-acceleration train`: the argparse subcommand (entry point group fms_acceleration.cli)."""

from __future__ import annotations

import argparse
import sys

from .acceleration_defaults import resolve_acceleration
from .errors import user_errors
from .runner import DEFAULT_TARGET_MODULES, TrainJobConfig

_DEFAULTS = TrainJobConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the training job's options to `parser`."""
    d = _DEFAULTS
    parser.add_argument(
        "--acceleration-config",
        metavar="FILE",
        help="framework YAML (a sample-configurations/*.yaml); default: the built-in one "
        "(padding-free training with fused linear cross-entropy)",
    )
    parser.add_argument(
        "--no-acceleration",
        action="store_true",
        help="train with plain transformers + peft (no framework plugins)",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also train the plain baseline (each run in a fresh process) and show both: "
        "tokens/s, peak memory, loss, held-out accuracy and the ratio",
    )
    parser.add_argument(
        "--model",
        metavar="DIR",
        help="local HF model directory (default: the embedded SmolLM2-135M-Instruct); "
        "smollm2-moe: that model up-cycled into 8 experts, top-2 (a Mixtral, built once)",
    )
    parser.add_argument(
        "--dataset",
        metavar="JSONL",
        help='{"prompt": ..., "response": ...} per line (default: a built-in dataset whose '
        "held-out prompts measure answer accuracy before and after training)",
    )
    parser.add_argument(
        "--output-dir", default=d.output_dir, metavar="DIR", help="adapter and summary go here"
    )
    parser.add_argument("--max-steps", type=int, default=d.max_steps, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per step")
    parser.add_argument("--seq-len", type=int, default=d.seq_len, help="max tokens per example")
    parser.add_argument("--learning-rate", type=float, default=d.learning_rate, help="peak lr")
    parser.add_argument("--lora-r", type=int, default=d.lora_r, help="LoRA rank")
    parser.add_argument("--lora-alpha", type=int, default=d.lora_alpha, help="LoRA scale")
    parser.add_argument("--lora-dropout", type=float, default=d.lora_dropout, help="LoRA dropout")
    parser.add_argument(
        "--target-modules",
        nargs="+",
        default=list(DEFAULT_TARGET_MODULES),
        metavar="NAME",
        help="modules that get LoRA adapters",
    )
    parser.add_argument(
        "--full-finetuning",
        action="store_true",
        help="train all parameters (or those a plugin such as finetuning_schedule thaws) "
        "instead of LoRA adapters; saves the whole model",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --output-dir, replacing the results there",
    )
    parser.add_argument(
        "--dtype",
        default=d.dtype,
        choices=("auto", "float32", "bfloat16", "float16"),
        help="auto: bfloat16 on GPU, float32 on CPU",
    )
    parser.add_argument(
        "--cpu-threads",
        type=int,
        default=d.cpu_threads,
        help="torch threads on CPU; 0: $OMP_NUM_THREADS, else half the logical CPUs",
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="data order and LoRA init")
    parser.add_argument(
        "--no-eval", action="store_true", help="skip the before/after answer-accuracy check"
    )
    parser.add_argument("--log-every", type=int, default=d.log_every, help="print loss every N")
    # --- evaluation split, periodic evaluation and checkpoints, resume
    parser.add_argument(
        "--eval-split",
        type=float,
        default=d.eval_split,
        metavar="FRACTION",
        help="hold out this fraction of the training examples to report eval_loss on",
    )
    parser.add_argument(
        "--eval-steps", type=int, help="evaluate every N steps (default: once per epoch)"
    )
    parser.add_argument("--save-steps", type=int, help="save a checkpoint every N steps")
    parser.add_argument(
        "--resume-from-checkpoint",
        metavar="DIR|last",
        help="continue from a checkpoint-N folder, or 'last': the newest one in --output-dir",
    )
    parser.add_argument(
        "--allow-partial-resume",
        action="store_true",
        help="resume even if the checkpoint lacks the optimizer or scheduler state (the run "
        "then differs from an uninterrupted one)",
    )


def config_from_args(
    args: argparse.Namespace, acceleration_config: str | None = None
) -> TrainJobConfig:
    """Build the job configuration from parsed arguments and the resolved acceleration config."""
    return TrainJobConfig(
        output_dir=args.output_dir,
        acceleration_config=acceleration_config,
        model=args.model,
        dataset=args.dataset,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        learning_rate=args.learning_rate,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=tuple(args.target_modules),
        full_finetuning=args.full_finetuning,
        overwrite=args.overwrite,
        cpu_threads=args.cpu_threads,
        dtype=args.dtype,
        seed=args.seed,
        evaluate=not args.no_eval,
        log_every=args.log_every,
        eval_split=args.eval_split,
        eval_steps=args.eval_steps,
        save_steps=args.save_steps,
        resume_from_checkpoint=args.resume_from_checkpoint,
        allow_partial_resume=args.allow_partial_resume,
    )


def run(args: argparse.Namespace) -> int:
    """Run the job; print the summary. Exit code 0, or 2 with a one-line error for bad input."""
    from .interrupt import TrainingInterrupted
    from .runner import run_train_job

    expected = user_errors()
    try:
        acceleration, note = resolve_acceleration(
            args.acceleration_config, args.no_acceleration, args.compare
        )
        if note:
            print(f"acceleration: {note}", flush=True)
        config = config_from_args(args, acceleration)
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
        print(f"summaries written to {args.output_dir}/{{baseline,accelerated}}/; comparison to "
              f"{args.output_dir}/comparison.json")  # fmt: skip
        return 0
    print(summary.format())
    print(f"summary written to {args.output_dir}/train_summary.json")
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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python -m fms_acceleration_train [options]`: the same as `fms-acceleration train`."""
    parser = argparse.ArgumentParser(
        prog="python -m fms_acceleration_train",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
