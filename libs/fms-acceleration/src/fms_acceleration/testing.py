"""Helpers for plugin authors' tests: frameworks from dicts, tiny models, tiny datasets."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .framework import AccelerationFramework
from .framework_plugin import AccelerationPlugin, registration_of

# Special token ids shared by every tiny config and by `tiny_tokenizer`.
_SPECIAL_IDS = dict(pad_token_id=1, bos_token_id=2, eos_token_id=3)
# Per architecture: config overrides that keep the model tiny but structurally faithful.
_DECODER = dict(
    **_SPECIAL_IDS,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
)
_MOE = dict(num_local_experts=4, num_experts_per_tok=2)
TINY_ARCHS: Mapping[str, dict[str, Any]] = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": {**_DECODER, "head_dim": 16},
    "granite": _DECODER,
    "mixtral": {**_DECODER, **_MOE},
    "granitemoe": {**_DECODER, **_MOE},
    "gpt_bigcode": dict(
        n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=256, **_SPECIAL_IDS
    ),
}


def build_framework(
    config: Mapping[str, Any],
    plugins: Sequence[type[AccelerationPlugin]],
    require_packages_check: bool = True,
) -> AccelerationFramework:
    """A framework over exactly `plugins` (no entry-point discovery), from a config dict.

    Registrations live on the plugin classes themselves, so nothing leaks between tests.
    """
    for cls in plugins:
        if registration_of(cls) is None:
            raise TypeError(
                f"{cls.__name__} was never passed to AccelerationPlugin.register_plugin"
            )
    return AccelerationFramework(
        dict(config), require_packages_check=require_packages_check, plugin_classes=list(plugins)
    )


def write_config(path: str | os.PathLike, config: Mapping[str, Any]) -> Path:
    """Write a config dict as YAML (for tests that go through files or the CLI)."""
    import yaml

    path = Path(path)
    path.write_text(yaml.safe_dump(dict(config), sort_keys=False), encoding="utf-8")
    return path


def tiny_model_config(arch: str = "llama", **overrides: Any):
    """A tiny transformers config of the given architecture (model_type)."""
    from transformers import AutoConfig

    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {', '.join(TINY_ARCHS)}")
    return AutoConfig.for_model(arch, **{**TINY_ARCHS[arch], **overrides})


def tiny_tokenizer(vocab_size: int = 128):
    """A word-level fast tokenizer over `tok0..tokN` plus special tokens; no downloads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    words = specials + [f"tok{i}" for i in range(vocab_size - len(specials))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )


def save_tiny_model(
    path: str | os.PathLike,
    arch: str = "llama",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """Save a random-init tiny causal LM and a matching tokenizer under `path`.

    AutoTokenizer loads the tokenizer for every arch but qwen2, which transformers 5 maps to a
    BPE tokenizer class; load that one with PreTrainedTokenizerFast.from_pretrained.
    """
    from transformers import AutoModelForCausalLM

    from .compat import dtype_kwargs

    config = tiny_model_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, **dtype_kwargs(dtype))
    path = Path(path)
    model.save_pretrained(path)
    tiny_tokenizer(config.vocab_size).save_pretrained(path)
    return path


def tiny_dataset(
    n: int = 32, seq_len: int = 16, vocab: int = 128, seed: int = 0
) -> list[dict[str, list[int]]]:
    """Learnable token sequences (each row counts upward mod vocab) for a Trainer."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(4, vocab, (n,), generator=generator)
    rows = []
    for start in starts.tolist():
        ids = [4 + (start - 4 + i) % (vocab - 4) for i in range(seq_len)]
        rows.append({"input_ids": ids, "labels": list(ids), "attention_mask": [1] * seq_len})
    return rows


def enable_fsdp_on_cpu(trainer: Any) -> None:
    """Turn a Trainer's MULTI_CPU accelerator (torchrun, gloo) into an FSDP one (tests only).

    accelerate honours an FSDP plugin only for GPU-like distributed types, yet its FSDP2 path
    (`fully_shard` + gloo) runs on CPU: setting the state before `accelerator.prepare` lets the
    unmodified Trainer take that path, as it does on GPUs under `accelerate launch`.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from .compat import fsdp_plugin_kwargs

    state = trainer.accelerator.state
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**fsdp_plugin_kwargs(trainer.args))
    if state.mixed_precision != "no":
        state.fsdp_plugin.set_mixed_precision(state.mixed_precision)
    # AcceleratorState() re-reads PartialState's fields, so both must say FSDP
    PartialState().distributed_type = DistributedType.FSDP
    state.distributed_type = DistributedType.FSDP
    trainer.is_fsdp_enabled = True
