"""quantize_embeddings: 4-bit embedding + lm_head (one shared weight when tied), frozen."""

from __future__ import annotations

import itertools

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.nn import Embedding4bit, Linear4bit
from peft import LoraConfig

from fms_acceleration import AccelerationPluginConfigError
from fms_acceleration.testing import build_framework, save_tiny_model
from fms_acceleration_peft import BNBAccelerationPlugin
from fms_acceleration_peft.memory import model_bytes

# bnb's CPU matmul_4bit dequantizes and runs a plain linear, so only summation order may differ;
# using the unquantized lm_head instead is off by ~5e-2 on these logits (|logit| <= 1.5).
LOGIT_TOL = {torch.bfloat16: dict(rtol=0, atol=8e-3), torch.float32: dict(rtol=0, atol=1e-5)}


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def tied_dir(request, tmp_path_factory):
    """(tie_word_embeddings, tiny llama saved with it)."""
    path = tmp_path_factory.mktemp(f"tie_{request.param}")
    return request.param, str(
        save_tiny_model(path, arch="llama", tie_word_embeddings=request.param)
    )


def _framework(**stanza):
    body = {"quant_type": "nf4", **stanza}
    return build_framework(
        {"plugins": {"peft": {"quantization": {"bitsandbytes": body}}}}, [BNBAccelerationPlugin]
    )


def _head_reference(model, ids, dtype):
    """Logits from the dequantized shared/own lm_head weight applied to the final hidden states."""
    head = model.get_output_embeddings()
    hidden = model.model(input_ids=ids).last_hidden_state
    weight = bnb.functional.dequantize_4bit(head.weight.data, head.weight.quant_state)
    return hidden.to(dtype) @ weight.to(dtype).t()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_embedding_and_head_are_4bit_and_the_tie_holds(tied_dir, dtype):
    tied, path = tied_dir
    model = _framework(quantize_embeddings=True).model_loader(path, dtype=dtype)
    assert model.config.tie_word_embeddings is tied
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embedding, Embedding4bit) and isinstance(head, Linear4bit)
    assert embedding.weight.shape == head.weight.shape  # packed [vocab*hidden/2 / itemsize, 1]
    assert (embedding.weight is head.weight) is tied
    same_storage = embedding.weight.data_ptr() == head.weight.data_ptr()
    assert same_storage is tied
    assert head.weight.quant_state.shape == (128, 64)
    assert head.weight.quant_state.quant_type == "nf4" and head.weight.dtype == dtype
    assert not head.support_avx512bf16_for_cpu  # the CPU repack guard covers the new lm_head
    assert not any(p.requires_grad for p in (embedding.weight, head.weight))

    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        expected = _head_reference(model, ids, dtype)
        table = bnb.functional.dequantize_4bit(embedding.weight.data, embedding.weight.quant_state)
        looked_up = embedding(ids)
    assert logits.shape == (2, 11, 128) and logits.dtype == dtype
    torch.testing.assert_close(logits, expected, **LOGIT_TOL[dtype])
    torch.testing.assert_close(looked_up, table[ids].to(dtype), rtol=0, atol=0)
    assert logits.float().std() > 0.05  # not a degenerate all-zero comparison


def test_quantized_weights_stay_close_to_the_originals(tied_dir):
    _, path = tied_dir
    plain = _framework().model_loader(path, dtype=torch.float32)
    quant = _framework(quantize_embeddings=True).model_loader(path, dtype=torch.float32)
    for get in ("get_input_embeddings", "get_output_embeddings"):
        original = getattr(plain, get)().weight
        q = getattr(quant, get)().weight
        restored = bnb.functional.dequantize_4bit(q.data, q.quant_state)
        # nf4: 16 levels per 64-block -> at most ~1/6 of the block's absmax off
        error = (restored - original).abs().max() / original.abs().max()
        assert 0 < error < 0.2, (get, error)


