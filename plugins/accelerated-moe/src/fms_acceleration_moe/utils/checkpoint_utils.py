"""Turn a checkpoint written while the plugin was active back into the original HF layout.

    python -m fms_acceleration_moe.utils.checkpoint_utils <checkpoint> <output dir> <model>

A checkpoint is a DCP folder (`pytorch_model_fsdp_0`, written under FSDP, with expert-parallel
shards as DTensors) or safetensors (one file, an index of shards, or a peft adapter). Expert
weights kept fused are split into the per-expert layout when the installed transformers
(4.55) expects it; peft prefixes and adapter names are normalised. A full model becomes
`model.safetensors` (sharded above 5 GB), LoRA weights `adapter_model.safetensors`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping

import torch
from safetensors.torch import load_file, save_file

from fms_acceleration import compat

from ..errors import CheckpointLayoutError
from ..grouped_experts import DOWN, GATE_UP, original_keys, split_fused

FSDP_MODEL_NAME = "pytorch_model_fsdp"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
ADAPTER_SAFE_WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "config.json"
PEFT_PREFIX = "base_model.model."
MAX_SHARD_BYTES = 5 * 1024**3


def _dcp_folder(checkpoint_dir: str) -> str | None:
    if os.path.basename(os.path.normpath(checkpoint_dir)).startswith(FSDP_MODEL_NAME):
        return checkpoint_dir
    found = sorted(
        d
        for d in os.listdir(checkpoint_dir)
        if d.startswith(FSDP_MODEL_NAME) and os.path.isdir(os.path.join(checkpoint_dir, d))
    )
    if len(found) > 1:
        raise CheckpointLayoutError(
            f"{checkpoint_dir}: found {len(found)} DCP folders ({', '.join(found)}); pass the one "
            "to convert."
        )
    return os.path.join(checkpoint_dir, found[0]) if found else None


def get_state_dict_from_dcp_checkpoint(dcp_checkpoint_dir: str) -> dict[str, torch.Tensor]:
    """The model state dict of a DCP folder, as plain full tensors (no process group)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "state.pt")
        dcp_to_torch_save(dcp_checkpoint_dir, path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    # accelerate and the reference save {"model": state_dict}
    return dict(state["model"]) if isinstance(state.get("model"), Mapping) else dict(state)


def get_state_dict_from_safe_checkpoint(safe_checkpoint_dir: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors checkpoint: sharded (index), single, or an adapter."""
    index = os.path.join(safe_checkpoint_dir, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.exists(index):
        with open(index, encoding="utf-8") as handle:
            files = sorted(set(json.load(handle)["weight_map"].values()))
    else:
        files = [
            f
            for f in (SAFE_WEIGHTS_NAME, ADAPTER_SAFE_WEIGHTS_NAME)
            if os.path.exists(os.path.join(safe_checkpoint_dir, f))
        ][:1]
    if not files:
        raise CheckpointLayoutError(
            f"{safe_checkpoint_dir}: no checkpoint found (neither a {FSDP_MODEL_NAME}* DCP folder "
            f"nor {SAFE_WEIGHTS_INDEX_NAME}, {SAFE_WEIGHTS_NAME} or {ADAPTER_SAFE_WEIGHTS_NAME})"
        )
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(os.path.join(safe_checkpoint_dir, file)))
    return state


def _model_type(checkpoint_dir: str, pretrained: str | None) -> str | None:
    for source in (checkpoint_dir, pretrained):
        if source and os.path.exists(os.path.join(source, CONFIG_NAME)):
            with open(os.path.join(source, CONFIG_NAME), encoding="utf-8") as handle:
                return json.load(handle).get("model_type")
    if pretrained:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(pretrained).model_type
    return None


def _is_lora(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def to_original_layout(
    state_dict: Mapping[str, torch.Tensor], model_type: str | None
) -> dict[str, torch.Tensor]:
    """Keys and tensors as the unpatched model of the installed transformers names them."""
    from ..models.architectures import ARCHITECTURES

    spec = ARCHITECTURES.get(model_type) if model_type else None
    split = spec is not None and not compat.fused_moe_experts()
    lora = any(_is_lora(k) for k in state_dict)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if lora and not _is_lora(key):
            continue  # an adapter holds only its LoRA weights
        key = key.replace(".default.", ".")
        if lora and not key.startswith(PEFT_PREFIX):
            key = PEFT_PREFIX + key
        prefix, _, leaf = key.rpartition(".")
        if split and leaf in (GATE_UP, DOWN) and tensor.dim() == 3:
            keys = original_keys(spec.per_expert_names, tensor.shape[0], prefix + ".")
            out.update(split_fused(leaf, tensor, keys[leaf]))
            continue
        out[key] = tensor
    return out


def save_safetensors(state_dict: Mapping[str, torch.Tensor], output_dir: str, lora: bool) -> None:
    """Write model.safetensors (sharded with an index above 5 GB) or adapter_model.safetensors."""
    tensors = {k: v.detach().contiguous().clone() for k, v in state_dict.items()}
    if lora:
        save_file(tensors, os.path.join(output_dir, ADAPTER_SAFE_WEIGHTS_NAME), {"format": "pt"})
        return
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(tensors, max_shard_size=MAX_SHARD_BYTES)
    for file, names in split.filename_to_tensors.items():
        shard = {n: tensors[n] for n in names}
        save_file(shard, os.path.join(output_dir, file), {"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        with open(os.path.join(output_dir, SAFE_WEIGHTS_INDEX_NAME), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)


def recover_safetensors_from_dcp(
    checkpoint_dir: str, pretrained_model_name_or_path: str | None, output_dir: str
) -> None:
    """Convert `checkpoint_dir` into safetensors of the original layout under `output_dir`."""
    dcp = _dcp_folder(checkpoint_dir)
    state = (
        get_state_dict_from_dcp_checkpoint(dcp)
        if dcp
        else get_state_dict_from_safe_checkpoint(checkpoint_dir)
    )
    os.makedirs(output_dir, exist_ok=True)
    config = os.path.join(checkpoint_dir, CONFIG_NAME)
    if os.path.exists(config) and os.path.abspath(os.path.dirname(config)) != os.path.abspath(
        output_dir
    ):
        shutil.copyfile(config, os.path.join(output_dir, CONFIG_NAME))
    model_type = _model_type(checkpoint_dir, pretrained_model_name_or_path)
    converted = to_original_layout(state, model_type)
    save_safetensors(converted, output_dir, lora=any(_is_lora(k) for k in converted))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint_dir", help="the checkpoint (DCP folder or safetensors)")
    parser.add_argument("output_dir", help="where to write the converted safetensors")
    parser.add_argument(
        "pretrained_model_name_or_path",
        nargs="?",
        default=None,
        help="the model the checkpoint was trained from (for its architecture)",
    )
    args = parser.parse_args(argv)
    recover_safetensors_from_dcp(
        args.checkpoint_dir, args.pretrained_model_name_or_path, args.output_dir
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
