"""Reading and describing GPTQ checkpoint directories: settings and weight files.

A GPTQ checkpoint keeps its settings in `quantize_config.json` (auto_gptq, gptqmodel) and/or in
the `quantization_config` of `config.json` (gptqmodel, transformers/optimum), and its tensors in
safetensors files (`model.safetensors`, shards listed by `model.safetensors.index.json`, or
auto_gptq's `<model_basename>.safetensors`) or, for old checkpoints, in `*.bin` files.

Every problem is a GPTQCheckpointError naming the file and, where there is one, the key.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .gptq_format import ZERO_OFFSETS, GPTQFormatError, check_bits, check_group_size

QUANTIZE_CONFIG = "quantize_config.json"
MODEL_CONFIG = "config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"


class GPTQCheckpointError(GPTQFormatError):
    """A GPTQ checkpoint that cannot be read; the message names the file (and key)."""


@dataclass(frozen=True)
class GPTQSettings:
    """The settings of a GPTQ checkpoint that decide how its tensors decode."""

    bits: int
    group_size: int
    desc_act: bool = False
    sym: bool = True
    checkpoint_format: str = "gptq"
    lm_head: bool = False

    @property
    def zero_offset(self) -> int:
        """What to add to a stored zero point."""
        return ZERO_OFFSETS[self.checkpoint_format]

    def as_config(self, **extra: Any) -> dict[str, Any]:
        """The quantize_config.json / quantization_config contents these settings write."""
        return {
            **asdict(self),
            "quant_method": "gptq",
            "format": self.checkpoint_format,
            "pack_dtype": "int32",
            **extra,
        }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise GPTQCheckpointError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise GPTQCheckpointError(
            f"{path}: not valid JSON (line {err.lineno}: {err.msg})"
        ) from None
    if not isinstance(data, dict):
        raise GPTQCheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _settings_from(data: dict[str, Any], where: str) -> GPTQSettings:
    method = data.get("quant_method", "gptq")
    if method != "gptq":
        raise GPTQCheckpointError(f"{where}: quant_method={method!r} is not a GPTQ checkpoint")
    if "bits" not in data or "group_size" not in data:
        raise GPTQCheckpointError(f"{where}: needs the keys 'bits' and 'group_size'")
    checkpoint_format = data.get("checkpoint_format", data.get("format", "gptq"))
    if checkpoint_format not in ZERO_OFFSETS:
        raise GPTQCheckpointError(
            f"{where}: checkpoint_format={checkpoint_format!r} is not readable here; use one of "
            f"{', '.join(ZERO_OFFSETS)} (other layouts belong to their own kernels)"
        )
    flags = {}
    for key, default in (("desc_act", False), ("sym", True), ("lm_head", False)):
        value = data.get(key, default)
        if value is None:
            value = default
        if not isinstance(value, bool):
            raise GPTQCheckpointError(f"{where}: {key}={value!r} is not true or false")
        flags[key] = value
    try:
        bits = check_bits(data["bits"])
        group_size = check_group_size(data["group_size"])
    except GPTQFormatError as err:
        raise GPTQCheckpointError(f"{where}: {err}") from None
    return GPTQSettings(bits, group_size, checkpoint_format=checkpoint_format, **flags)


def read_settings(directory: str | Path) -> GPTQSettings:
    """The GPTQ settings of a checkpoint directory (quantize_config.json wins over config.json)."""
    directory = Path(directory)
    quantize_config = directory / QUANTIZE_CONFIG
    if quantize_config.is_file():
        return _settings_from(_read_json(quantize_config), str(quantize_config))
    model_config = directory / MODEL_CONFIG
    if not model_config.is_file():
        raise GPTQCheckpointError(
            f"{directory}: not a checkpoint directory (no {QUANTIZE_CONFIG} or {MODEL_CONFIG})"
        )
    section = _read_json(model_config).get("quantization_config")
    if not isinstance(section, dict):
        raise GPTQCheckpointError(
            f"{model_config}: no quantization_config, and no {QUANTIZE_CONFIG} beside it: "
            "not a GPTQ checkpoint (make one with fms-acceleration-peft-quantize)"
        )
    return _settings_from(section, f"{model_config}: quantization_config")


def weight_files(directory: str | Path) -> list[Path]:
    """The files holding a checkpoint's tensors, in the order to read them."""
    directory = Path(directory)
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        mapping = _read_json(index).get("weight_map")
        if not isinstance(mapping, dict) or not mapping:
            raise GPTQCheckpointError(f"{index}: no weight_map")
        files = [directory / name for name in sorted(set(mapping.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise GPTQCheckpointError(f"{index}: lists missing files {', '.join(missing)}")
        return files
    for pattern in ("model.safetensors", "*.safetensors", "pytorch_model.bin", "*.bin"):
        found = sorted(p for p in directory.glob(pattern) if p.is_file())
        if found:
            return found
    raise GPTQCheckpointError(f"{directory}: no weight files (*.safetensors or *.bin)")


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise GPTQCheckpointError(
                f"{path}: cannot be read as safetensors ({str(err).splitlines()[0]})"
            ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds (pickle, zip, EOF) for a broken file
        raise GPTQCheckpointError(
            f"{path}: cannot be read as a torch state dict ({type(err).__name__})"
        ) from None
    if not isinstance(state, dict):
        raise GPTQCheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return state


def read_tensors(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """Every tensor of the checkpoint on CPU, and the file each came from."""
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for path in weight_files(directory):
        for key, tensor in _read_file(path).items():
            tensors[key] = tensor
            origin[key] = path
    return tensors, origin


def quantized_prefixes(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Module names whose GPTQ tensors the checkpoint holds (those with a `.qweight`)."""
    return sorted(key.removesuffix(".qweight") for key in tensors if key.endswith(".qweight"))
