"""Padding-free through the framework: packed equals padded (loss, gradients, normalisation) on
tiny Llama, Granite and Qwen2; the cache guard; the Trainer path and its token count."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import transformers
from transformers import DynamicCache, Trainer

from fms_acceleration.compat import at_least
from fms_acceleration_aadp import PackedBatchError
from fms_acceleration_aadp.flattening import FlatteningCollator

LENGTHS = [5, 9, 3, 12, 7]


def _num_items(labels: torch.Tensor) -> torch.Tensor:
    """What the Trainer divides the summed loss by: labels it predicts (after the shift)."""
    return (labels[..., 1:] != -100).sum()


def _loss_and_grads(model, batch):
    model.zero_grad()
    out = model(**batch, num_items_in_batch=_num_items(batch["labels"]))
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "granite", "qwen2"])
def test_packed_equals_padded(h, padding_free, arch, attn):
    rows = h.make_rows(LENGTHS, seed=3)
    padded, packed = h.padded_batch(rows), FlatteningCollator(return_flash_attn_kwargs=True)(rows)
    # the loss is normalised by the same count of predicted tokens
    assert _num_items(padded["labels"]) == _num_items(packed["labels"]) == sum(LENGTHS) - 10
    model = h.tiny_causal_lm(arch, attn, seed=1)
    reference = copy.deepcopy(model)
    model, _ = padding_free.augmentation(model, None, (None,))
    want_loss, want_grads = _loss_and_grads(reference, padded)
    got_loss, got_grads = _loss_and_grads(model, packed)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in got_grads.items():
        torch.testing.assert_close(grad, want_grads[name], atol=1e-5, rtol=1e-5, msg=name)


def test_sdpa_runs_once_per_example_and_undo_restores_it(h, padding_free, monkeypatch):
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(query, *args, **kwargs):
        calls.append((query.shape[-2], kwargs.get("attn_mask") is None, kwargs.get("is_causal")))
        return sdpa(query, *args, **kwargs)

    model, _ = padding_free.augmentation(h.tiny_causal_lm(), None, (None,))
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    rows = h.make_rows(LENGTHS)
    model(**FlatteningCollator(return_flash_attn_kwargs=True)(rows))
    # 2 layers x 5 examples, each causal without a mask, none over the whole row
    assert calls == [(n, True, True) for n in LENGTHS] * 2
    assert transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS["sdpa"].__name__ == (
        "packed_sdpa_attention_forward"
    )
    padding_free.undo_patches()
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    assert transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward


def test_without_the_guard_a_cache_lets_packed_examples_attend_to_each_other(h):
    """The hazard the guard exists for: the config's use_cache=True silently mixes examples."""
    model = h.tiny_causal_lm()
    assert model.config.use_cache is True
    rows = h.make_rows(LENGTHS, seed=3)
    padded, packed = h.padded_batch(rows), FlatteningCollator()(rows)
    mixed = model(**packed).logits
    apart = model(**packed, use_cache=False).logits
    flat = model(**padded, use_cache=False).logits[padded["attention_mask"].bool()]
    torch.testing.assert_close(apart[0], flat, atol=1e-5, rtol=1e-5)
    # the first example is unaffected, the later ones see the tokens before them
    first = LENGTHS[0]
    torch.testing.assert_close(mixed[0, :first], apart[0, :first], atol=1e-5, rtol=1e-5)
    assert (mixed[0, first:] - apart[0, first:]).abs().max() > 1e-2


def test_guard_runs_packed_rows_without_a_cache(h, padding_free):
    model, _ = padding_free.augmentation(h.tiny_causal_lm(), None, (None,))
    rows = h.make_rows(LENGTHS, seed=3)
    out = model(**FlatteningCollator()(rows))  # use_cache left to the config (True)
    assert out.past_key_values is None
    expected = h.tiny_causal_lm()(**h.padded_batch(rows), use_cache=False).loss
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
    # an unpacked batch (generation) keeps its cache
    assert model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True).past_key_values is not None


def test_generation_with_left_padding_is_unchanged(h, padding_free):
    reference = h.tiny_causal_lm(seed=5)
    model, _ = padding_free.augmentation(copy.deepcopy(reference), None, (None,))
    ids = torch.tensor([[1, 1, 7, 8, 9], [4, 5, 6, 7, 8]])
    mask = (ids != 1).long()
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=1)
    expected = reference.generate(ids, **kwargs)
    torch.testing.assert_close(model.generate(ids, **kwargs), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ({"use_cache": True}, "with use_cache=True"),
        ({"past_key_values": "cache"}, "with a cache (past_key_values)"),
        ({"attention_mask": "ones"}, "with a 2-D attention_mask"),
    ],
)
def test_guard_refuses_what_would_mix_packed_examples(h, padding_free, extra, problem):
    model, _ = padding_free.augmentation(h.tiny_causal_lm(), None, (None,))
    batch = FlatteningCollator()(h.make_rows(LENGTHS))
    if extra.get("past_key_values") == "cache":
        extra = {"past_key_values": DynamicCache()}
    if extra.get("attention_mask") == "ones":
        extra = {"attention_mask": torch.ones_like(batch["input_ids"])}
    with pytest.raises(PackedBatchError) as info:
        model(**batch, **extra)
    assert str(info.value) == (
        "padding-free: a packed batch (position_ids restart inside a row) reached "
        f"LlamaModel.forward {problem}, so its examples would attend to each other. Train packed "
        "batches with use_cache=False and no attention_mask (as the padding-free collator makes "
        "them), or remove plugins.training.attention.padding_free."
    )
    padding_free.undo_patches()
    assert "forward" not in model.model.__dict__


def _train(h, rows, framework, tmp_path, steps=3):
    from transformers import TrainerCallback

    losses = []

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    args = h.train_args(tmp_path, max_steps=steps, learning_rate=1e-2, logging_steps=1)
    model = h.tiny_causal_lm(seed=2)
    if framework is not None:
        model, _ = framework.augmentation(model, args, (None,))
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=h.padded_batch)
    trainer.add_callback(Record())
    if framework is not None:
        for callback in framework.get_callbacks_and_ready_for_train(
            model, trainer.accelerator, trainer=trainer
        ):
            trainer.add_callback(callback)
    trainer.train()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return losses, trainer.state.num_input_tokens_seen, params


def test_trainer_steps_equal_the_padded_run_and_count_real_tokens(h, padding_free, tmp_path):
    rows = h.make_rows([5, 9, 3, 12, 7, 4, 11, 6, 8, 2, 10, 5], seed=4)
    log = logging.getLogger("transformers.trainer")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log.addHandler(handler)
    try:
        packed = _train(h, rows, padding_free, tmp_path / "packed")
    finally:
        log.removeHandler(handler)
    padded = _train(h, rows, None, tmp_path / "padded")
    torch.testing.assert_close(packed[0], padded[0], atol=1e-5, rtol=1e-5)
    # 3 steps of 4 rows = every row once; a packed batch holds no padding, and the padded run
    # counts by its attention mask where transformers knows "non_padding" (from 4.57)
    real = sum(len(r["input_ids"]) for r in rows)
    assert packed[1] == real
    if at_least("transformers", "4.57"):
        assert padded[1] == real
    else:
        assert padded[1] > real
    assert not [r for r in records if "count non-padding" in r.getMessage()]
    for name, value in packed[2].items():
        torch.testing.assert_close(value, padded[2][name], atol=1e-5, rtol=1e-5, msg=name)
