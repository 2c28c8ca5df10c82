"""Expert parallelism against ep_degree 1 (torchrun, gloo, CPU).

`python -m torch.distributed.run --nproc_per_node W ep_worker.py OUT EP [EP ...]` trains a
tiny Mixtral (4 experts, top-2) for one step per configuration, each process on its own rows
of one batch, under FSDP2 (each decoder layer, then the root, expert shards set aside) and
under accelerate's DDP; first with ep_degree 1, then with every EP given. It writes
OUT/rank<N>.json: per wrapper and ep_degree, the loss averaged over the processes, every
gradient gathered whole (by parameter name), and the grad norm the accelerator reports when
it clips, with the gradients after clipping.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch.distributed.fsdp import fully_shard

from fms_acceleration.testing import build_framework
from fms_acceleration_moe import ScatterMoEAccelerationPlugin
from fms_acceleration_moe.expert_parallel import expert_shards_set_aside
from fms_acceleration_moe.grouped_experts import full_tensor

sys.path.insert(0, os.path.dirname(__file__))
from conftest import tiny_moe

MAX_NORM = 0.05


def my_rows(rank: int, world: int, vocab: int) -> torch.Tensor:
    """This process's 2 rows of a (2 W) x 13 batch."""
    ids = torch.randint(4, vocab, (2 * world, 13), generator=torch.Generator().manual_seed(3))
    return ids[2 * rank : 2 * rank + 2]


def step(model0, ep: int, wrapper: str, accelerator: Accelerator) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    framework = build_framework(
        {"plugins": {"training": {"moe": {"scattermoe": {"ep_degree": ep}}}}},
        [ScatterMoEAccelerationPlugin],
    )
    model, _ = framework.augmentation(copy.deepcopy(model0), None, (None,))
    model.train()
    framework.get_callbacks_and_ready_for_train(model, accelerator)
    if wrapper == "fsdp2":
        with expert_shards_set_aside(model):
            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
        runs = model
    else:
        runs = accelerator.prepare_model(model)  # DDP; the plugin sets the shards aside
    ids = my_rows(rank, world, model.config.vocab_size)
    loss = runs(input_ids=ids, labels=ids).loss
    loss.backward()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    grads = {n: full_tensor(p.grad).tolist() for n, p in model.named_parameters()}
    norm = accelerator.clip_grad_norm_(list(model.parameters()), MAX_NORM)
    clipped = {n: full_tensor(p.grad).tolist() for n, p in model.named_parameters()}
    rules = sorted(framework.model_patcher.counts())
    framework.undo_patches()  # every process gathers its experts back
    original = model0.state_dict()
    experts = {k: full_tensor(v) for k, v in model.state_dict().items() if ".experts." in k}
    experts_back = bool(experts) and all(torch.equal(v, original[k]) for k, v in experts.items())
    return {
        "loss": float(mean) / world,
        "grads": grads,
        "norm": float(full_tensor(norm)),
        "clipped": clipped,
        "rules": rules,
        "experts_back": experts_back,
    }


def main(out: Path, eps: list[int]) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    model0 = tiny_moe("mixtral", seed=2).train()
    results = {}
    for wrapper in ("fsdp2", "ddp"):
        for ep in [1, *eps]:
            results[f"{wrapper}-ep{ep}"] = step(model0, ep, wrapper, accelerator)
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), [int(e) for e in sys.argv[2:]])