def test_memory_is_lower_and_the_tie_is_counted_once(tied_dir):
    tied, path = tied_dir
    plain = model_bytes(_framework().model_loader(path, dtype=torch.bfloat16))
    quant = model_bytes(
        _framework(quantize_embeddings=True).model_loader(path, dtype=torch.bfloat16)
    )
    # per table: 128x64 bf16 (16 KiB) -> 4 KiB packed + 128 fp32 absmax + a 16-entry fp32 code
    table = 128 * 64 * 2
    saved = (table - table // 4 - 128 * 64 // 64 * 4 - 16 * 4) * (1 if tied else 2)
    assert plain - quant == saved, (plain, quant)
    assert quant / plain < (0.84 if tied else 0.74)


def test_trainer_run_lowers_the_loss_and_the_adapter_saves(
    tied_dir, all_linear_lora_config, train_args, run_trainer, tmp_path
):
    tied, path = tied_dir
    framework = _framework(quantize_embeddings=True)
    model = framework.model_loader(path, dtype=torch.bfloat16)
    model, (peft_config,) = framework.augmentation(model, train_args(), (all_linear_lora_config,))
    assert peft_config is None
    base = model.get_base_model()
    head_bytes = base.lm_head.weight.detach().view(torch.uint8).clone()
    losses = run_trainer(model, train_args(), framework)
    assert len(losses) == 12
    assert losses[-1] < losses[0] - 0.5, losses
    assert sum(b < a for a, b in itertools.pairwise(losses)) >= 9, losses
    assert torch.equal(base.lm_head.weight.detach().view(torch.uint8), head_bytes)
    assert (base.lm_head.weight is base.model.embed_tokens.weight) is tied
    model.save_pretrained(tmp_path / "adapter")  # peft reads the full state dict to save
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("lora_kwargs", "named"),
    [
        (dict(target_modules=["q_proj", "lm_head"]), "lm_head (target_modules)"),
        (dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"]), "modules_to_save"),
        (dict(target_modules=r".*(embed_tokens|q_proj)"), "model.embed_tokens (target_modules)"),
    ],
    ids=["target-lm_head", "save-embed_tokens", "regex-embed_tokens"],
)
def test_lora_on_quantized_embeddings_is_refused(tiny_llama_dir, lora_kwargs, named):
    framework = _framework(quantize_embeddings=True)
    model = framework.model_loader(tiny_llama_dir, dtype=torch.bfloat16)
    with pytest.raises(AccelerationPluginConfigError) as err:
        framework.augmentation(model, None, (LoraConfig(r=4, **lora_kwargs),))
    message = str(err.value)
    assert "plugins.peft.quantization.bitsandbytes.quantize_embeddings" in message
    assert named in message


def test_same_lora_is_fine_without_the_key(tiny_llama_dir):
    framework = _framework()
    model = framework.model_loader(tiny_llama_dir, dtype=torch.bfloat16)
    model, _ = framework.augmentation(model, None, (LoraConfig(r=4, target_modules=["lm_head"]),))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "base_model.model.lm_head.lora_A.default.weight",
        "base_model.model.lm_head.lora_B.default.weight",
    ]


def test_default_keeps_embeddings_unquantized(tiny_llama_dir):
    framework = _framework()
    assert framework.plugins["bitsandbytes"].quantize_embeddings is False
    model = framework.model_loader(tiny_llama_dir, dtype=torch.bfloat16)
    assert type(model.get_input_embeddings()) is torch.nn.Embedding
    assert type(model.get_output_embeddings()) is torch.nn.Linear


def test_quantize_embeddings_must_be_a_bool():
    with pytest.raises(AccelerationPluginConfigError, match="quantize_embeddings"):
        _framework(quantize_embeddings="yes")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=["u8", "bf16"])
@pytest.mark.parametrize("width", [576, 200], ids=["realistic", "odd"])
def test_chunked_quantization_equals_one_call(bnb_dequant_kind, width, quant_type, storage):
    """Quantizing the table 64 rows at a time gives the codes and absmax of one call, at a width
    as in real models and at one whose 64-blocks straddle rows (bnb is right on it everywhere)."""
    from fms_acceleration_peft.bnb_dequant_check import decode_4bit
    from fms_acceleration_peft.bnb_embeddings import quantize_table

    weight = torch.randn(200, width, generator=torch.Generator().manual_seed(11)).bfloat16()
    whole = quantize_table(weight, quant_type, storage, rows_per_chunk=256)
    chunked = quantize_table(weight, quant_type, storage, rows_per_chunk=64)
    assert torch.equal(chunked.data.view(torch.uint8), whole.data.view(torch.uint8))
    state = chunked.quant_state
    assert state.absmax.shape == (200 * width // 64,)
    assert torch.equal(state.absmax, whole.quant_state.absmax)
    restored = bnb.functional.dequantize_4bit(chunked.data, state)
    assert restored.shape == (200, width)
    decoded = decode_4bit(chunked.data, state.absmax, state.code, 64, (200, width), torch.bfloat16)
    assert torch.equal(restored, decoded)
    error = (restored.float() - weight.float()).abs().max() / weight.float().abs().max()
    assert 0 < error < 0.2
    with pytest.raises(ValueError, match="rows_per_chunk=100"):
        quantize_table(weight, quant_type, storage, rows_per_chunk=100)


def test_an_empty_table_is_refused():
    from fms_acceleration_peft.bnb_embeddings import quantize_table

    with pytest.raises(ValueError, match=r"shape \[0, 64\] has no rows"):
        quantize_table(torch.empty(0, 64), "nf4", torch.uint8)


def test_repack_guard_covers_the_4bit_lm_head(tied_dir, monkeypatch):
    """On an AVX512-BF16 CPU an eval forward would repack lm_head, i.e. the shared table too."""
    import bitsandbytes.nn.modules as bnb_modules

    from fms_acceleration_peft import is_repacked_for_cpu

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    _, path = tied_dir
    model = _framework(quantize_embeddings=True).model_loader(path, dtype=torch.bfloat16)
    head = model.get_output_embeddings()
    assert head.support_avx512bf16_for_cpu is False
    packed = head.weight.detach().view(torch.uint8).clone()
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(4)))
    assert not is_repacked_for_cpu(head)
    assert torch.equal(head.weight.detach().view(torch.uint8), packed)
    assert head.weight.quant_state.absmax.shape == (128 * 64 // 64,)
