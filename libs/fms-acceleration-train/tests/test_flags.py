"""Command-line flags generated from the option models: names, types, defaults, help, errors."""

from __future__ import annotations

import argparse
from typing import Annotated

import pytest
from pydantic import Field

from fms_acceleration import choice
from fms_acceleration_train import Flag, FlagModel, TrainJobConfig, TrainJobError
from fms_acceleration_train.cli import TrainCommand, add_arguments, config_from_args

# the flags users have: renaming one breaks their scripts
TRAIN_FLAGS = [
    "--no-acceleration", "--compare", "--acceleration-config", "--model", "--dataset",
    "--output-dir", "--max-steps", "--batch-size", "--seq-len", "--learning-rate", "--lora-r",
    "--lora-alpha", "--lora-dropout", "--target-modules", "--full-finetuning", "--overwrite",
    "--dtype", "--cpu-threads", "--seed", "--no-eval", "--eval-max-new-tokens", "--log-every",
    "--eval-split", "--eval-steps", "--save-steps", "--resume-from-checkpoint",
    "--allow-partial-resume", "--uniform-mixture",
]  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train", formatter_class=_Wide)
    add_arguments(parser)
    return parser


class _Wide(argparse.HelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=200, max_help_position=40)


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    return [a.option_strings[0] for a in parser._actions if a.option_strings][1:]  # no -h


def test_every_field_is_a_flag_named_after_it():
    assert _flags(_parser()) == TRAIN_FLAGS
    # one flag per field, nothing else
    assert len(TRAIN_FLAGS) == len(TrainJobConfig.model_fields) + len(TrainCommand.model_fields)


def test_no_flags_give_the_default_config_and_every_flag_reaches_its_field():
    parser = _parser()
    assert config_from_args(parser.parse_args([])) == TrainJobConfig()
    args = parser.parse_args(
        ["--model", "m", "--dataset", "d.jsonl", "--output-dir", "o", "--max-steps", "7",
         "--batch-size", "3", "--seq-len", "64", "--learning-rate", "2e-4", "--lora-r", "4",
         "--lora-alpha", "9", "--lora-dropout", "0.25", "--target-modules", "q_proj", "up_proj",
         "--full-finetuning", "--overwrite", "--dtype", "bfloat16", "--cpu-threads", "3",
         "--seed", "5", "--no-eval", "--eval-max-new-tokens", "11", "--log-every", "2",
         "--eval-split", "0.3", "--eval-steps", "4", "--save-steps", "6",
         "--resume-from-checkpoint", "last", "--allow-partial-resume", "--uniform-mixture",
         "--compare"]
    )  # fmt: skip
    config = config_from_args(args)
    assert config.model_dump() == {
        "acceleration_config": None, "model": "m", "dataset": "d.jsonl", "output_dir": "o",
        "max_steps": 7, "batch_size": 3, "seq_len": 64, "learning_rate": 2e-4, "lora_r": 4,
        "lora_alpha": 9, "lora_dropout": 0.25, "target_modules": ("q_proj", "up_proj"),
        "full_finetuning": True, "overwrite": True, "dtype": "bfloat16", "cpu_threads": 3,
        "seed": 5, "evaluate": False, "eval_max_new_tokens": 11, "log_every": 2,
        "eval_split": 0.3, "eval_steps": 4, "save_steps": 6, "resume_from_checkpoint": "last",
        "allow_partial_resume": True, "uniform_mixture": True,
    }  # fmt: skip
    assert TrainCommand.from_flags(args) == TrainCommand(compare=True, no_acceleration=False)


