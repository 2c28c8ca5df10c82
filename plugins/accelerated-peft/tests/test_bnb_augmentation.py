"""bitsandbytes augmentation: no upcast, only LoRA trainable, (None,) back, and a falling loss."""

from __future__ import annotations

import itertools

import torch
from peft import PeftModel, prepare_model_for_kbit_training

from fms_acceleration.testing import build_framework
from fms_acceleration_peft import BNBAccelerationPlugin
from fms_acceleration_peft.lora import trainable_parameter_names

TINY_LAYERS = 2


def _framework(**stanza):
    body = {"quant_type": "nf4", **stanza}
    config = {"plugins": {"peft": {"quantization": {"bitsandbytes": body}}}}
    return build_framework(config, [BNBAccelerationPlugin])


def _raw(param):
    return param.detach().reshape(-1).view(torch.uint8)


def _float_dtypes(model):
    return {p.dtype for n, p in model.named_parameters() if "lora_" not in n}


def test_only_lora_trains_and_nothing_is_upcast(tiny_llama_dir, lora_config, train_args):
    framework = _framework()
    model = framework.model_loader(tiny_llama_dir, dtype=torch.bfloat16)
    model, (peft_config,) = framework.augmentation(model, train_args(), (lora_config,))
    assert peft_config is None
    assert isinstance(model, PeftModel)
    names = trainable_parameter_names(model)
    # q,k,v,o per layer, A and B each
    assert len(names) == TINY_LAYERS * 4 * 2 and all("lora_" in n for n in names)
    # r=8 on q (64->64), k (64->32), v (64->32), o (64->64): r*(in+out) each
    expected = TINY_LAYERS * 8 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    # norms and embeddings stay bf16 (4-bit storage is bf16 too): nothing went to fp32
    assert _float_dtypes(model) == {torch.bfloat16}
    base = model.get_base_model()
    assert base.model.layers[0].input_layernorm.weight.dtype == torch.bfloat16
    assert base.model.embed_tokens.weight.dtype == torch.bfloat16


def test_peft_reference_would_upcast(tiny_llama_dir):
    """What we avoid: peft's prepare_model_for_kbit_training moves norms/embeddings to fp32."""
    framework = _framework()
    model = framework.model_loader(tiny_llama_dir, dtype=torch.bfloat16)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32


def test_gradient_checkpointing_follows_train_args(tiny_llama_dir, lora_config, train_args):
    framework = _framework()
    model = framework.model_loader(tiny_llama_dir, dtype=torch.bfloat16)
    args = train_args(gradient_checkpointing=True)
    model, _ = framework.augmentation(model, args, (lora_config,))
    assert model.get_base_model().is_gradient_checkpointing
    plain = framework.model_loader(tiny_llama_dir, dtype=torch.bfloat16)
    plain, _ = _framework().augmentation(plain, train_args(), (lora_config,))
    assert not plain.get_base_model().is_gradient_checkpointing


def test_no_peft_model_leaves_peft_to_the_trainer(tiny_llama_dir, lora_config):
    framework = _framework(no_peft_model=True)
    assert framework.slot_owners == {"model_loader": "bitsandbytes"}
    assert framework.requires_augmentation is False  # the reference's contract
    assert _framework(no_peft_model=True, quantize_embeddings=True).requires_augmentation
    model = framework.model_loader(tiny_llama_dir, dtype=torch.bfloat16)
    returned, args = framework.augmentation(model, None, (lora_config,))
    assert returned is model and not isinstance(returned, PeftModel)
    assert args == (lora_config,)


def test_slots_without_no_peft_model():
    framework = _framework()
    assert framework.slot_owners == {
        "model_loader": "bitsandbytes",
        "peft_wrapping": "bitsandbytes",
    }
    assert framework.plugins["bitsandbytes"].quant_type == "nf4"


def test_trainer_run_through_the_framework_lowers_the_loss(
    tiny_llama_dir, all_linear_lora_config, train_args, run_trainer
):
    framework = _framework(quant_type="fp4")
    model = framework.model_loader(tiny_llama_dir, dtype=torch.bfloat16)
    model, (peft_config,) = framework.augmentation(model, train_args(), (all_linear_lora_config,))
    assert peft_config is None
    # compare bytes: 4-bit weights stored as bf16 hold NaN bit patterns, and NaN != NaN
    before = {n: _raw(p).clone() for n, p in model.named_parameters()}
    losses = run_trainer(model, train_args(), framework)
    assert len(losses) == 12
    # one repeated batch: the loss falls almost every step (4.87 -> 3.91 when measured)
    assert losses[-1] < losses[0] - 0.5, losses
    assert sum(b < a for a, b in itertools.pairwise(losses)) >= 9, losses
    changed = {n for n, p in model.named_parameters() if not torch.equal(_raw(p), before[n])}
    assert changed and all("lora_" in n for n in changed)


def test_a_trainable_lm_head_copy_keeps_the_compute_dtype(tiny_llama_dir):
    """fms-hf-tuning's QLoRA with `--modules_to_save lm_head` in its default bf16, no autocast:
    the copy of the head peft trains must take bf16 hidden states (a float32 copy once failed
    the first forward with `expected m1 and m2 to have the same dtype`)."""
    from peft import LoraConfig

    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["lm_head"],
        task_type="CAUSAL_LM",
    )
    framework = _framework()
    # the keywords the client passes its loader
    model = framework.model_loader(
        tiny_llama_dir, use_cache=False, torch_dtype=torch.bfloat16, attn_implementation="sdpa"
    )
    model, _ = framework.augmentation(model, None, (lora,))
    trained = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    heads = [n for n in trained if "modules_to_save" in n]
    assert len(heads) == 1 and trained[heads[0]] == torch.bfloat16
    torch.manual_seed(0)
    ids = torch.randint(4, 128, (2, 12))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    # a random tiny model: about ln(128) = 4.85
    assert loss.dtype == torch.float32 and 4.0 < loss.item() < 5.7
    grads = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
    assert len(grads) == len(trained) == 1 + 2 * 2 * 2  # the head, A and B of q and v per layer
