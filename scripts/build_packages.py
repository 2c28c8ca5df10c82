"""Build every package of the repository (the folders packages.txt lists) as a wheel and an
sdist into dist/, then check them with twine: what `tox -e build` runs before a release."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def package_folders() -> list[Path]:
    """The package folders, as packages.txt lists them."""
    lines = (ROOT / "packages.txt").read_text(encoding="utf-8").splitlines()
    return [ROOT / line.split()[-1] for line in lines if line.startswith("-e ")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outdir", type=Path, default=ROOT / "dist")
    args = parser.parse_args(argv)
    args.outdir.mkdir(parents=True, exist_ok=True)
    for folder in package_folders():
        print(f"building {folder.relative_to(ROOT)}", flush=True)
        subprocess.run(
            [sys.executable, "-m", "build", "--outdir", str(args.outdir), str(folder)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    built = sorted(args.outdir.glob("*"))
    subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", *map(str, built)], check=True
    )
    print(f"{len(built)} files built and checked in {args.outdir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
