"""The `search` command's flags: its own (SearchRequest) and the train job's, from one definition;
and hpo uses the train job only through its public API."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest

import fms_acceleration_hpo
import fms_acceleration_train
from fms_acceleration.cli import main as cli_main
from fms_acceleration_hpo.cli import register
from fms_acceleration_hpo.request import NOT_TRIAL_FLAGS


def _search_parser() -> argparse.ArgumentParser:
    return register(argparse.ArgumentParser().add_subparsers())


def test_hpo_imports_only_the_public_api_of_the_train_job():
    imported: list[str] = []
    for path in Path(fms_acceleration_hpo.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "fms_acceleration_train"
            ):
                assert node.module == "fms_acceleration_train", f"{path.name}: {node.module}"
                imported += [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("fms_acceleration_train") for a in node.names)
    assert set(imported) <= set(fms_acceleration_train.__all__)
    assert {"TrainJobConfig", "FlagModel", "run_train_job"} <= set(imported)


def test_search_takes_the_train_flags_a_trial_does_not_set_itself():
    parser = _search_parser()
    flags = [a.option_strings[0] for a in parser._actions if a.option_strings][1:]
    own = ["--trials", "--storage", "--study-name", "--timeout", "--retry-running", "--no-backup",
           "--plot"]  # fmt: skip
    assert flags[: len(own)] == own
    train = [
        f for f in fms_acceleration_train.TrainJobConfig.model_fields if f not in NOT_TRIAL_FLAGS
    ]
    assert len(flags) == len(own) + len(train) == 7 + 20
    assert "--no-eval" not in flags and "--acceleration-config" not in flags
    args = parser.parse_args(["hpo.yaml", "--trials", "3", "--storage", "sqlite:///s.db"])
    assert (args.config, args.trials, args.study_name, args.backup) == (
        "hpo.yaml",
        3,
        "search",
        True,
    )
    # a search's own defaults for the trials' base options
    assert (args.output_dir, args.eval_split, args.max_steps) == ("outputs/search", 0.1, 40)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--trials", "0"], "--trials: 0 must be greater than 0."),
        (["--trials", "2", "--timeout", "-1"], "--timeout: -1.0 must be greater than 0."),
        (["--trials", "2", "--seq-len", "4"], "--seq-len: 4 must be greater than or equal to 8."),
        # every trial would fail making its folder: refused before the study starts
        (
            ["--trials", "2", "--output-dir", "{tmp}/notes.txt/out"],
            "--output-dir: '{tmp}/notes.txt/out' is under {tmp}/notes.txt, which is a file; give "
            "a folder.",
        ),
    ],
)
def test_bad_flags_end_with_one_line(argv, message, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a folder")
    storage = f"sqlite:///{tmp_path / 's.db'}"
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert cli_main(["search", str(tmp_path / "hpo.yaml"), "--storage", storage, *argv]) == 2
    expected = message.format(tmp=tmp_path)
    assert capsys.readouterr().err.strip() == f"fms-acceleration search: error: {expected}"
    assert not (tmp_path / "s.db").exists()
