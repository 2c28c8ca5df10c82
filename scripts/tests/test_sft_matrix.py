"""The client matrix's own logic (scripts/client): its rows, the client's command line, reading
what a run left behind, the verdicts and the table. `tox -e client` runs the matrix itself."""

from __future__ import annotations

import csv
import io
import itertools
import json
import math

import pytest
import sft_fixtures
import sft_launch
import sft_matrix
import sft_report
import sft_rows
import sft_runs
from sft_rows import ROWS, STEPS, Check, Row
from sft_runs import RunResult


def _logs(*records: tuple[str, int, float]) -> str:
    return "".join(
        json.dumps({"name": name, "data": {"step": step, "value": value, "epoch": 0.1}}) + "\n"
        for name, step, value in records
    )


def _trained(*losses: float, plugins: frozenset[str] = frozenset()) -> RunResult:
    return RunResult("trained", list(enumerate(losses, 1)), plugins)


# --- rows -------------------------------------------------------------------------------------


def test_every_check_names_an_earlier_row_and_every_row_that_runs_trains_by_its_flags():
    named = sft_rows.rows_by_name()
    assert len(named) == len(ROWS) == 14
    for row in ROWS:
        if row.check is not None:
            assert list(named).index(row.check.against) < list(named).index(row.name)
            assert 0 < row.check.rtol <= 0.05
        # each dtype flag pair once per row, and LoRA wherever a quantized base is trained
        assert row.flags.count("--torch_dtype") == 1, row.name
        if {"--bnb_qlora", "--auto_gptq", "--fused_lora"} & set(row.flags):
            assert "--peft_method" in row.flags and "--bf16" in row.flags, row.name
    # the accelerations the client documents for a CPU, each in a row
    flags = {f for row in ROWS for f in row.flags}
    documented = ("--padding_free", "--multipack", "--fast_kernels", "--bnb_qlora", "--auto_gptq")
    for flag in (*documented, "--fused_lora", "--fast_moe"):
        assert flag in flags
    assert [r.name for r in ROWS if r.base == "gptq"] == ["gptq-lora", "fused-lora-gptq"]
    assert [r.name for r in ROWS if r.base == "mixtral"] == ["moe-full", "fast-moe"]


def test_rows_by_name_refuses_duplicates_and_checks_against_later_rows():
    with pytest.raises(ValueError, match="row 'a' is defined twice"):
        sft_rows.rows_by_name((Row("a", ()), Row("a", ())))
    with pytest.raises(ValueError, match="row 'b' checks against 'c', which is not an earlier"):
        sft_rows.rows_by_name((Row("b", (), check=Check("c", 0.01)), Row("c", ())))
    with pytest.raises(ValueError, match="row 'm': base 'gpt2' is not one of"):
        sft_rows.rows_by_name((Row("m", (), base="gpt2"),))


def test_a_failed_quantization_crashes_the_gptq_rows_only(monkeypatch, tmp_path):
    def quantize_fails(model, data, output, log):
        raise RuntimeError("the GPTQ quantizer failed (exit 2): boom")

    ran = []

    def run_row(row, base, data, folder, steps):
        ran.append((row.name, base.name, steps))
        return _trained(4.0)

    fixtures = (tmp_path / "tiny-llama", tmp_path / "train.jsonl")
    monkeypatch.setattr(sft_matrix, "build_fixtures", lambda folder: fixtures)
    monkeypatch.setattr(sft_matrix, "quantize_gptq", quantize_fails)
    monkeypatch.setattr(sft_matrix, "save_moe_model", lambda folder: folder / "tiny-mixtral")
    monkeypatch.setattr(sft_matrix, "run_row", run_row)
    rows = sft_matrix.selected_rows(["fast-kernels", "gptq-lora", "fast-moe"])
    results = sft_matrix.run_matrix(rows, tmp_path)
    assert ran == [
        ("full", "tiny-llama", STEPS),
        ("fast-kernels", "tiny-llama", STEPS),
        ("lora-bf16", "tiny-llama", STEPS),
        ("moe-full", "tiny-mixtral", STEPS),
        ("fast-moe", "tiny-mixtral", STEPS),
    ]
    assert results["gptq-lora"].outcome == "crashed"
    assert results["gptq-lora"].reason == "the GPTQ quantizer failed (exit 2): boom"
    gptq_row = sft_rows.rows_by_name()["gptq-lora"]
    assert sft_report.judge(gptq_row, results["gptq-lora"], results).verdict == "FAIL"


