"""FTS with gradient accumulation against the same optimizer steps without it."""

from __future__ import annotations

import pytest
import torch


def test_gradient_accumulation_matches_full_batches(tmp_path):
    """Two micro-batches of 2 per optimizer step: transitions happen at the same optimizer
    steps (global_step counts optimizer steps, a phase starts at an accumulation boundary), the
    groups and lrs are the same, and so are the weights, as with one batch of 4."""
    import fsdp_worker

    accumulated = fsdp_worker.train(str(tmp_path / "accumulated"), fsdp=False, grad_accum=2)
    full = fsdp_worker.train(str(tmp_path / "full"), fsdp=False)
    for key in ("transitions", "optimizer", "scheduler", "groups"):
        assert accumulated[key] == full[key], key
    assert [tuple(t) for t in accumulated["transitions"]] == [(1, 2), (2, 4)]
    assert len(accumulated["lrs"]) == 6
    for got, want in zip(accumulated["lrs"], full["lrs"]):
        assert got == pytest.approx(want)
    for name, values in full["final"].items():
        torch.testing.assert_close(
            torch.tensor(accumulated["final"][name]), torch.tensor(values), atol=1e-6, rtol=1e-5
        )
    # every scheduled tensor trained; those in no phase did not
    unscheduled = {
        "model.embed_tokens.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
    }
    assert {n for n, v in accumulated["changed"].items() if v == 0.0} == unscheduled
    assert min(v for n, v in accumulated["changed"].items() if n not in unscheduled) > 1e-6
