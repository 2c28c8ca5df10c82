"""Fused linear cross-entropy under FSDP2 (torchrun, 2 processes, gloo, CPU).

`python -m torch.distributed.run --nproc_per_node 2 fsdp_worker.py OUT` shards a tiny Llama
(each decoder layer, then the root) twice, once with transformers' loss and once with
`fast_loss: fused_ce_liger`, runs one forward and backward per rank on its half of a batch
whose prompts are labelled -100, and writes OUT/rank<N>.json: both losses (averaged over the
ranks), the largest difference of every gathered gradient and the patch rules applied.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

from fms_acceleration import AccelerationFramework
from fms_acceleration.testing import tiny_model_config

FUSED_CE_ONLY = {
    "fast_loss": "fused_ce_liger",
    "fast_rms_layernorm": False,
    "fast_rope_embeddings": False,
    "fast_swiglu": False,
}


def half_batch(rank: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's 3 rows of a 6 x 37 batch; the first 21 labels of each row are a prompt."""
    generator = torch.Generator().manual_seed(11)
    ids = torch.randint(0, vocab, (6, 37), generator=generator)
    labels = ids.clone()
    labels[:, :21] = -100
    rows = slice(3 * rank, 3 * rank + 3)
    return ids[rows], labels[rows]


def sharded_step(fused: bool, rank: int) -> tuple[float, dict[str, torch.Tensor], list[str]]:
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(tiny_model_config("llama", tie_word_embeddings=False))
    model.train()
    rules = []
    if fused:
        framework = AccelerationFramework(
            {"plugins": {"training": {"fused_ops_and_kernels": FUSED_CE_ONLY}}}
        )
        model, _ = framework.augmentation(model, None, ())
        rules = sorted({record.rule_id for record in framework.model_patcher.history})
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    ids, labels = half_batch(rank, model.config.vocab_size)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    return float(mean) / dist.get_world_size(), grads, rules


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    plain_loss, plain, _ = sharded_step(False, rank)
    fused_loss, fused, rules = sharded_step(True, rank)
    result = {
        "rank": rank,
        "fused_rules": rules,
        "plain_loss": plain_loss,
        "fused_loss": fused_loss,
        "grad_names": sorted(plain),
        "max_grad": max(float(g.abs().max()) for g in plain.values()),
        "max_grad_diff": {n: float((fused[n] - plain[n]).abs().max()) for n in sorted(plain)},
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
