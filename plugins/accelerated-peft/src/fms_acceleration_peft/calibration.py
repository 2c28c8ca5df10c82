"""Calibration text for offline GPTQ quantization, and turning it into token samples."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fms_acceleration.yaml_loading import read_text_file

# Varied plain English (prose, dialogue, code, numbers) so activations cover common token kinds.
BUILTIN_CALIBRATION = (
    "The river rose slowly through the night, and by morning the lower fields were under water. "
    "Farmers moved their animals to the hills and waited for the rain to stop.",
    "To install the package, create a virtual environment, activate it, and run pip install "
    "with the constraints file so that no unexpected versions are pulled in.",
    "def mean(values):\n    total = sum(values)\n    return total / len(values) if values else 0.0",
    "Question: What is the capital of France? Answer: The capital of France is Paris, a city "
    "on the Seine known for its museums, cafes and long history.",
    "In 1969 the first humans walked on the Moon. The mission lasted eight days, and the crew "
    "brought back 21.5 kilograms of lunar rock and soil for study.",
    "She opened the letter, read the first line twice, and then sat down by the window without "
    "saying a word. Outside, the street lamps were coming on one by one.",
    "A matrix multiplication of an m by k matrix with a k by n matrix produces an m by n "
    "matrix; each entry is the dot product of a row and a column.",
    "Customer: My order arrived damaged. Agent: I am sorry to hear that. Could you share the "
    "order number so I can arrange a replacement right away?",
    "Photosynthesis converts light energy into chemical energy. Plants take in carbon dioxide "
    "and water and release oxygen, storing energy in sugars.",
    "SELECT name, COUNT(*) AS orders FROM customers JOIN sales USING (customer_id) GROUP BY "
    "name ORDER BY orders DESC LIMIT 10;",
    "The committee will meet on Thursday at ten to review the budget, discuss the hiring plan, "
    "and agree on the schedule for the next quarter.",
    "Good sleep, regular exercise and a balanced diet help the body recover from stress and "
    "keep the mind clear during long working days.",
    "Translate to German: The weather is nice today. Translation: Das Wetter ist heute schoen.",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i, 'is even')\n    else:\n"
    "        print(i, 'is odd')",
    "Mountains shape the weather around them: moist air is pushed upward, cools, and drops its "
    "rain on one side, leaving the other side dry.",
    "The quarterly report shows revenue up 12 percent, costs flat, and a backlog of orders that "
    "should keep the factory busy until spring.",
)


def read_calibration_file(path: str | Path, error_type: type[Exception] = ValueError) -> list[str]:
    """Samples from a UTF-8 text file: blocks separated by blank lines (a line each if none
    are); a missing or non-UTF-8 file is `error_type` naming the path."""
    text = read_text_file(path, "calibration", error_type)
    blocks = [b.strip() for b in text.split("\n\n") if b.strip()]
    if len(blocks) == 1:
        blocks = [line.strip() for line in text.splitlines() if line.strip()]
    return blocks


def tokenize_calibration(
    texts: Iterable[str], tokenizer: Any, max_length: int, min_length: int = 10
) -> list[dict[str, list[int]]]:
    """Token samples {input_ids, attention_mask}, truncated to `max_length`, short ones dropped."""
    samples = []
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        if len(ids) >= min_length:
            samples.append({"input_ids": list(ids), "attention_mask": [1] * len(ids)})
    return samples
