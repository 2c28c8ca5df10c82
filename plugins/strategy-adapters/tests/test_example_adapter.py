"""The worked third-party adapter (examples/transformerlens-adapter), installed and discovered."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys

import pytest
import torch

from fms_acceleration_adapters import (
    discover_strategy_adapters,
    resolve_strategy_adapter,
    select_strategy_adapter,
)


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory, example_dir):
    """pip-install the example (no deps, offline) into a temp target put on sys.path."""
    root = tmp_path_factory.mktemp("example")
    src = shutil.copytree(example_dir, root / "src")  # builds write into the source tree
    target = root / "site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index"]
    cmd += ["--no-build-isolation", "--target", str(target), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    yield target
    sys.path.remove(str(target))
    sys.modules.pop("fms_adapter_transformerlens", None)
    importlib.invalidate_caches()


@pytest.fixture
def tl_adapter_cls(installed_example):
    cls = discover_strategy_adapters()["transformerlens"]
    assert cls.__module__ == "fms_adapter_transformerlens"
    assert str(installed_example) in sys.modules[cls.__module__].__file__
    return cls


def test_entry_point_is_discovered_and_selectable(tl_adapter_cls):
    assert resolve_strategy_adapter("TransformerLens") is tl_adapter_cls
    adapter = select_strategy_adapter(
        "NO", {"single_device": "transformerlens"}, tl_shapes=True, n_heads=4
    )
    assert type(adapter) is tl_adapter_cls
    assert adapter.cfg["tl_shapes"] is True and adapter.cfg["n_heads"] == 4


def test_transformerlens_names(tl_adapter_cls, llama):
    adapter = tl_adapter_cls()
    names = adapter.schedule_param_names(llama)
    assert names[:4] == ["embed.W_E", "blocks.0.attn.W_Q", "blocks.0.attn.W_K", "blocks.0.attn.W_V"]
    assert names[-2:] == ["ln_final.w", "unembed.W_U"]
    assert "blocks.1.mlp.W_gate" in names and "blocks.1.ln2.w" in names
    assert len(names) == len(list(llama.parameters()))
    assert adapter.actual_param_name("blocks.1.attn.W_Q", llama) == (
        "model.layers.1.self_attn.q_proj.weight"
    )
    assert adapter.gen_default_schedule(llama)[0] == {"params": ["unembed.W_U", "ln_final.w"]}


def test_transformerlens_state_dict_layouts(tl_adapter_cls, llama):
    adapter = tl_adapter_cls(tl_shapes=True)
    adapter.on_before_init_client(llama)  # heads from the config: 4 query, 2 key/value
    state = llama.state_dict()
    tl = adapter.to_logical_state_dict(state)
    assert tl["blocks.0.attn.W_Q"].shape == (4, 64, 16)
    assert tl["blocks.0.attn.W_K"].shape == (2, 64, 16)
    assert tl["blocks.0.attn.W_O"].shape == (4, 16, 64)
    assert tl["blocks.0.mlp.W_in"].shape == (64, 128)
    assert tl["unembed.W_U"].shape == (64, 128)
    # the per-head layout computes what the HF projections compute
    torch.manual_seed(3)
    x = torch.randn(5, 64)
    attn = llama.model.layers[0].self_attn
    q_hf = attn.q_proj(x).view(5, 4, 16)
    q_tl = torch.einsum("pd,hde->phe", x, tl["blocks.0.attn.W_Q"])
    torch.testing.assert_close(q_tl, q_hf, atol=1e-5, rtol=1e-5)
    z = torch.randn(5, 4, 16)
    o_hf = attn.o_proj(z.reshape(5, 64))
    o_tl = torch.einsum("phe,hed->pd", z, tl["blocks.0.attn.W_O"])
    torch.testing.assert_close(o_tl, o_hf, atol=1e-5, rtol=1e-5)
    back = adapter.from_logical_state_dict(tl, llama)
    assert list(back) == list(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_transformerlens_through_fts(tl_adapter_cls, tmp_path):
    """FTS resolves the entry-point adapter by name and thaws phases written in TL names."""
    pytest.importorskip("fms_acceleration_fts")
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from fms_acceleration.testing import build_framework, save_tiny_model, tiny_dataset
    from fms_acceleration_fts.framework_plugin_fts import FinetuningSchedulePlugin

    config = {
        "plugins": {
            "training": {
                "finetuning_schedule": {
                    "ft_schedule": {
                        0: {"params": ["unembed.W_U", "ln_final.w"], "max_transition_step": 2},
                        1: {"params": ["blocks.1.attn.W_Q", "blocks.1.mlp.W_out"]},
                    },
                    "custom_strategy_adapters": {"single_device": "transformerlens"},
                }
            }
        }
    }
    framework = build_framework(config, [FinetuningSchedulePlugin])
    model = AutoModelForCausalLM.from_pretrained(save_tiny_model(tmp_path / "m"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=1e-2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    model, _ = framework.augmentation(model, args, modifiable_args=())
    trainer = Trainer(model=model, args=args, train_dataset=tiny_dataset(n=16))
    for cb in framework.get_callbacks_and_ready_for_train(model, trainer.accelerator):
        trainer.add_callback(cb)
    trainer.train()
    fts = framework.plugins["finetuning_schedule"]
    assert type(fts.adapter) is tl_adapter_cls
    assert fts.callback.depth == 1
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
    }