def test_help_comes_from_the_docstrings_and_says_what_defaults_mean():
    text = " ".join(_parser().format_help().split())
    for line in (
        "--max-steps N optimizer steps (default: 40)",
        "--learning-rate LEARNING_RATE peak learning rate (default: 0.001)",
        "--target-modules NAME [NAME ...] modules that get LoRA adapters (default: q_proj "
        "k_proj v_proj o_proj)",
        "--dtype {auto,float32,bfloat16,float16} auto: bfloat16 on GPU, float32 on CPU "
        "(default: auto)",
        "--model DIR local HF model directory (default: the embedded SmolLM2-135M-Instruct)",
        "--no-eval do not check answer accuracy on the held-out prompts before and after "
        "training --eval-max-new-tokens",
        "--eval-steps N evaluate every N steps (default: once per epoch)",
        "--save-steps N save a checkpoint every N steps --resume-from-checkpoint DIR|last",
        "--compare also train the plain baseline",
    ):
        assert line in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_argparse_refuses_what_is_not_of_the_flag_type(capsys):
    for argv, message in (
        (["--max-steps", "ten"], "argument --max-steps: invalid int value: 'ten'"),
        (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
        (["--target-modules"], "argument --target-modules: expected at least one argument"),
        (["--no-eval", "yes"], "unrecognized arguments: yes"),
    ):
        with pytest.raises(SystemExit) as exit_:
            _parser().parse_args(argv)
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err


class _Options(FlagModel):
    """A model written by someone adding options: each field is all it takes."""

    error_type = TrainJobError

    source: Annotated[str, Flag(positional=True)]
    """where to read"""
    experts: Annotated[int, Field(gt=0)] = 8
    """experts per layer"""
    top_k: Annotated[int | None, Field(ge=1), Flag(default="all experts")] = None
    """experts per token"""
    ratio: float = 0.5
    """mixing ratio"""
    weights: Annotated[tuple[float, ...], Flag(metavar="W")] = Field(
        default_factory=lambda: (0.25, 0.75)
    )
    """per-dataset weights"""
    router: choice("top_k", "sinkhorn") = "top_k"
    """routing"""
    shuffle: bool = True
    """shuffle the mixture"""


def test_a_new_field_is_a_new_flag():
    parser = argparse.ArgumentParser(prog="x", formatter_class=_Wide)
    _Options.add_flags(parser, defaults={"ratio": 0.75})
    help_text = " ".join(parser.format_help().split())
    assert "usage: x [-h] [--experts N] [--top-k N] [--ratio RATIO] [--weights W [W ...]] " in (
        help_text
    )
    for line in (
        "SOURCE where to read",
        "--experts N experts per layer (default: 8)",
        "--top-k N experts per token (default: all experts)",
        "--ratio RATIO mixing ratio (default: 0.75)",
        "--weights W [W ...] per-dataset weights (default: 0.25 0.75)",
        "--router {top_k,sinkhorn} routing (default: top_k)",
        "--no-shuffle do not shuffle the mixture",
    ):
        assert line in help_text
    options = _Options.from_flags(parser.parse_args(["in.jsonl"]))
    assert options.model_dump() == {
        "source": "in.jsonl", "experts": 8, "top_k": None, "ratio": 0.75,
        "weights": (0.25, 0.75), "router": "top_k", "shuffle": True,
    }  # fmt: skip
    args = parser.parse_args(
        ["in.jsonl", "--top-k", "2", "--weights", "1", "2", "3", "--router", "sinkhorn",
         "--no-shuffle"]
    )  # fmt: skip
    options = _Options.from_flags(args, experts=4)
    assert (options.top_k, options.weights, options.router, options.shuffle) == (
        2, (1.0, 2.0, 3.0), "sinkhorn", False,
    )  # fmt: skip
    assert options.experts == 4  # given values win over the flags
    with pytest.raises(TrainJobError) as err:
        _Options.from_flags(parser.parse_args(["in.jsonl", "--top-k", "0"]))
    assert str(err.value) == "--top-k: 0 must be greater than or equal to 1."


def test_a_field_without_a_flag_type_is_refused_by_name():
    class Nested(FlagModel):
        table: dict[str, int] = Field(default_factory=dict)
        """not a flag"""

    with pytest.raises(TypeError, match=r"^table: no command-line flag for a field of type"):
        Nested.add_flags(argparse.ArgumentParser())
    Nested.add_flags(argparse.ArgumentParser(), exclude={"table"})
