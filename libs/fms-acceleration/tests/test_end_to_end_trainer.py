"""A real transformers.Trainer on a tiny random-init Llama, driven through the framework:
model_loader (conftest's FakeLoader) -> augmentation -> callbacks (+ accelerator patch) -> 3
training steps."""

from __future__ import annotations

import logging

import pytest
import torch
from peft import LoraConfig
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

from fms_acceleration import (
    AccelerationPlugin,
    AcceleratorPatcherComponent,
    ModelPatcherRule,
    ModelPatcherTrigger,
    Requirement,
    StanzaModel,
)
from fms_acceleration.framework_plugin import isolated_registrations
from fms_acceleration.testing import build_framework, tiny_dataset


class StepCounter(TrainerCallback):
    def __init__(self) -> None:
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def rms_norm_forward(self, hidden_states):
    """Plain RMSNorm (the same math as LlamaRMSNorm), counting its calls."""
    self.patched_calls = getattr(self, "patched_calls", 0) + 1
    variance = hidden_states.float().pow(2).mean(-1, keepdim=True)
    normed = hidden_states.float() * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * normed.to(hidden_states.dtype)


class TinyLora(AccelerationPlugin):
    slots = frozenset({"peft_wrapping", "rms_norm"})

    def __init__(self, configurations):
        super().__init__(configurations)
        self.rank = self.stanza("training.tiny_lora")["rank"]
        self.counter = StepCounter()
        self.collated_batches = 0

    @property
    def requires_augmentation(self) -> bool:
        return True

    def requirements(self):
        return [Requirement("model_loader", ("fake_loader",))]

    def augmentation(self, model, train_args, modifiable_args):
        from peft import get_peft_model

        (lora_config,) = modifiable_args
        lora_config.r = self.rank
        self.model_patcher.register(
            ModelPatcherRule(
                "plain-rms-norm",
                trigger=ModelPatcherTrigger(check=lambda m: type(m).__name__ == "LlamaRMSNorm"),
                forward=rms_norm_forward,
            )
        )
        return get_peft_model(model, lora_config), (None,)

    def get_callbacks_and_ready_for_train(self, model=None, accelerator=None):
        def count_batches(old_collate):
            def collate(rows):
                self.collated_batches += 1
                return old_collate(rows)

            return collate

        self.accelerator_patcher.replace(
            "count-batches",
            AcceleratorPatcherComponent.data_collator,
            replacement_builder=count_batches,
        )
        return [self.counter]


class LoraOptions(StanzaModel):
    rank: int = 4


with isolated_registrations():
    AccelerationPlugin.register_plugin(
        TinyLora,
        configuration_and_paths=["training.tiny_lora"],
        plugin_id="tiny_lora",
        schemas={"training.tiny_lora": LoraOptions},
    )


@pytest.mark.slow
def test_trainer_runs_three_steps_through_the_framework(tmp_path, tiny_llama_dir, caplog, fakes):
    framework = build_framework(
        {
            "plugins": {
                "peft": {"quantization": {"fake_loader": {}}},
                "training": {"tiny_lora": {"rank": 2}},
            }
        },
        [TinyLora, fakes.FakeLoader],
    )
    assert list(framework.plugins) == ["fake_loader", "tiny_lora"]
    assert [name for name, _ in framework.active_plugins] == ["FakeLoader", "TinyLora"]
    assert framework.requires_custom_loading and framework.requires_augmentation

    model = framework.model_loader(str(tiny_llama_dir), dtype=torch.float32)
    train_args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
    )
    lora = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    hub_kernels = bool(getattr(model, "use_kernels", False))  # transformers 5.2x + kernels
    model, (peft_config,) = framework.augmentation(model, train_args, modifiable_args=(lora,))
    assert peft_config is None
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert all("lora_" in n for n in trainable)
    assert model.peft_config["default"].r == 2
    assert framework.model_patcher.counts() == {"plain-rms-norm": 5}
    # patching hub-decorated norms turns hub kernels off, else train() would drop the patch
    assert [r.rule_id for r in framework.model_patcher.history if r.kind == "setting"] == (
        ["hub-kernels-off"] if hub_kernels else []
    )

    frozen_before = {
        n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad
    }
    lora_b_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    trainer = Trainer(
        model=model,
        args=train_args,
        train_dataset=tiny_dataset(n=24, seq_len=12),
        data_collator=default_data_collator,
    )
    with caplog.at_level(logging.INFO, logger="fms_acceleration"):
        for callback in framework.get_callbacks_and_ready_for_train(model, trainer.accelerator):
            trainer.add_callback(callback)
    summary = caplog.text
    assert "fms-acceleration: ready for train" in summary
    assert "Active Plugin: FakeLoader." in summary and "Active Plugin: TinyLora." in summary
    assert "fake_loader" in summary and "tiny_lora" in summary
    assert "plain-rms-norm" in summary and "count-batches" in summary

    result = trainer.train()

    plugin = framework.plugins["tiny_lora"]
    assert trainer.state.global_step == 3
    assert plugin.counter.steps == 3
    # accelerate's DataLoaderShard fetches one batch ahead to detect the end of the epoch
    assert plugin.collated_batches in (3, 4)
    assert torch.isfinite(torch.tensor(result.training_loss))
    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    # 3 steps of forward+backward (no recompute), 5 norms each
    assert [m.patched_calls for m in norms] == [3] * 5
    for name, param in model.named_parameters():
        if name in frozen_before:
            torch.testing.assert_close(param, frozen_before[name], rtol=0, atol=0)
    assert all(
        not torch.equal(lora_b_before[n], p)
        for n, p in model.named_parameters()
        if n in lora_b_before
    )
    framework.undo_patches()
    assert all("forward" not in m.__dict__ for m in norms)