def test_only_a_row_brings_its_references_in_matrix_order():
    names = [r.name for r in sft_matrix.selected_rows(["fused-lora-nf4"])]
    assert names == ["lora-bf16", "qlora-nf4", "fused-lora-nf4"]
    assert sft_matrix.selected_rows(None) == ROWS
    with pytest.raises(SystemExit, match="--only nope: no such row"):
        sft_matrix.selected_rows(["nope"])


# --- the client's command line and what a run leaves ------------------------------------------


def test_client_command_runs_the_entry_point_with_common_then_row_flags(tmp_path):
    row = sft_rows.rows_by_name()["fused-lora-nf4"]
    argv = sft_runs.client_command(row, tmp_path / "m", tmp_path / "d.jsonl", tmp_path / "o")
    assert argv[1] == str(sft_runs.LAUNCHER) and sft_runs.LAUNCHER.is_file()
    assert argv[argv.index("--model_name_or_path") + 1] == str(tmp_path / "m")
    assert argv[argv.index("--max_steps") + 1] == str(STEPS)
    assert argv[-len(row.flags) :] == list(row.flags)
    at = argv.index("--fused_lora")
    assert argv[at : at + 3] == ["--fused_lora", "bitsandbytes", "True"]


def test_the_launcher_seeds_from_the_clients_seed_flag():
    assert sft_launch.seed_flag(["--x", "1", "--seed", "7", "--y"]) == 7
    assert sft_launch.seed_flag(["--x", "1"]) == 42
    assert sft_launch.ENTRY_POINT == "tuning.sft_trainer"


def test_parse_losses_reads_training_loss_records_in_step_order():
    text = _logs(("training_loss", 2, 4.5), ("validation_loss", 2, 9.0), ("training_loss", 1, 4.75))
    assert sft_runs.parse_losses(text + "\n") == [(1, 4.75), (2, 4.5)]
    with pytest.raises(ValueError, match="training_logs.jsonl line 2: not JSON"):
        sft_runs.parse_losses(text.splitlines()[0] + "\n{oops\n")


def test_active_plugins_are_the_classes_the_framework_reports():
    log = (
        "x\nActive Plugin: BNBAccelerationPlugin. Python package: fms-acceleration-peft. "
        "Version: 0.8.0.\nActive Plugin: FastKernelsAccelerationPlugin. Python package: f.\n"
        "  Active Plugin: Indented. not at a line start\n"
    )
    assert sft_runs.active_plugins(log) == {
        "BNBAccelerationPlugin",
        "FastKernelsAccelerationPlugin",
    }


@pytest.mark.parametrize(
    ("returncode", "losses", "termination", "expected"),
    [
        (0, [(1, 4.0), (2, 3.9)], "", ("trained", "")),
        (0, [(1, 4.0)], "", ("crashed", "exit 0 but 1 losses logged for 2 steps")),
        (0, [(1, 4.0), (2, math.nan)], "", ("crashed", "non-finite loss at step 2: nan")),
        (1, [], "bad flag\nuse X", ("refused", "bad flag | use X")),
        (203, [(1, 4.0)], "Unhandled: boom", ("crashed", "exit 203: Unhandled: boom")),
        (-9, [], "", ("crashed", "exit -9: a | b | Killed")),
    ],
)  # fmt: skip
def test_classify_outcomes(returncode, losses, termination, expected):
    assert sft_runs.classify(returncode, losses, termination, "a\nb\nKilled\n", steps=2) == expected


# --- verdicts and the table -------------------------------------------------------------------

_FULL = Row("full", ())
_FAST = Row("fast", (), frozenset({"Foak"}), Check("full", 1e-3))
_LOOSE = Row("loose", (), check=Check("full", 0.05, per_step=False))


def test_judge_per_step_within_and_beyond_the_tolerance():
    results = {"full": _trained(4.0, 3.0, 2.0)}
    ok = sft_report.judge(_FAST, _trained(4.0, 3.002, 2.001, plugins={"Foak"}), results)
    assert ok.verdict == "ok"
    assert ok.ratio == pytest.approx(2.001 / 2.0)
    assert ok.deviation == pytest.approx(0.002 / 3.0)
    bad = sft_report.judge(_FAST, _trained(4.0, 3.01, 2.0, plugins={"Foak"}), results)
    assert bad.verdict == "FAIL"
    assert bad.reason == "a step's loss differs from full's by 3.33e-03 > 0.001"


