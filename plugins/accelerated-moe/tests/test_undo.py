"""undo_patches() reverts everything the plugin did, keeping what training changed: on
transformers 4.55 the original per-expert modules (or Granite's ParallelExperts) come back
holding the trained values; on 5.x the experts' own forward comes back. Every change is a
record whose target holds the patch while it is applied (what the core's effect check reads)."""

from __future__ import annotations

import copy

import pytest
import torch

from fms_acceleration import compat
from fms_acceleration.patch_records import MISSING, current_value
from fms_acceleration.testing import build_framework
from fms_acceleration_moe import ScatterMoEAccelerationPlugin
from fms_acceleration_moe.grouped_experts import GroupedExperts
from fms_acceleration_moe.models import ARCHITECTURES, moe_blocks

STANZA = {"plugins": {"training": {"moe": {"scattermoe": {"ep_degree": 1}}}}}


def _train(model, steps=3):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    for step in range(steps):
        ids = torch.randint(4, 96, (2, 11), generator=torch.Generator().manual_seed(step))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def assert_records_in_effect(history):
    """Each record's target holds something other than what it replaced (the patch)."""
    assert history
    for record in history:
        assert record._owner is not None, record
        now = current_value(record._owner, record._name)
        assert now is not record._previous, record
        assert now is not MISSING or record.kind in ("module", "parameter"), record


@pytest.mark.parametrize("arch", ["mixtral", "granitemoe", "qwen2_moe"])
def test_undo_restores_the_original_modules_with_trained_values(arch, make_moe, seed):
    model = make_moe(arch, seed=seed)
    spec = ARCHITECTURES[arch]
    blocks = dict(moe_blocks(model, spec))
    originals = {name: dict(block._modules) for name, block in blocks.items()}
    framework = build_framework(STANZA, [ScatterMoEAccelerationPlugin])
    model, _ = framework.augmentation(model, None, (None,))
    assert_records_in_effect(framework.model_patcher.history)
    kinds = {record.kind for record in framework.model_patcher.history}
    if compat.fused_moe_experts():
        assert kinds == {"forward"}
    else:
        assert kinds == {"forward", "module"}
        assert all(isinstance(b.experts, GroupedExperts) for b in blocks.values())
    _train(model)
    trained_state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(4, 96, (3, 9))
    trained_logits = model(ids).logits

    framework.undo_patches()
    assert framework.model_patcher.history == []
    for name, block in blocks.items():
        assert dict(block._modules) == originals[name]  # the very same module objects
        experts = block._modules.get("experts")  # 4.55 Granite has none of its own
        assert "forward" not in block.__dict__ and "forward" not in vars(experts or block)
    # the original modules hold the trained values: same state dict, same logits
    state = model.state_dict()
    assert sorted(state) == sorted(trained_state)
    for key, value in state.items():
        assert torch.equal(value, trained_state[key]), key
    torch.testing.assert_close(model(ids).logits, trained_logits, atol=1e-5, rtol=1e-5)
    # and they train again as plain modules
    named = dict(model.named_parameters())
    expert_weights = [k for k in named if ".experts." in k or "_linear" in k]
    assert expert_weights and all(named[k].requires_grad for k in expert_weights)


def test_undo_after_a_copy_of_the_trained_model_matches_unpatched_training(make_moe, seed):
    """The patched model trains like the plain one; after undo it is that plain model."""
    model = make_moe("olmoe", seed=seed)
    reference = copy.deepcopy(model)
    framework = build_framework(STANZA, [ScatterMoEAccelerationPlugin])
    model, _ = framework.augmentation(model, None, (None,))
    _train(model)
    _train(reference)
    framework.undo_patches()
    for (name, value), (_, expected) in zip(
        model.named_parameters(), reference.named_parameters(), strict=True
    ):
        torch.testing.assert_close(value, expected, atol=1e-5, rtol=1e-5, msg=name)
