"""`--model smollm2-moe`: a dense model up-cycled into a Mixtral computes what the dense one
does (identical experts, top-k weights summing to one), and the train job accepts the name."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from fms_acceleration_train.model_source import resolve_model
from fms_acceleration_train.moe_model import EXPERTS, MOE_MODEL, TOP_K, build_moe_model


def test_upcycled_model_gives_the_dense_logits(tiny_model, tmp_path):
    target = build_moe_model(tiny_model, tmp_path / "moe")
    moe = AutoModelForCausalLM.from_pretrained(target).eval()
    dense = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    assert type(moe).__name__ == "MixtralForCausalLM"
    assert (moe.config.num_local_experts, moe.config.num_experts_per_tok) == (EXPERTS, TOP_K)
    ids = torch.randint(4, 128, (2, 17), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)
    # the router is new (random) and the experts are trainable copies
    routers = [n for n, _ in moe.named_parameters() if n.endswith(".gate.weight")]
    assert len(routers) == moe.config.num_hidden_layers
    assert (target / "tokenizer.json").is_file() or (target / "tokenizer_config.json").is_file()


def test_the_job_resolves_the_moe_name_from_the_embedded_model(tmp_path, monkeypatch):
    """The name builds on the embedded model's conversion, once (cached by name)."""
    from fms_acceleration_train import moe_model

    calls = []
    monkeypatch.setattr(moe_model, "build_moe_model", lambda dense, target: calls.append(target))
    monkeypatch.setenv("FMS_ACCELERATION_CACHE", str(tmp_path))
    dense = tmp_path / "models" / "SmolLM2-135M-Instruct-from-x"
    dense.mkdir(parents=True)
    (dense / "config.json").write_text("{}")
    monkeypatch.setattr(
        "fms_acceleration_train.model_source.embedded_gguf_file", lambda: tmp_path / "x.gguf"
    )
    path, embedded = resolve_model(MOE_MODEL)
    assert embedded and calls == [path]
    assert path.parent == dense.parent and path.name.startswith(dense.name + "-moe8x2-tf")
