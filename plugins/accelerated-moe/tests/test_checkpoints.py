"""Checkpoints written while the plugin is active convert back to the original HF layout and
reload in plain transformers with the same logits."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fms_acceleration.testing import build_framework
from fms_acceleration_moe import ScatterMoEAccelerationPlugin
from fms_acceleration_moe.utils import recover_safetensors_from_dcp

STANZA = {"plugins": {"training": {"moe": {"scattermoe": {}}}}}


def _accelerated(make_moe, arch, seed):
    model = make_moe(arch, seed=seed)
    fw = build_framework(STANZA, [ScatterMoEAccelerationPlugin])
    model, _ = fw.augmentation(model, None, (None,))
    return model


def _reload_logits(path, ids):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()(ids).logits


def test_trainer_checkpoint_converts_and_reloads(make_moe, tmp_path, seed):
    from transformers import Trainer, TrainingArguments

    from fms_acceleration.testing import tiny_dataset

    model = _accelerated(make_moe, "mixtral", seed).train()
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
    )
    data = tiny_dataset(n=8, seq_len=12, vocab=96)
    Trainer(model=model, args=args, train_dataset=data).train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    out = tmp_path / "converted"
    # the command line the reference documents
    subprocess.run(
        [
            sys.executable,
            "-m",
            "fms_acceleration_moe.utils.checkpoint_utils",
            str(checkpoint),
            str(out),
            str(checkpoint),
        ],
        check=True,
    )
    ids = torch.randint(4, 96, (2, 9))
    model.eval()
    torch.testing.assert_close(_reload_logits(out, ids), model(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["mixtral", "granitemoe"])
def test_dcp_checkpoint_with_fused_experts_converts(arch, make_moe, tmp_path, seed):
    import torch.distributed.checkpoint as dcp

    model = _accelerated(make_moe, arch, seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    # what FSDP with sharded experts saves: parameters under their module names, experts fused
    fused = {name: param.detach() for name, param in model.named_parameters()}
    fused.update({n: b for n, b in model.named_buffers() if n in model.state_dict()})
    checkpoint = tmp_path / "checkpoint-5"
    dcp.save({"model": fused}, checkpoint_id=str(checkpoint / "pytorch_model_fsdp_0"))
    model.config.save_pretrained(checkpoint)
    out = tmp_path / "converted"
    recover_safetensors_from_dcp(str(checkpoint), str(checkpoint), str(out))
    ids = torch.randint(4, 96, (2, 9))
    torch.testing.assert_close(_reload_logits(out, ids), model(ids).logits, atol=1e-5, rtol=1e-5)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    from fms_acceleration_moe.errors import CheckpointLayoutError

    with pytest.raises(CheckpointLayoutError, match="no checkpoint found"):
        recover_safetensors_from_dcp(str(tmp_path), None, str(tmp_path / "out"))
