"""What `pip install fms-hf-tuning[fms-accel-all]` resolves to beside a folder of our wheels:
every fms-acceleration* package it picks must be ours (our wheel, our version).

    python scripts/client/extra_resolution.py --output DIR

Builds a wheel of each package in packages.txt into DIR/wheels, reads the client's extras from
its wheel on the registry, and asks pip for two dry-run resolutions (`--report`):
  client    the client as a user installs it, with our wheels as --find-links (torch free
            within the client's own pin, torch<2.9)
  cpu-torch the extra's requirements on the client's locked stack (PIP_CONSTRAINT, torch 2.13.0
            from our lock: the client itself pins torch<2.9 and cannot be resolved beside it)
Writes DIR/extra_resolution.md; exits 1 when a resolution fails, leaves out a package the extra
names, or picks an fms-acceleration* package that is not ours (our wheel, our version).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[2]
CLIENT = "fms-hf-tuning"
CLIENT_VERSION = "3.2.2"
FULL_EXTRA = "fms-accel-all"
FAMILY = "fms-acceleration"
# the stack beside the family's packages, shown in the tables
SHOWN = ("torch", "transformers", "peft", "accelerate", "trl", "bitsandbytes")


@dataclass(frozen=True)
class Picked:
    """One package of a resolution: its version and where pip would take it from."""

    name: str
    version: str
    ours: bool
    source: str
    """our wheel, a local wheel (not ours), or the host of the index"""


def package_folders(packages_txt: str, root: Path = ROOT) -> list[Path]:
    """The folder of every `-e <folder>` line of packages.txt."""
    return [root / line[3:].strip() for line in packages_txt.splitlines() if line.startswith("-e ")]


def wheel_versions(wheels: Path) -> dict[str, str]:
    """{canonical name: version} of the wheels in a folder."""
    return {
        str(name): str(version)
        for name, version, _, _ in map(parse_wheel_filename, (w.name for w in wheels.glob("*.whl")))
    }


def extra_requirements(metadata_text: str, extra: str) -> list[Requirement]:
    """The Requires-Dist lines of a METADATA file that an install with `[extra]` adds."""
    environment = {**default_environment(), "extra": extra}
    requirements = []
    # the headers end at the first blank line; the description follows
    headers = metadata_text.split("\n\n", 1)[0]
    for line in headers.splitlines():
        if line.startswith("Requires-Dist:"):
            requirement = Requirement(line.split(":", 1)[1].strip())
            marker = requirement.marker
            if marker is not None and "extra" in str(marker) and marker.evaluate(environment):
                requirements.append(requirement)
    return requirements


def client_request() -> list[str]:
    """The client with its full extra, as a user asks pip for it."""
    return [f"{CLIENT}[{FULL_EXTRA}]=={CLIENT_VERSION}"]


def extra_request(full_extra: list[Requirement]) -> list[str]:
    """The extra's own requirements, without their extra marker."""
    return [f"{r.name}{r.specifier}" for r in full_extra]


def picked(report: dict, wheels: Path) -> list[Picked]:
    """The packages a pip --report would install, marking those taken from `wheels`."""
    rows = []
    for item in report.get("install", []):
        url = item.get("download_info", {}).get("url", "")
        path = Path(unquote(urlparse(url).path)) if url.startswith("file:") else None
        ours = path is not None and path.parent.resolve() == wheels.resolve()
        source = "our wheel" if ours else "local wheel" if path else urlparse(url).netloc
        meta = item["metadata"]
        rows.append(Picked(canonicalize_name(meta["name"]), meta["version"], ours, source))
    return sorted(rows, key=lambda p: p.name)


def problems(rows: list[Picked], ours: dict[str, str], wanted: list[str]) -> list[str]:
    """What is wrong with a resolution: a family package not ours, or a wanted one missing."""
    found = {p.name: p for p in rows}
    issues = [
        f"{p.name} {p.version} {'is ours at' if p.ours else 'comes from the index, not'} "
        f"our wheel {ours.get(p.name, '(we build none)')}"
        for p in rows
        if p.name.startswith(FAMILY) and not (p.ours and ours.get(p.name) == p.version)
    ]
    issues += [f"{name} is not in the resolution" for name in wanted if name not in found]
    return issues


