"""`fms-acceleration search`: the argparse subcommand (entry point group fms_acceleration.cli)."""

from __future__ import annotations

import argparse
import sys

_DESCRIPTION = """\
Run an optuna study whose trials are runs of `fms-acceleration train`. CONFIG is an acceleration
YAML with a plugins.training.hpo stanza (metric, sampler, pruner, search space) and any other
plugin stanzas. Running the same command again against the same --storage adds a worker (or
resumes a stopped study: failed trials are retried from their checkpoints). The options of
`fms-acceleration train` set the base of each trial (but those a trial sets itself: evaluation
and checkpoint steps, resume); the search space overrides its targets.
"""


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `search` subcommand (entry point of group fms_acceleration.cli)."""
    from fms_acceleration_train import TrainJobConfig

    from .request import NOT_FLAGS, NOT_TRIAL_FLAGS, TRIAL_DEFAULTS, SearchRequest

    parser = subparsers.add_parser(
        "search",
        help="hyper-parameter search (optuna) over the training job",
        description=_DESCRIPTION,
    )
    SearchRequest.add_flags(parser, exclude=NOT_FLAGS)
    TrainJobConfig.add_flags(parser, exclude=NOT_TRIAL_FLAGS, defaults=TRIAL_DEFAULTS)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run one worker; print the table. Exit 0, or 2 with a one-line error for bad input."""
    from fms_acceleration_train import TrainJobConfig, user_errors

    from .request import SearchRequest
    from .search import run_search

    expected = user_errors()
    try:
        train_options = TrainJobConfig.from_flags(args).model_dump()
        request = SearchRequest.from_flags(args, train_options=train_options)
        result = run_search(request)
    except expected as err:
        print(f"fms-acceleration search: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "fms-acceleration search: interrupted; run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    if result is not None:
        print(result.table)
        if result.plot is not None:
            print(f"plot written to {result.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m fms_acceleration_hpo CONFIG ...` (what torchrun runs): `search` alone."""
    parser = argparse.ArgumentParser(prog="python -m fms_acceleration_hpo")
    subparsers = parser.add_subparsers(dest="command")
    register(subparsers)
    return run(parser.parse_args(["search", *(sys.argv[1:] if argv is None else argv)]))
