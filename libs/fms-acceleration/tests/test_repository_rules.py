"""Rules of the tree that keep the packages independent: the core's dependencies, and no plugin
importing another plugin's modules."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[3]
# strategy-adapters is a library of adapters that plugins use (it registers no plugin)
LIBRARIES = {"fms_acceleration", "fms_acceleration_train", "fms_acceleration_adapters"}


def _plugin_modules() -> dict[str, Path]:
    found = {}
    for pyproject in sorted((ROOT / "plugins").glob("*/pyproject.toml")):
        for module in (pyproject.parent / "src").iterdir():
            if module.is_dir() and module.name.startswith("fms_acceleration_"):
                found[module.name] = module
    return found


def _imported_top_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("module", sorted(_plugin_modules()))
def test_no_plugin_imports_another_plugin(module):
    plugins = set(_plugin_modules())
    offenders = {
        f"{path.relative_to(ROOT)} imports {other}"
        for path in _plugin_modules()[module].rglob("*.py")
        for other in _imported_top_modules(path)
        if other in plugins - LIBRARIES - {module}
    }
    assert not offenders, sorted(offenders)


# quantization libraries (and their usual abbreviations); the core's stanza paths
# peft.quantization.<key> are YAML keys of the reference's plugins, not the libraries
QUANTIZATION_LIBRARIES = re.compile(r"bitsandbytes|\bbnb|gptqmodel|auto[_-]?gptq|linear4bit", re.I)
STANZA_PATH = re.compile(r"peft\.quantization\.\w+")


def test_core_names_no_quantization_library():
    """Quantized layers reach the core through the plugin that loads them (a registered
    QuantizedLayerKind), so the core never imports, names or special-cases a library."""
    core = ROOT / "libs/fms-acceleration/src"
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sorted(core.rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if QUANTIZATION_LIBRARIES.search(STANZA_PATH.sub("", line))
    ]
    assert offenders == []


def test_core_depends_on_torch_pyyaml_pydantic_packaging_only():
    project = tomllib.loads((ROOT / "libs/fms-acceleration/pyproject.toml").read_text())
    names = {
        dep.split(">")[0].split("=")[0].split("<")[0] for dep in project["project"]["dependencies"]
    }
    assert names == {"torch", "pyyaml", "pydantic", "packaging"}


def test_importing_the_core_brings_no_ml_library():
    code = (
        "import sys, fms_acceleration, fms_acceleration.cli, fms_acceleration.utils.test_utils\n"
        "print(sorted(m for m in ('transformers', 'peft', 'accelerate', 'bitsandbytes', "
        "'triton', 'gguf') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_discovering_the_plugins_loads_none_of_their_heavy_dependencies():
    """Discovery imports every installed plugin; a plugin nobody configured must not cost its
    heavy imports (seconds each, and their start-up messages)."""
    code = (
        "import sys\n"
        "from fms_acceleration.discovery import plugin_catalogue\n"
        "catalogue = plugin_catalogue()\n"
        "print(len(catalogue.registrations), len(catalogue.broken))\n"
        "print(sorted(m for m in ('gptqmodel', 'bitsandbytes', 'optuna', 'torchao', "
        "'sklearn', 'sentence_transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    counts, heavy = done.stdout.strip().splitlines()
    registered, broken = map(int, counts.split())
    assert registered >= 6 and broken == 0
    assert heavy == "[]"
