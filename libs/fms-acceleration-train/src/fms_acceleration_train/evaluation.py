"""Answer accuracy: greedy generation on held-out prompts, compared with the expected answer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .data import Example, pad_token_id, prompt_ids


@dataclass(frozen=True)
class Accuracy:
    """Exact-match accuracy over held-out examples, with a few answers kept for the summary."""

    correct: int
    total: int
    samples: tuple[tuple[str, str, str], ...]  # (prompt, expected, generated)

    @property
    def value(self) -> float:
        """Fraction of answers that matched."""
        return self.correct / self.total if self.total else 0.0


def normalize(answer: str) -> str:
    """First line, lower-cased, without surrounding spaces, quotes and final punctuation."""
    lines = answer.strip().splitlines()
    return lines[0].strip().strip("\"'").rstrip(".!").strip().lower() if lines else ""


def generate_answers(
    model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int = 8, batch_size: int = 16
) -> list[str]:
    """Greedy answers to `prompts`, batched with left padding."""
    import torch

    pad_id = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    answers = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            rows = [prompt_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
            width = max(len(r) for r in rows)
            ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
            mask = torch.tensor(
                [[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device
            )
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            answers += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return answers


def answer_accuracy(
    model: Any, tokenizer: Any, examples: list[Example], max_new_tokens: int = 8, keep: int = 3
) -> Accuracy:
    """Exact-match accuracy of greedy answers on `examples` (after `normalize`)."""
    answers = generate_answers(model, tokenizer, [ex.prompt for ex in examples], max_new_tokens)
    correct = sum(normalize(a) == normalize(ex.response) for a, ex in zip(answers, examples))
    samples = tuple(
        (ex.prompt, ex.response, a.strip()) for ex, a in list(zip(examples, answers))[:keep]
    )
    return Accuracy(correct=correct, total=len(examples), samples=samples)
