"""torchrun worker (not a test module): FSDP2 over gloo shards 4-bit LoRA base weights.

    torchrun --nproc_per_node 2 fsdp_worker.py {bitsandbytes|auto_gptq} MODEL_DIR OUT_JSON

Loads and augments through the framework, records each quantized tensor's full and local
(shard) size, checks the sharded step-0 loss against the unsharded model, trains 3 steps and
writes what it saw to OUT_JSON.rank<N>.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from peft import LoraConfig
from torch.distributed.fsdp import fully_shard

from fms_acceleration.testing import build_framework
from fms_acceleration_peft import AutoGPTQAccelerationPlugin, BNBAccelerationPlugin


def main() -> None:
    plugin_id, model_dir, out = sys.argv[1:4]
    os.environ["ACCELERATE_USE_FSDP"] = "true"
    torch._dynamo.config.disable = True  # gptqmodel's inductor compile is slow on shared CPUs
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    stanza = {plugin_id: {}}
    framework = build_framework(
        {"plugins": {"peft": {"quantization": stanza}}},
        [BNBAccelerationPlugin, AutoGPTQAccelerationPlugin],
    )
    torch.manual_seed(0)
    model = framework.model_loader(model_dir, dtype=torch.bfloat16)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    model, _ = framework.augmentation(model, None, (lora,))
    quantized = [n for n, p in model.named_parameters() if not p.requires_grad and ".layers." in n]
    full = {n: p.numel() for n, p in model.named_parameters()}
    ids = torch.randint(4, 128, (4, 16), generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        unsharded_loss = model(input_ids=ids, labels=ids).loss.item()

    for layer in model.get_base_model().model.layers:
        fully_shard(layer)
    fully_shard(model)
    local = {n: p.to_local().numel() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    result = {
        "world_size": dist.get_world_size(),
        "quantized": {n: [full[n], local[n]] for n in quantized},
        "unsharded_loss": unsharded_loss,
        "losses": losses,
    }
    with open(f"{out}.rank{rank}", "w", encoding="utf-8") as handle:
        json.dump(result, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
