"""Judging each row against its reference run, and the table (markdown and CSV) of it all."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

from sft_rows import Row
from sft_runs import RunResult

COLUMNS = (
    "acceleration",
    "outcome",
    "first loss",
    "last loss",
    "ratio to reference",
    "reference",
    "max deviation",
    "tolerance",
    "verdict",
    "seconds",
    "plugins",
    "reason",
)

# what each CSV row also carries, so a row read alone says when, where and on what it ran
CONTEXT_COLUMNS = ("date", "device", "versions")


@dataclass
class Verdict:
    """A row's standing: ok or FAIL (counts against the run), and why."""

    verdict: str
    reason: str = ""
    ratio: float | None = None
    deviation: float | None = None


def _deviation(losses: list[tuple[int, float]], reference: list[tuple[int, float]]) -> float:
    return max(abs(a - b) / abs(b) for (_, a), (_, b) in zip(losses, reference))


def judge(row: Row, result: RunResult, results: dict[str, RunResult]) -> Verdict:
    """The verdict on `row`, given the results of the rows before it."""
    if result.outcome != "trained":
        return Verdict("FAIL", f"{result.outcome}: {result.reason}")
    missing = sorted(row.plugins - result.plugins)
    if missing:
        return Verdict("FAIL", f"trained without reporting {', '.join(missing)} active")
    if row.check is None:
        return Verdict("ok")
    reference = results[row.check.against]
    if reference.outcome != "trained":
        return Verdict("FAIL", f"no reference: {row.check.against} did not train")
    losses, ref = result.losses, reference.losses
    if row.check.per_step and [s for s, _ in losses] != [s for s, _ in ref]:
        return Verdict("FAIL", f"logged other steps than {row.check.against}")
    if not row.check.per_step:
        losses, ref = [losses[0], losses[-1]], [ref[0], ref[-1]]
    ratio = result.losses[-1][1] / reference.losses[-1][1]
    deviation = _deviation(losses, ref)
    if deviation > row.check.rtol:
        what = "a step's loss" if row.check.per_step else "the first or last loss"
        return Verdict(
            "FAIL",
            f"{what} differs from {row.check.against}'s by {deviation:.2e} > {row.check.rtol:g}",
            ratio,
            deviation,
        )
    return Verdict("ok", "", ratio, deviation)


def _number(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def table_rows(
    rows: tuple[Row, ...], results: dict[str, RunResult], verdicts: dict[str, Verdict]
) -> list[dict[str, str]]:
    """One dict per row, keyed by COLUMNS."""
    table = []
    for row in rows:
        result, verdict = results[row.name], verdicts[row.name]
        losses = result.losses
        table.append(
            {
                "acceleration": row.name,
                "outcome": result.outcome,
                "first loss": _number(losses[0][1] if losses else None, ".4f"),
                "last loss": _number(losses[-1][1] if losses else None, ".4f"),
                "ratio to reference": _number(verdict.ratio, ".4f"),
                "reference": row.check.against if row.check else "",
                "max deviation": _number(verdict.deviation, ".1e"),
                "tolerance": (
                    f"{row.check.rtol:g} {'per step' if row.check.per_step else 'first/last'}"
                    if row.check
                    else ""
                ),
                "verdict": verdict.verdict,
                "seconds": _number(result.seconds or None, ".0f"),
                "plugins": " ".join(sorted(result.plugins)),
                "reason": verdict.reason,
            }
        )
    return table


def markdown(table: list[dict[str, str]]) -> str:
    """A GitHub markdown table of `table` (pipes in cells escaped)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for entry in table:
        cells = (entry[c].replace("|", "\\|").replace("\n", " ") for c in COLUMNS)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_text(table: list[dict[str, str]], context: dict[str, str]) -> str:
    """`table` as CSV with a header row, each row followed by the run's CONTEXT_COLUMNS."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS + CONTEXT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({**entry, **{c: context[c] for c in CONTEXT_COLUMNS}} for entry in table)
    return out.getvalue()