def test_judge_first_and_last_only_for_loose_checks():
    results = {"full": _trained(4.0, 3.0, 2.0)}
    # the middle step is far off (other batches); first and last are within 5%
    assert sft_report.judge(_LOOSE, _trained(4.1, 9.0, 2.05), results).verdict == "ok"
    bad = sft_report.judge(_LOOSE, _trained(4.0, 3.0, 2.2), results)
    assert (bad.verdict, bad.reason) == (
        "FAIL",
        "the first or last loss differs from full's by 1.00e-01 > 0.05",
    )


def test_judge_fails_a_row_that_did_not_train_or_hid_its_plugin_or_lost_its_reference():
    results = {"full": _trained(4.0, 3.0)}
    crashed = RunResult("crashed", reason="exit 203: boom")
    assert sft_report.judge(_FULL, crashed, results).reason == "crashed: exit 203: boom"
    hidden = sft_report.judge(_FAST, _trained(4.0, 3.0), results)
    assert (hidden.verdict, hidden.reason) == ("FAIL", "trained without reporting Foak active")
    orphan = sft_report.judge(_FAST, _trained(4.0, 3.0, plugins={"Foak"}), {"full": crashed})
    assert (orphan.verdict, orphan.reason) == ("FAIL", "no reference: full did not train")
    steps = sft_report.judge(_FAST, _trained(4.0, 3.0, 2.0, plugins={"Foak"}), results)
    assert (steps.verdict, steps.reason) == ("FAIL", "logged other steps than full")


def test_table_as_markdown_and_csv():
    rows = (_FULL, _FAST)
    results = {
        "full": RunResult("trained", [(1, 4.0), (2, 2.0)], seconds=12.4),
        "fast": RunResult("trained", [(1, 4.0), (2, 2.0012)], frozenset({"Foak"}), seconds=30.6),
    }
    verdicts = {r.name: sft_report.judge(r, results[r.name], results) for r in rows}
    table = sft_report.table_rows(rows, results, verdicts)
    assert table[1] == {
        "acceleration": "fast",
        "outcome": "trained",
        "first loss": "4.0000",
        "last loss": "2.0012",
        "ratio to reference": "1.0006",
        "reference": "full",
        "max deviation": "6.0e-04",
        "tolerance": "0.001 per step",
        "verdict": "ok",
        "seconds": "31",
        "plugins": "Foak",
        "reason": "",
    }
    table[0]["reason"] = "a | b"
    lines = sft_report.markdown(table).splitlines()
    assert len(lines) == 4
    assert lines[0].count("|") == len(sft_report.COLUMNS) + 1
    assert lines[2].endswith(" | a \\| b |")
    context = {"date": "2026-12-07 00:00 UTC", "device": "cpu: x86_64, 2 cores", "versions": "v"}
    parsed = list(csv.DictReader(io.StringIO(sft_report.csv_text(table, context))))
    assert [p["acceleration"] for p in parsed] == ["full", "fast"]
    assert parsed[0]["reason"] == "a | b"
    assert [p["device"] for p in parsed] == ["cpu: x86_64, 2 cores"] * 2
    assert list(parsed[1]) == [*sft_report.COLUMNS, "date", "device", "versions"]


# --- fixtures ---------------------------------------------------------------------------------


def test_dataset_rows_are_seeded_counting_sequences_with_a_masked_prompt():
    rows = sft_fixtures.dataset_rows(n=40, seed=3)
    assert rows == sft_fixtures.dataset_rows(n=40, seed=3)
    assert rows != sft_fixtures.dataset_rows(n=40, seed=4)
    lengths = {len(r["input_ids"]) for r in rows}
    assert min(lengths) >= 8 and max(lengths) <= 24 and len(lengths) > 5
    words = sft_fixtures.VOCAB - sft_fixtures.FIRST_WORD_ID
    for r in rows:
        ids, labels = r["input_ids"], r["labels"]
        assert all(sft_fixtures.FIRST_WORD_ID <= i < sft_fixtures.VOCAB for i in ids)
        assert all((b - a) % words == 1 for a, b in itertools.pairwise(ids))
        assert labels[: sft_fixtures.PROMPT_TOKENS] == [-100] * sft_fixtures.PROMPT_TOKENS
        assert labels[sft_fixtures.PROMPT_TOKENS :] == ids[sft_fixtures.PROMPT_TOKENS :]


def test_calibration_text_spells_each_example_in_the_tokenizers_words():
    class Words:
        def convert_ids_to_tokens(self, ids):
            return [f"tok{i - 4}" for i in ids]

    rows = [{"input_ids": [4, 5, 6]}, {"input_ids": [9]}]
    assert sft_fixtures.calibration_text(rows, Words()) == "tok0 tok1 tok2\n\ntok5\n"
