"""The scripts are run by path, not installed: put their folders on sys.path for the tests."""

import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent
for folder in (SCRIPTS, SCRIPTS / "benchmarks", SCRIPTS / "client"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
