"""Write the packages of the running environment as a lock: pip constraints that pin every
release a test environment installs, so a fresh clone resolves tomorrow what it resolved today.

Run through tox (`tox -e lock` / `tox -e lock-oldest`), which first builds the environment from
the newest releases the pins allow; review the diff and commit it.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

# our own packages are installed from the checkout, and pip's own tools are the venv's
UNPINNED = ("fms-acceleration", "pip", "setuptools", "wheel")


def frozen() -> list[str]:
    """`name==version` of every installed distribution but ours and pip's own tools."""
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "list", "--format=freeze", "--exclude-editable"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    pins = []
    for line in listing.splitlines():
        name = line.split("==")[0].strip().lower()
        if line and not any(name == u or name.startswith(u + "-") for u in UNPINNED):
            # a local label (torch's +cpu) is a build of the release: `==2.13.0` admits it
            pins.append(line.strip().split("+")[0])
    return sorted(pins, key=str.lower)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="the lock file to write")
    parser.add_argument("--env", required=True, help="the tox environment the lock is for")
    parser.add_argument("--by", required=True, help="the tox environment that writes it")
    args = parser.parse_args(argv)
    pins = frozen()
    day = f"{datetime.now(timezone.utc):%Y-%m-%d}"
    header = [
        f"# Lock of the tox environment '{args.env}', written by `tox -e {args.by}` on {day}",
        f"# with Python {platform.python_version()}; every pip call of that environment honours",
        "# it (PIP_CONSTRAINT). Do not edit by hand: rerun the command and review the diff.",
    ]
    args.output.write_text("\n".join([*header, *pins]) + "\n", encoding="utf-8")
    print(f"wrote {args.output} ({len(pins)} pins)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
