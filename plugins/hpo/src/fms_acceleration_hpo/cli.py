"""`fms-acceleration search`: the argparse subcommand (entry point group fms_acceleration.cli)."""

from __future__ import annotations

import argparse
import sys

_DESCRIPTION = """\
Run an optuna study whose trials are runs of `fms-acceleration train`. CONFIG is an acceleration
YAML with a plugins.training.hpo stanza (metric, sampler, pruner, search space) and any other
plugin stanzas. Running the same command again against the same --storage adds a worker (or
resumes a stopped study: failed trials are retried from their checkpoints). Every option of
`fms-acceleration train` sets the base of each trial; the search space overrides its targets.
"""


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `search` subcommand (entry point of group fms_acceleration.cli)."""
    from fms_acceleration_train.cli import add_arguments

    parser = subparsers.add_parser(
        "search",
        help="hyper-parameter search (optuna) over the training job",
        description=_DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("config", metavar="CONFIG", help="acceleration YAML with training.hpo")
    parser.add_argument(
        "--trials", type=int, required=True, help="trials in the whole study (all workers)"
    )
    parser.add_argument(
        "--storage",
        required=True,
        metavar="URL",
        help="sqlite:///FILE, journal://FILE or postgresql://USER@HOST/DB",
    )
    parser.add_argument("--study-name", default="search", help="study name in the storage")
    parser.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="start no new trial after this long"
    )
    parser.add_argument(
        "--retry-running",
        action="store_true",
        help="also retry RUNNING trials whose process is dead (killed workers)",
    )
    parser.add_argument(
        "--no-backup", action="store_true", help="do not back up a sqlite study before resuming"
    )
    parser.add_argument("--plot", metavar="FILE", help="write the study's PNG here")
    add_arguments(parser)
    parser.set_defaults(output_dir="outputs/search", eval_split=0.1, func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run one worker; print the table. Exit 0, or 2 with a one-line error for bad input."""
    from fms_acceleration_train import TrainJobError
    from fms_acceleration_train.cli import config_from_args
    from fms_acceleration_train.errors import user_errors

    from .search import SearchRequest, run_search

    expected = user_errors()
    try:
        if args.acceleration_config:
            raise TrainJobError(
                "--acceleration-config: give the acceleration YAML as CONFIG (the first "
                "argument of search)"
            )
        for flag in ("compare", "no_acceleration"):
            if getattr(args, flag, False):
                raise TrainJobError(
                    f"--{flag.replace('_', '-')}: not an option of search (each trial runs with "
                    "the acceleration of CONFIG)"
                )
        if args.trials <= 0:
            raise TrainJobError(f"--trials: {args.trials} must be > 0.")
        if args.timeout is not None and args.timeout <= 0:
            raise TrainJobError(f"--timeout: {args.timeout} must be > 0.")
        request = SearchRequest(
            config=args.config,
            trials=args.trials,
            storage=args.storage,
            study_name=args.study_name,
            train_options=config_from_args(args).model_dump(),
            timeout=args.timeout,
            retry_running=args.retry_running,
            backup=not args.no_backup,
            plot=args.plot,
        )
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
