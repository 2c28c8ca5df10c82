"""Padding-free with the other plugins: fused-ops-and-kernels (CE kernel and fused linear CE on
packed labels), accelerated-peft (bitsandbytes nf4 + LoRA) and finetuning-schedule."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from fms_acceleration import AccelerationFramework
from fms_acceleration.packages import installed_version
from fms_acceleration_aadp.flattening import FlatteningCollator

LENGTHS = [6, 11, 4, 9]


def _needs(package: str):
    return pytest.mark.skipif(installed_version(package) is None, reason=f"{package} not installed")


def _with_padding_free(h, **stanzas) -> dict:
    config = copy.deepcopy(h.PADDING_FREE)
    for dotted, body in stanzas.items():
        node = config
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = body
    return {"plugins": config}


def _loss_and_grads(model, batch):
    model.zero_grad()
    labels = batch["labels"]
    loss = model(**batch, num_items_in_batch=(labels[..., 1:] != -100).sum()).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@_needs("fms-acceleration-foak")
@pytest.mark.parametrize("fast_loss", [True, "fused_ce_liger"])
def test_fused_kernels_on_packed_labels_equal_the_padded_run(h, fast_loss):
    config = _with_padding_free(h, **{"training.fused_ops_and_kernels": {"fast_loss": fast_loss}})
    framework = AccelerationFramework(config)
    assert list(framework.plugins) == ["fused_ops_and_kernels", "padding_free"]
    rows = h.make_rows(LENGTHS, seed=8)
    model = h.tiny_causal_lm(seed=4)
    reference = copy.deepcopy(model)
    model.train(), reference.train()
    try:
        model, _ = framework.augmentation(model, TrainingArguments("unused", use_cpu=True), (None,))
        got = _loss_and_grads(model, FlatteningCollator(return_flash_attn_kwargs=True)(rows))
    finally:
        framework.undo_patches()
    want = _loss_and_grads(reference, h.padded_batch(rows))
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    assert got[1].keys() == want[1].keys()
    for name, grad in got[1].items():
        torch.testing.assert_close(grad, want[1][name], atol=1e-5, rtol=1e-5, msg=name)


@_needs("fms-acceleration-peft")
def test_bitsandbytes_lora_trains_on_packed_rows_as_on_padded(h, tmp_path):
    from peft import LoraConfig

    from fms_acceleration.testing import save_tiny_model

    config = _with_padding_free(h, **{"peft.quantization.bitsandbytes": {"quant_type": "nf4"}})
    framework = AccelerationFramework(config)
    assert list(framework.plugins) == ["bitsandbytes", "padding_free"]
    model = framework.model_loader(str(save_tiny_model(tmp_path / "m")), dtype=torch.bfloat16)
    lora = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    args = TrainingArguments(str(tmp_path / "out"), use_cpu=True, bf16=True)
    try:
        model, (peft_config,) = framework.augmentation(model, args, (lora,))
        assert peft_config is None  # the bnb plugin applied LoRA itself
        framework.get_callbacks_and_ready_for_train(model)
        rows = h.make_rows(LENGTHS, seed=2)
        model.train()
        got = _loss_and_grads(model, FlatteningCollator(return_flash_attn_kwargs=True)(rows))
        want = _loss_and_grads(model, h.padded_batch(rows))
    finally:
        framework.undo_patches()
    # bf16 weights: packed and padded differ only by the order of bf16 roundings
    assert got[1].keys() == want[1].keys() and all("lora_" in n for n in got[1])
    torch.testing.assert_close(got[0], want[0], atol=2e-2, rtol=2e-2)
    nonzero = 0
    for name, grad in got[1].items():
        if not want[1][name].any():  # lora_A: no gradient while lora_B is still zero
            assert not grad.any(), name
            continue
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), want[1][name].flatten(), 0)
        assert cosine > 0.99, name
        nonzero += 1
    assert nonzero == 4  # lora_B of q_proj and v_proj in both layers


@_needs("fms-acceleration-fts")
def test_finetuning_schedule_trains_packed_as_padded(h, tmp_path):
    def run(config, name):
        losses = []

        class Record(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    losses.append(logs["loss"])

        framework = AccelerationFramework(config)
        args = h.train_args(tmp_path / name, max_steps=3, learning_rate=1e-2, logging_steps=1)
        model, _ = framework.augmentation(h.tiny_causal_lm(seed=6), args, (None,))
        rows = h.make_rows([5, 9, 3, 12, 7, 4, 11, 6, 8, 2, 10, 5], seed=1)
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=h.padded_batch)
        trainer.add_callback(Record())
        try:
            for callback in framework.get_callbacks_and_ready_for_train(
                model, trainer.accelerator, trainer=trainer
            ):
                trainer.add_callback(callback)
            trainer.train()
        finally:
            framework.undo_patches()
        trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        return losses, trainable, list(framework.plugins)

    stanza = {"max_depth": -1}  # the generated default schedule, every phase
    packed = run(_with_padding_free(h, **{"training.finetuning_schedule": stanza}), "packed")
    padded = run({"plugins": {"training": {"finetuning_schedule": stanza}}}, "padded")
    assert packed[2] == ["finetuning_schedule", "padding_free"]
    assert packed[1] == padded[1] and len(packed[1]) > 0  # the same phase-0 parameters train
    torch.testing.assert_close(packed[0], padded[0], atol=1e-5, rtol=1e-5)