def _pip(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", *args], capture_output=True, text=True, env=env
    )


def _fail(step: str, done: subprocess.CompletedProcess) -> SystemExit:
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
    return SystemExit(f"extra_resolution: {step} failed (exit {done.returncode}):\n{tail}")


def build_wheels(folders: list[Path], wheels: Path) -> None:
    """One wheel per package folder, without dependencies, built with the installed hatchling."""
    done = _pip(
        "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), *map(str, folders)
    )
    if done.returncode != 0:
        raise _fail("building our wheels", done)


def client_metadata(folder: Path) -> str:
    """The METADATA of the client's wheel, downloaded from the registry into `folder`."""
    done = _pip("download", "-q", "--no-deps", "-d", str(folder), f"{CLIENT}=={CLIENT_VERSION}")
    if done.returncode != 0:
        raise _fail(f"downloading {CLIENT}=={CLIENT_VERSION}", done)
    (wheel,) = folder.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return archive.read(name).decode("utf-8")


def resolve(requirements: list[str], wheels: Path, report: Path, constrained: bool) -> dict:
    """pip's dry-run report for `requirements` with our wheels findable; PIP_CONSTRAINT kept
    only when `constrained`."""
    env = dict(os.environ)
    if not constrained:
        env.pop("PIP_CONSTRAINT", None)
    # fast-deps reads each wheel's METADATA with HTTP range requests: the registry serves no
    # PEP 658 metadata, and without it pip downloads every wheel it considers (torch<2.9 pulls
    # 3.5 GB of CUDA wheels, which a flaky connection failed in CI)
    args = ["install", "--dry-run", "--ignore-installed", "--use-feature=fast-deps", "-q"]
    args += ["--report", str(report)]
    done = _pip(*args, "--find-links", str(wheels), *requirements, env=env)
    if done.returncode != 0:
        raise _fail(f"resolving {' '.join(requirements)}", done)
    return json.loads(report.read_text(encoding="utf-8"))


def section(title: str, requirements: list[str], rows: list[Picked], issues: list[str]) -> str:
    """A markdown section: the request, the fms-acceleration* picks and the stack (SHOWN)."""
    shown = [p for p in rows if p.name.startswith(FAMILY) or p.name in SHOWN]
    lines = [f"## {title}", "", f"`pip install {' '.join(requirements)}`", ""]
    lines += ["| package | version | from |", "|---|---|---|"]
    lines += [f"| {p.name} | {p.version} | {p.source} |" for p in shown]
    lines += ["", *(f"- PROBLEM: {i}" for i in issues), ""] if issues else ["", "all ours", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="a new or empty folder")
    args = parser.parse_args(argv)
    if args.output.exists() and any(args.output.iterdir()):
        parser.error(f"--output {args.output}: exists and is not an empty folder")
    wheels = args.output / "wheels"
    wheels.mkdir(parents=True)
    build_wheels(package_folders((ROOT / "packages.txt").read_text(encoding="utf-8")), wheels)
    versions = wheel_versions(wheels)
    full_extra = extra_requirements(client_metadata(args.output / "client"), FULL_EXTRA)
    wanted = [canonicalize_name(r.name) for r in full_extra]
    text = "# fms-hf-tuning's extra against our wheels\n\n"
    failed = False
    for title, requirements, constrained in (
        ("client", client_request(), False),
        ("cpu-torch", extra_request(full_extra), True),
    ):
        report = resolve(requirements, wheels, args.output / f"{title}.json", constrained)
        rows = picked(report, wheels)
        issues = problems(rows, versions, wanted)
        failed |= bool(issues)
        text += section(title, requirements, rows, issues)
    (args.output / "extra_resolution.md").write_text(text, encoding="utf-8")
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
