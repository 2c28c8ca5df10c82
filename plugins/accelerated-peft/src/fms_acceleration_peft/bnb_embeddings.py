"""4-bit input embeddings and lm_head for a 4-bit bitsandbytes model (opt-in, frozen).

BitsAndBytesConfig quantizes only the linear layers of the blocks. In a small model the
embedding dominates what is left (SmolLM2-135M: a 49152 x 576 table, 54 MiB in bf16, also used
as lm_head). This replaces the input embedding with a `bnb.nn.Embedding4bit` and the lm_head
with a `bnb.nn.Linear4bit`; when the two are tied, both modules hold the very same `Params4bit`
(the embedding's [vocab, hidden] layout is lm_head's [out, in]), so the tie survives and the
table is stored once. Everything stays frozen: 4-bit weights have no gradient.

Import this module only when embeddings are to be quantized: it imports bitsandbytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import bitsandbytes as bnb
import torch
from bitsandbytes.nn import Embedding4bit, Linear4bit, Params4bit
from torch import nn

# Embedding4bit's own default; with hidden % 64 == 0 it dequantizes only the looked-up rows.
EMBEDDING_BLOCKSIZE = 64


class SaveableEmbedding4bit(Embedding4bit):
    """An Embedding4bit whose state dict holds its packed weight and quant state (as Linear4bit).

    bitsandbytes' Embedding4bit refuses `state_dict()`, which peft calls to save an adapter.
    """

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)
        for key, value in self.weight.quant_state.as_dict(packed=True).items():
            destination[prefix + "weight." + key] = value if keep_vars else value.detach()


@dataclass(frozen=True)
class QuantizedEmbeddings:
    """The modules `quantize_embeddings` put in place, and whether they share one weight."""

    embedding: Embedding4bit
    lm_head: Linear4bit | None
    tied: bool


# Rows quantized per call: bounds the float temporaries of quantize_4bit (a 128k x 4096 table
# would otherwise need several GiB of fp32 scratch at once). A multiple of 64 keeps every chunk
# made of whole 64-blocks, so the chunks' codes and absmax concatenate into the full-table ones.
QUANTIZE_ROWS_PER_CHUNK = 4096


def quantize_table(
    weight: torch.Tensor,
    quant_type: str,
    quant_storage: torch.dtype,
    rows_per_chunk: int = QUANTIZE_ROWS_PER_CHUNK,
) -> Params4bit:
    """A frozen Params4bit of `weight` ([rows, cols]) with one float absmax per 64-block.

    No double quantization: Embedding4bit looks absmax rows up by token id, which needs them plain.
    """
    if rows_per_chunk <= 0 or rows_per_chunk % EMBEDDING_BLOCKSIZE:
        raise ValueError(f"rows_per_chunk={rows_per_chunk} must be a positive multiple of 64")
    weight = weight.detach()
    chunks, absmax, state = [], [], None
    for start in range(0, weight.shape[0], rows_per_chunk):
        data, state = bnb.functional.quantize_4bit(
            weight[start : start + rows_per_chunk].contiguous(),
            blocksize=EMBEDDING_BLOCKSIZE,
            compress_statistics=False,
            quant_type=quant_type,
            quant_storage=quant_storage,
        )
        chunks.append(data)
        absmax.append(state.absmax)
    if state is None:  # the loop above quantized no chunk
        raise ValueError(f"weight of shape {list(weight.shape)} has no rows to quantize")
    state.absmax = torch.cat(absmax)
    state.shape = weight.shape
    return Params4bit(
        torch.cat(chunks),
        requires_grad=False,
        quant_state=state,
        blocksize=EMBEDDING_BLOCKSIZE,
        compress_statistics=False,
        quant_type=quant_type,
        quant_storage=quant_storage,
        bnb_quantized=True,
    )


def embedding_4bit(source: nn.Embedding, weight: Params4bit, compute_dtype: torch.dtype):
    """A frozen Embedding4bit shaped like `source` that holds `weight`."""
    # meta: the float table Embedding4bit would allocate is replaced right away.
    module = SaveableEmbedding4bit(
        source.num_embeddings,
        source.embedding_dim,
        dtype=compute_dtype,
        quant_type=weight.quant_type,
        quant_storage=weight.quant_storage,
        device="meta",
    )
    module.padding_idx = source.padding_idx
    module.weight = weight
    return module


def linear_4bit(source: nn.Linear, weight: Params4bit, compute_dtype: torch.dtype) -> Linear4bit:
    """A frozen Linear4bit shaped like `source` that holds `weight` (maybe shared)."""
    module = Linear4bit(
        source.in_features,
        source.out_features,
        bias=source.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=False,
        quant_type=weight.quant_type,
        quant_storage=weight.quant_storage,
        device="meta",
    )
    module.weight = weight
    module.quant_state = weight.quant_state
    if source.bias is not None:
        module.bias = nn.Parameter(source.bias.detach(), requires_grad=False)
    return module


def quantize_embeddings(
    model: nn.Module, quant_type: str, compute_dtype: torch.dtype, quant_storage: torch.dtype
) -> QuantizedEmbeddings:
    """Replace the input embedding and lm_head with frozen 4-bit ones; a tie stays one weight."""
    source = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if type(source) is not nn.Embedding:
        raise ValueError(f"the input embedding is a {type(source).__name__}, not nn.Embedding")
    if head is not None and type(head) is not nn.Linear:
        raise ValueError(
            f"the output embedding (lm_head) is a {type(head).__name__}, not nn.Linear"
        )
    tied = head is not None and head.weight is source.weight
    with torch.no_grad():
        weight = quantize_table(source.weight, quant_type, quant_storage)
        embedding = embedding_4bit(source, weight, compute_dtype)
        new_head = None
        if head is not None:
            head_weight = weight if tied else quantize_table(head.weight, quant_type, quant_storage)
            new_head = linear_4bit(head, head_weight, compute_dtype)
    model.set_input_embeddings(embedding)
    if new_head is not None:
        model.set_output_embeddings(new_head)
    return QuantizedEmbeddings(embedding=embedding, lm_head=new_head, tied=tied)
