"""Shared fixtures: tiny models, peft models, fake distributions with entry points."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fms_acceleration_adapters import ENTRY_POINT_GROUP


def tiny_llama(seed: int = 0, **overrides):
    """Tiny random-init LlamaForCausalLM (config from fms_acceleration.testing)."""
    from transformers import AutoModelForCausalLM

    from fms_acceleration.testing import tiny_model_config

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_model_config("llama", **overrides))


@pytest.fixture
def llama():
    """A fresh tiny llama (2 layers, hidden 64)."""
    return tiny_llama()


@pytest.fixture
def peft_llama():
    """(base_names, peft model): LoRA on q/v projections, lm_head in modules_to_save."""
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    base_names = [n for n, _ in model.named_parameters()]
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    return base_names, get_peft_model(model, config)


@pytest.fixture
def fake_dists(tmp_path, monkeypatch):
    """Factory: make a fake installed distribution whose entry points are ``{name: value}``.

    Each distribution is a ``<name>-<version>.dist-info`` folder (with an optional module
    source) in a directory put on sys.path, which importlib.metadata scans.
    """
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))

    def make(dist: str, entry_points: dict[str, str], modules: dict[str, str] | None = None):
        # the folder name carries the normalized name (importlib.metadata dedups on it)
        info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        lines = [f"[{ENTRY_POINT_GROUP}]"] + [f"{k} = {v}" for k, v in entry_points.items()]
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        for mod, src in (modules or {}).items():
            (root / f"{mod}.py").write_text(textwrap.dedent(src))
        importlib.invalidate_caches()
        return info

    yield make
    for mod in [m for m in sys.modules if m.startswith("fake_adapter_")]:
        del sys.modules[mod]


@pytest.fixture(scope="session")
def example_dir() -> Path:
    """Source folder of the worked third-party adapter package."""
    return Path(__file__).resolve().parents[1] / "examples" / "transformerlens-adapter"


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    """A one-process gloo group, so DDP/FSDP can wrap models inside the test process."""
    import torch.distributed as dist

    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
