"""A schedule written with the base model's names drives a peft (LoRA) model."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"
PEFT = "base_model.model."


def lora_model(h):
    """The tiny llama with LoRA (r=4) on q_proj and v_proj."""
    torch.manual_seed(1)
    return get_peft_model(
        h.tiny_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )


SCHEDULE = {
    0: {"params": [f"{Q}.lora_A.weight", f"{Q}.lora_B.weight"], "max_transition_epoch": 1},
    1: {"params": [r"model\.layers\.0\.self_attn\.v_proj\.lora_"], "max_transition_epoch": 2},
    2: {"params": ["model.norm.weight"], "lr": 1e-3},
}


def test_base_names_schedule_on_lora_model(tmp_path, h):
    model = lora_model(h)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer, plugin, recorder = h.run_fts(str(tmp_path), {"ft_schedule": SCHEDULE}, model=model)
    assert type(plugin.adapter).__name__ == "PeftStrategyAdapter"
    lora_q = {f"{Q}.lora_A.weight", f"{Q}.lora_B.weight"}
    lora_v = {f"{V}.lora_A.weight", f"{V}.lora_B.weight"}
    assert [r["thawed"] for r in recorder.rows] == [
        lora_q,
        lora_q | lora_v,
        lora_q | lora_v | {"model.norm.weight"},
        lora_q | lora_v | {"model.norm.weight"},
    ]
    # lora weights decay, the norm does not; the Trainer keeps its empty no-decay group, FTS adds
    # only non-empty ones
    assert recorder.rows[2]["groups"] == [(0, 2, 0.1), (0, 0, 0.0), (1, 2, 0.1), (2, 1, 0.0)]
    final = dict(trainer.model.named_parameters())
    for name in (f"{Q}.base_layer.weight", f"{V}.base_layer.weight", "lm_head.weight"):
        assert torch.equal(final[PEFT + name], init[PEFT + name]), name
    for name in (f"{V}.lora_B.default.weight", "model.norm.weight"):
        assert not torch.equal(final[PEFT + name], init[PEFT + name]), name


def test_lora_resume_matches_and_default_schedule_is_adapter_only(tmp_path, h):
    ref_dir = tmp_path / "ref"
    trainer, plugin, _ = h.run_fts(str(ref_dir), {}, model=lora_model(h))
    written = yaml.safe_load((ref_dir / "LlamaForCausalLM_ft_schedule.yaml").read_text())
    assert written == {
        0: {"params": [f"{V}.lora_B.weight", f"{V}.lora_A.weight"]},
        1: {"params": [f"{Q}.lora_B.weight", f"{Q}.lora_A.weight"]},
    }
    # no max_transition_epoch in the default schedule: transitions by early stopping only
    assert plugin.callback.depth == 0
    sched = {0: {**written[0], "max_transition_epoch": 1}, 1: written[1]}
    ref_dir2 = tmp_path / "ref2"
    trainer, _, _ = h.run_fts(str(ref_dir2), {"ft_schedule": sched}, model=lora_model(h))
    final = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    run_dir = tmp_path / "resume"
    shutil.copytree(ref_dir2 / "checkpoint-8", run_dir / "checkpoint-8")
    trainer2, plugin2, _ = h.run_fts(
        str(run_dir),
        {"ft_schedule": sched},
        model=lora_model(h),
        resume=str(run_dir / "checkpoint-8"),
    )
    assert plugin2.callback.depth == 1
    diff = max((p - final[n]).abs().max().item() for n, p in trainer2.model.named_parameters())
    assert diff <= 1e-5


def test_peft_names_in_schedule_point_to_base_names(tmp_path, h):
    from fms_acceleration import AccelerationPluginConfigError
    from fms_acceleration.testing import build_framework
    from fms_acceleration_fts import FinetuningSchedulePlugin

    bad = {0: {"params": [f"{PEFT}{Q}.lora_A.default.weight"]}}
    framework = build_framework(
        {"plugins": {"training": {"finetuning_schedule": {"ft_schedule": bad}}}},
        [FinetuningSchedulePlugin],
    )
    with pytest.raises(AccelerationPluginConfigError, match=r"lora_A\.default\.weight"):
        framework.augmentation(lora_model(h), h.train_args(str(tmp_path)), modifiable_args=())


def test_lora_restore_best_loads_adapter_checkpoint(tmp_path, h):
    from safetensors.torch import load_file

    seen = []

    class Snap(TrainerCallback):
        def on_epoch_begin(self, args, state, control, model=None, **kw):
            seen.append({n: p.detach().clone() for n, p in model.named_parameters()})

    h.run_fts(
        str(tmp_path),
        {"ft_schedule": SCHEDULE, "restore_best": True},
        model=lora_model(h),
        first_callbacks=[h.MetricSequence([1.0, 2.0, 3.0, 4.0])],  # epoch 0 stays the best
        extra_callbacks=[Snap()],
    )
    saved = load_file(str(tmp_path / "checkpoint-4" / "adapter_model.safetensors"))
    # the transition at the start of epoch 2 restored checkpoint-4's adapter weights
    for key, value in saved.items():
        actual = key.replace(".weight", ".default.weight")
        assert torch.equal(seen[2][actual], value), key
    assert not torch.equal(
        seen[2][f"{PEFT}{V}.lora_B.default.weight"], seen[3][f"{PEFT}{V}.lora_B.default.weight"]
    )


def test_lora_applied_by_the_client_after_augmentation(tmp_path, h):
    """The documented client order: augmentation, then get_peft_model, then ready-for-train."""
    from transformers import Trainer

    from fms_acceleration.testing import build_framework, tiny_dataset
    from fms_acceleration_fts import FinetuningSchedulePlugin

    framework = build_framework(
        {"plugins": {"training": {"finetuning_schedule": {"ft_schedule": SCHEDULE}}}},
        [FinetuningSchedulePlugin],
    )
    args = h.train_args(str(tmp_path))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model, (peft_config,) = framework.augmentation(h.tiny_model(), args, modifiable_args=(lora,))
    assert peft_config is lora  # FTS leaves PEFT to the client
    model = get_peft_model(model, peft_config)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=tiny_dataset(n=16, seq_len=8, seed=0),
        eval_dataset=tiny_dataset(n=8, seq_len=8, seed=1),
    )
    for cb in framework.get_callbacks_and_ready_for_train(model, trainer.accelerator):
        trainer.add_callback(cb)
    plugin = framework.plugins["finetuning_schedule"]
    assert plugin.callback.model is model
    assert type(plugin.adapter).__name__ == "PeftStrategyAdapter"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{PEFT}{Q}.lora_A.default.weight", f"{PEFT}{Q}.lora_B.default.weight"}
    trainer.train()
    assert plugin.callback.depth == 2
