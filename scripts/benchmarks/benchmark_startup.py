"""Time from the command to the first training step of `fms-acceleration train`, and what it
prints before that step: measured from outside, so any version of the job can be compared.

The first step begins right after the Trainer draws its progress bar ("0/N"), so the clock
stops when that bar first appears on stderr. Each run trains one step into a fresh folder.

    python scripts/benchmarks/benchmark_startup.py --label after --runs 3 \\
        --csv scripts/benchmarks/refs/startup_cpu.csv -- fms-acceleration train

Lines printed before the first step are kept in <csv>.<label>.log; those that are neither the
job's own output nor its framework table count as noise.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

FIRST_STEP = re.compile(rb"\| 0/\d+ \[")
# what the job itself prints before training: its acceleration note and the framework table
OWN = re.compile(
    r"^(acceleration:|INFO:fms_acceleration|\*+ FMS|Active Plugin:|fms-acceleration|#  |-  |"
    r"\d+  |patch rule|-{3,}|[a-z0-9_.-]+ +(attribute|forward|method|replacement|setting|"
    r"data_collator|data_loader) )"
)


def one_run(command: list[str]) -> tuple[float, list[str]]:
    """Seconds to the first step, and the lines printed before it."""
    with tempfile.TemporaryDirectory() as out:
        args = [*command, "--max-steps", "1", "--no-eval", "--output-dir", f"{out}/run"]
        started = time.time()
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        seen = b""
        first_step = None
        assert process.stdout is not None
        while chunk := os.read(process.stdout.fileno(), 65536):
            seen += chunk
            if first_step is None and FIRST_STEP.search(seen):
                first_step = time.time() - started
                before = seen[: FIRST_STEP.search(seen).start()]
        process.wait()
        if process.returncode != 0 or first_step is None:
            raise SystemExit(f"{' '.join(args)} failed:\n{seen.decode(errors='replace')}")
    lines = before.decode(errors="replace").replace("\r", "\n").splitlines()
    return first_step, [line for line in lines if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="what is measured, e.g. before / after")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--csv", type=Path, required=True, help="rows are appended")
    parser.add_argument("command", nargs="+", help="the train command (after --)")
    args = parser.parse_args(argv)
    rows = []
    for run in range(1, args.runs + 1):
        seconds, lines = one_run(args.command)
        noise = [line for line in lines if not OWN.match(line.strip())]
        rows.append(
            {
                "label": args.label,
                "run": run,
                "seconds_to_first_step": round(seconds, 1),
                "lines_before_first_step": len(lines),
                "noise_lines": len(noise),
                "load_1min": round(os.getloadavg()[0], 2),
                "date": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M}",
                "command": " ".join(args.command),
            }
        )
        print(rows[-1], flush=True)
        log = args.csv.with_suffix(f".{args.label}.log")
        log.write_text("\n".join(noise) + "\n", encoding="utf-8")
    new = not args.csv.is_file()
    with args.csv.open("a", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
