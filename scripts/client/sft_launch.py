"""`python -m tuning.sft_trainer ARGS`, with torch's random generator seeded from `--seed` first.

fms-hf-tuning 3.2.2 seeds only after building its trainer, and trl's SFTTrainer draws the LoRA
weights before that, from a generator torch seeds at random in every process: two runs of one
command start from different LoRA weights (their first-step gradient norms differ by 10-20%).
Seeding before the entry point runs makes a row and its reference start from the same weights.
"""

from __future__ import annotations

import itertools
import runpy
import sys

import torch

ENTRY_POINT = "tuning.sft_trainer"


def seed_flag(argv: list[str]) -> int:
    """The value of `--seed` in the client's arguments (its own default, 42, when absent)."""
    for flag, value in itertools.pairwise(argv):
        if flag == "--seed":
            return int(value)
    return 42


if __name__ == "__main__":
    torch.manual_seed(seed_flag(sys.argv[1:]))
    sys.argv[0] = ENTRY_POINT
    runpy.run_module(ENTRY_POINT, run_name="__main__", alter_sys=True)
