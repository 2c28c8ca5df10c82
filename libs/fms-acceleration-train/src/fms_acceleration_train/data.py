"""Prompt/response examples: reading JSONL, tokenizing with loss on the response only, padding."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fms_acceleration.yaml_loading import read_text_file

from .errors import TrainJobError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """One instruction: the prompt the model sees and the response it must learn to give."""

    prompt: str
    response: str


def load_jsonl(path: str | Path) -> list[Example]:
    """Read a JSONL file of {"prompt": str, "response": str} objects, one per line."""
    path = Path(path)
    if not path.exists():
        raise TrainJobError(f"dataset file not found: {path}")
    examples = []
    text = read_text_file(path, "dataset", TrainJobError)
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrainJobError(f"{path} line {number}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise TrainJobError(
                f"{path} line {number}: expected an object with 'prompt' and 'response', "
                f"got {type(record).__name__}"
            )
        for key in ("prompt", "response"):
            if not isinstance(record.get(key), str) or not record[key]:
                raise TrainJobError(
                    f"{path} line {number}: '{key}' must be a non-empty string, "
                    f"got {record.get(key)!r}"
                )
        examples.append(Example(record["prompt"], record["response"]))
    if not examples:
        raise TrainJobError(f"{path}: no examples (the file has no non-blank lines)")
    return examples


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids the model is given before it answers (chat template if the tokenizer has one)."""
    if getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
        return list(ids)
    return list(tokenizer(prompt + "\n", add_special_tokens=True)["input_ids"])


def response_ids(tokenizer: Any, response: str) -> list[int]:
    """Token ids of the answer, ended by the end-of-sequence token so the model learns to stop."""
    ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def tokenize(examples: list[Example], tokenizer: Any, seq_len: int) -> list[dict[str, list[int]]]:
    """Tokenize examples to at most `seq_len` tokens; labels are IGNORE_INDEX on the prompt."""
    if seq_len < 2:
        raise TrainJobError(f"seq_len must be at least 2, got {seq_len}")
    rows = []
    for ex in examples:
        p, r = prompt_ids(tokenizer, ex.prompt), response_ids(tokenizer, ex.response)
        r = r[: seq_len - 1]
        # Keep the whole answer; cut the prompt from the left (its end is the chat-template
        # cue the answer follows).
        p = p[len(p) - (seq_len - len(r)) :] if len(p) + len(r) > seq_len else p
        rows.append(
            {
                "input_ids": p + r,
                "labels": [IGNORE_INDEX] * len(p) + r,
                "attention_mask": [1] * (len(p) + len(r)),
            }
        )
    return rows


def pad_token_id(tokenizer: Any) -> int:
    """The id used for padding: the tokenizer's pad token, else its eos token, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


class PaddingCollator:
    """Right-pads a batch of tokenized rows to its longest row."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        fill = {"input_ids": self.pad_id, "labels": IGNORE_INDEX, "attention_mask": 0}
        return {
            key: torch.tensor([list(r[key]) + [v] * (width - len(r[key])) for r in rows])
            for key, v in fill.items()
        }
