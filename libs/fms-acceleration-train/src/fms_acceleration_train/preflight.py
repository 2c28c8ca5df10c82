"""Checks made before anything loads: the model folder, the output folder, a checkpoint to
resume from. Each problem is one TrainJobError naming the file and what to do; nothing of the
user's is overwritten."""

from __future__ import annotations

import json
import struct
import zipfile
from datetime import datetime, timezone
from pathlib import Path

from .errors import TrainJobError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# what a resumed run needs beside the weights; without them it silently trains differently
RESUME_STATE = ("optimizer.pt", "scheduler.pt", "trainer_state.json")


def _json_file(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise TrainJobError(f"{path}: the {what} is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise TrainJobError(
            f"{path}: the {what} is not valid JSON (line {err.lineno}: {err.msg}); the file is "
            "damaged or truncated"
        ) from None
    if not isinstance(data, dict):
        raise TrainJobError(
            f"{path}: the {what} must hold a JSON object, not {type(data).__name__}"
        )
    return data


def check_safetensors(path: Path) -> None:
    """The header parses and the file holds every byte the header promises."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise TrainJobError(f"{path}: truncated ({size} bytes); re-save or re-download it")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise TrainJobError(f"{path}: truncated (the header alone needs {length} bytes)")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise TrainJobError(f"{path}: not a safetensors file (unreadable header)") from None
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    needed = 8 + length + max(ends, default=0)
    if needed > size:
        raise TrainJobError(
            f"{path}: truncated ({size} of {needed} bytes); re-save or re-download it"
        )


def check_torch_file(path: Path) -> None:
    """A torch.save file (a zip archive) whose directory is intact."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError) as err:
        raise TrainJobError(f"{path}: damaged or truncated ({err}); it cannot be loaded") from None


def check_model_dir(path: Path) -> None:
    """A HF model folder transformers can load: a valid config of a known architecture, and
    complete weights."""
    config = _json_file(path / "config.json", "model config (config.json)")
    model_type = config.get("model_type")
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise TrainJobError(
            f"{path / 'config.json'}: model_type {model_type!r} is not an architecture this "
            "transformers version knows; upgrade transformers or pick another model"
        )
    present = [name for name in WEIGHT_FILES if (path / name).is_file()]
    if not present:
        raise TrainJobError(f"--model {path}: no weights ({', '.join(WEIGHT_FILES)}) in the folder")
    if present[0] == "model.safetensors":
        check_safetensors(path / present[0])
    elif present[0] == "model.safetensors.index.json":
        index = _json_file(path / present[0], "weight index")
        for shard in sorted(set(index.get("weight_map", {}).values())):
            if not (path / shard).is_file():
                raise TrainJobError(f"{path / shard}: missing (named by {present[0]})")
            check_safetensors(path / shard)
    else:
        check_torch_file(path / present[0])


RUNS_DIR = Path("outputs/train")  # where runs go when --output-dir is not given
RUN_PREFIX = "run-"


def resolve_output_dir(output_dir: str | None, resume: str | None) -> Path:
    """The folder a run writes to: --output-dir as given, else a new `run-<UTC time>` folder
    under outputs/train (so running the job again never meets an earlier run's results), or
    for `--resume-from-checkpoint last` the newest run there."""
    if output_dir is not None:
        return Path(output_dir)
    runs = sorted(RUNS_DIR.glob(f"{RUN_PREFIX}*")) if RUNS_DIR.is_dir() else []
    if resume == "last":
        if not runs:
            raise TrainJobError(
                f"--resume-from-checkpoint last: no earlier run under {RUNS_DIR}; pass "
                "--output-dir with the run to resume"
            )
        return runs[-1]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    candidate, n = RUNS_DIR / f"{RUN_PREFIX}{stamp}", 1
    while candidate.exists():  # two runs within one second
        n += 1
        candidate = RUNS_DIR / f"{RUN_PREFIX}{stamp}-{n}"
    return candidate


def folder_problem(path: Path) -> str | None:
    """Why no folder can be made at `path` (it, or a folder above it, is a file), or None.

    Checked up front: making the folder fails otherwise deep in the Trainer (NotADirectoryError).
    """
    blocking = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocking is None:
        return None
    if blocking == path:
        return "is a file; give a folder"
    return f"is under {blocking}, which is a file; give a folder"


def check_output_dir(path: Path, overwrite: bool, resuming: bool) -> None:
    """Refuse to write into a file, under a file, or into a folder that already holds results."""
    problem = folder_problem(path)
    if problem is not None:
        raise TrainJobError(f"--output-dir {path}: {problem}")
    if overwrite or resuming or not path.is_dir():
        return
    if any(path.iterdir()):
        raise TrainJobError(
            f"--output-dir {path}: is not empty (results of an earlier run would be "
            "overwritten); pass --overwrite to replace them, resume from its checkpoint, or "
            "choose another folder"
        )


def check_checkpoint(path: Path, allow_partial: bool) -> None:
    """A checkpoint folder a resumed run can continue from exactly; a missing optimizer or
    scheduler state is refused unless `allow_partial`."""
    if not path.is_dir():
        raise TrainJobError(f"checkpoint {path}: not a folder")
    state = (
        _json_file(path / "trainer_state.json", "trainer state")
        if (path / "trainer_state.json").is_file()
        else None
    )
    if state is not None and not isinstance(state.get("global_step"), int):
        raise TrainJobError(f"{path / 'trainer_state.json'}: has no global_step; it is damaged")
    weights = [name for name in (*ADAPTER_FILES, *WEIGHT_FILES) if (path / name).is_file()]
    if not weights:
        raise TrainJobError(f"checkpoint {path}: has no weights; it cannot be resumed")
    if weights[0].endswith(".safetensors"):
        check_safetensors(path / weights[0])
    elif weights[0].endswith(".bin"):
        check_torch_file(path / weights[0])
    for name in ("optimizer.pt", "scheduler.pt"):
        if (path / name).is_file():
            check_torch_file(path / name)
    missing = [name for name in RESUME_STATE if not (path / name).is_file()]
    if missing and not allow_partial:
        raise TrainJobError(
            f"checkpoint {path}: {', '.join(missing)} missing; resuming would restart the "
            "optimizer or schedule and train differently from an uninterrupted run; pass "
            "--allow-partial-resume to resume anyway"
        )
