"""Write packages.txt: every package of this repository (libs/* and plugins/*), editable, as
the test environments install them (tox.ini reads it). Derived from the folders, so a new
plugin needs no line here: `tox -e gen-configs` rewrites it, `tox -e verify-configs` checks it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "packages.txt"
HEADER = (
    "# Every package of this repository, editable: what the test environments install (tox.ini).\n"
    "# Written by `tox -e gen-configs` from libs/*/ and plugins/*/; do not edit.\n"
)


def package_list(root: Path = ROOT) -> str:
    """The file's content: one `-e <folder>` line per package, in path order."""
    folders = sorted(
        p.parent.relative_to(root).as_posix()
        for pattern in ("libs/*/pyproject.toml", "plugins/*/pyproject.toml")
        for p in root.glob(pattern)
    )
    return HEADER + "".join(f"-e {folder}\n" for folder in folders)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verify", action="store_true", help="fail if packages.txt is stale")
    args = parser.parse_args(argv)
    wanted = package_list()
    if args.verify:
        if not OUTPUT.is_file() or OUTPUT.read_text(encoding="utf-8") != wanted:
            print(f"{OUTPUT.name} is stale: run `tox -e gen-configs`", file=sys.stderr)
            return 1
        print(f"{OUTPUT.name} is current")
        return 0
    OUTPUT.write_text(wanted, encoding="utf-8")
    print(f"wrote {OUTPUT.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
