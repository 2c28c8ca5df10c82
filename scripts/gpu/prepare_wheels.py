"""Fill .whl/ with every wheel scripts/gpu/suite.sh installs on the GPU machine (no network there).

    python scripts/gpu/prepare_wheels.py            # on a machine that reaches the package index

- our packages (the core, accelerated-peft, fused-ops-and-kernels, accelerated-moe), built here
  with hatchling,
  which the GPU machine does not have;
- bitsandbytes 0.50.2, liger-kernel 0.8.5 and cut-cross-entropy 25.1.1 (a 22 KB wheel: the
  fused linear CE peers), which it does not have either;
- any other requirement of our packages missing from its image (gpu_machine_packages.txt lists
  what the image holds), with the requirements of those in turn: e.g. pydantic and
  pydantic-core once the core validates with pydantic.

Downloads are for CPython 3.12 on x86-64 manylinux (the GPU machine's python3), without
dependencies beyond those named; one version of each package. The whole payload must stay under
the 64 MiB that travels with the working tree (bitsandbytes alone is 43 MB).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
OURS = (
    "libs/fms-acceleration",
    "plugins/accelerated-peft",
    "plugins/fused-ops-and-kernels",
    "plugins/accelerated-moe",
)
THIRD_PARTY = ("bitsandbytes==0.50.2", "liger-kernel==0.8.5", "cut-cross-entropy==25.1.1")
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
    "any",
)
BUDGET_MB = 60.0


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalize(re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0])


def on_gpu_machine() -> set[str]:
    text = (Path(__file__).parent / "gpu_machine_packages.txt").read_text()
    names = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return {normalize(name) for name in names if name}


def wheel_requirements(wheel: Path) -> list[str]:
    """Requires-Dist lines of a wheel that apply without extras."""
    with zipfile.ZipFile(wheel) as zf:
        metadata = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        lines = zf.read(metadata).decode().splitlines()
    reqs = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist:")]
    return [r for r in reqs if "extra ==" not in r and "extra==" not in r]


def project_requirements(folder: str) -> list[str]:
    data = tomllib.loads((ROOT / folder / "pyproject.toml").read_text())
    return list(data["project"].get("dependencies", []))


def download(requirement: str, dest: Path) -> None:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run(
        [
            sys.executable, "-m", "pip", "download", "-q", "--no-deps",
            "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
            *platforms, "-d", str(dest), requirement,
        ],
        check=True,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=ROOT / ".whl")
    parser.add_argument("--ours-only", action="store_true", help="build our wheels, download none")
    args = parser.parse_args(argv)
    args.dest.mkdir(parents=True, exist_ok=True)
    for old in args.dest.glob("fms_acceleration*.whl"):
        old.unlink()  # one version of each: stale builds of ours go
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(args.dest)]
        + [str(ROOT / folder) for folder in OURS],
        check=True,
    )
    if args.ours_only:
        return 0
    present = on_gpu_machine()
    ours = {normalize(f"fms-acceleration{s}") for s in ("", "-peft", "-foak")}
    have = {normalize(w.name.split("-")[0]) for w in args.dest.glob("*.whl")}
    queue = list(THIRD_PARTY)
    queue += [r for f in OURS for r in project_requirements(f)]
    seen: set[str] = set()
    while queue:
        requirement = queue.pop(0)
        name = requirement_name(requirement)
        if name in seen or name in ours or (name in present and requirement not in THIRD_PARTY):
            continue
        seen.add(name)
        if name not in have:
            print(f"downloading {requirement}")
            download(requirement, args.dest)
        wheel = next(w for w in args.dest.glob("*.whl") if normalize(w.name.split("-")[0]) == name)
        queue += wheel_requirements(wheel)
    total = sum(w.stat().st_size for w in args.dest.glob("*.whl")) / 2**20
    for wheel in sorted(args.dest.glob("*.whl")):
        print(f"{wheel.stat().st_size / 2**20:7.2f} MB  {wheel.name}")
    print(f"{total:7.2f} MB  in {args.dest}")
    if total > BUDGET_MB:
        print(f"over the {BUDGET_MB} MB that may travel to the GPU machine", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
