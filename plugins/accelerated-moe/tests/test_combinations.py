"""MoE with fused-ops-and-kernels (fms-hf-tuning's --fast_moe with --fast_kernels): FOAK's
SwiGLU kernel on the experts' gating runs inside the grouped GEMMs, not beside them."""

from __future__ import annotations

import copy

import pytest
import torch

from fms_acceleration import AccelerationFramework, compat
from fms_acceleration.packages import installed_version

KERNELS_OFF_BUT_SWIGLU = {
    "fast_loss": False,
    "fast_rms_layernorm": False,
    "fast_rope_embeddings": False,
    "fast_swiglu": True,
}


@pytest.mark.skipif(installed_version("fms-acceleration-foak") is None, reason="needs foak")
@pytest.mark.skipif(
    not compat.fused_moe_experts(),
    reason="transformers 4.55 experts have no _apply_gate: FOAK has no MoE SwiGLU rule there",
)
def test_foak_swiglu_runs_inside_the_grouped_experts(make_moe, seed, monkeypatch):
    config = {
        "plugins": {
            "training": {
                "moe": {"scattermoe": {"ep_degree": 1}},
                "fused_ops_and_kernels": KERNELS_OFF_BUT_SWIGLU,
            }
        }
    }
    framework = AccelerationFramework(config)
    assert list(framework.plugins) == ["scattermoe", "fused_ops_and_kernels"]
    model = make_moe("mixtral", seed=seed)
    reference = copy.deepcopy(model)
    model, _ = framework.augmentation(model, None, (None,))
    try:
        rules = framework.model_patcher.counts()
        assert rules == {
            "foak.swiglu.MixtralExperts": 1,
            "scattermoe.experts.MixtralSparseMoeBlock": 2,
        }
        experts_class = type(model.model.layers[0].mlp.experts)
        foak_gate = experts_class.__dict__["_apply_gate"]
        assert foak_gate.__module__.startswith("fms_acceleration_foak")
        calls = []

        def counting(self, gate_up):
            calls.append(tuple(gate_up.shape))
            return foak_gate(self, gate_up)

        monkeypatch.setattr(experts_class, "_apply_gate", counting)
        ids = torch.randint(4, 96, (2, 13))
        logits = model(input_ids=ids).logits
        # on packed (rows, 2 * intermediate) blocks (one per expert with rows on CPU, one per
        # layer on the Triton path): every token-expert row of both MoE layers, once
        assert {width for _, width in calls} == {80}
        assert sum(rows for rows, _ in calls) == 2 * (2 * 13 * 2)
        torch.testing.assert_close(logits, reference(ids).logits, atol=1e-5, rtol=1e-5)
        monkeypatch.undo()  # before the framework's undo: the class's own comes back last
    finally:
        framework.undo_patches()
    assert experts_class.__dict__["_apply_gate"].__module__.startswith("transformers.")
