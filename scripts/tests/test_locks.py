"""The locked test environments hold exactly their lock: a fresh clone resolves tomorrow what
it resolved when the lock was written (tox sets TOX_ENV_NAME; other runs skip)."""

from __future__ import annotations

import os
import re
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOCKS = {"py": ROOT / "locks/py.txt", "py-oldest": ROOT / "locks/py-oldest.txt"}
# tox -e client's lock: the client's requirements less torch (the client itself is installed on
# top with --no-deps, so that environment is its lock plus fms-hf-tuning)
CLIENT_LOCK = ROOT / "locks/client.txt"
ENV = os.environ.get("TOX_ENV_NAME", "")
OWN = ("fms-acceleration", "pip", "setuptools", "wheel")


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(lock: Path) -> dict[str, str]:
    lines = [line for line in lock.read_text().splitlines() if line and not line.startswith("#")]
    return {_name(line.split("==")[0]): line.split("==")[1] for line in lines}


@pytest.mark.parametrize("lock", [*sorted(LOCKS.values()), CLIENT_LOCK], ids=lambda p: p.name)
def test_lock_files_pin_every_package_once_without_local_labels(lock):
    pins = _pins(lock)
    assert len(pins) >= 60 and "torch" in pins and "transformers" in pins
    assert pins["torch"] == "2.13.0"
    assert not [v for v in pins.values() if "+" in v]


@pytest.mark.skipif(ENV not in LOCKS, reason=f"not a locked tox environment ({ENV or 'no tox'})")
def test_this_environment_is_its_lock():
    pins = _pins(LOCKS[ENV])
    # the environment's own site-packages: a library imported earlier in this process may have
    # put vendored copies on sys.path (setuptools/_vendor: packaging, jaraco, ...)
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    installed = {
        _name(d.metadata["Name"]): d.version.split("+")[0]
        for d in metadata.distributions(path=site)
    }
    ours = {n for n in installed if n.startswith(OWN)}
    assert {n: v for n, v in installed.items() if n not in ours} == pins


def test_the_client_lock_is_on_the_clients_stack():
    pins, stack = _pins(CLIENT_LOCK), _pins(ROOT / "locks/client-stack.txt")
    assert {n: pins[n] for n in stack} == stack
    assert "fms-hf-tuning" not in pins
