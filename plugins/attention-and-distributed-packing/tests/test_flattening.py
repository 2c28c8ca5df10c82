"""The flattening collator (transformers' DataCollatorWithFlattening) and its row checks."""

from __future__ import annotations

import pytest
import torch

from fms_acceleration_aadp.flattening import (
    FlatteningCollator,
    PaddingFreeDataError,
    is_packed,
)


def test_rows_become_one_row_with_restarting_positions_and_separated_labels(h):
    rows = h.make_rows([3, 5, 2], prompt=1)
    batch = FlatteningCollator(return_flash_attn_kwargs=True)(rows)
    assert set(batch) == {
        "input_ids", "labels", "position_ids",
        "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
    }  # fmt: skip
    assert batch["input_ids"].tolist() == [[t for r in rows for t in r["input_ids"]]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0, 1]]
    # -100 at each example's first position: no token predicts the next example's first token
    expected = [t for r in rows for t in [-100, *r["labels"][1:]]]
    assert batch["labels"].tolist() == [expected]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 8, 10]
    assert batch["max_length_q"] == 5
    assert "attention_mask" not in batch


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"text": "hello"}], "batch row 0 has no 'input_ids' (got ['text']); the dataset must"),
        (
            [{"input_ids": [5, 6], "labels": [5, 6]}, {"input_ids": [7]}],
            "batch row 1 lacks 'labels' unlike row 0",
        ),
        ([{"input_ids": [5, 6], "labels": [5]}], "batch row 0 has 1 labels for 2 input_ids"),
        ([], "the batch has no rows"),
    ],
)
def test_rows_that_cannot_be_flattened_are_named(rows, message):
    with pytest.raises(PaddingFreeDataError) as info:
        FlatteningCollator()(rows)
    assert str(info.value).startswith("padding-free: " + message)


@pytest.mark.parametrize(
    ("positions", "packed"),
    [
        ([[0, 1, 2, 3]], False),
        ([[0, 1, 0, 1, 2]], True),
        ([[0, 1, 2], [0, 1, 2]], False),
        ([[5]], False),
        ([[3, 4, 5, 0]], True),
    ],
)
def test_is_packed_sees_positions_restarting_inside_a_row(positions, packed):
    assert is_packed(torch.tensor(positions)) is packed


def test_padding_positions_are_not_restarts():
    # generation's left padding: masked positions get position 1, then 0, 1, 2, ...
    positions = torch.tensor([[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert is_packed(positions, mask) is False
    assert is_packed(positions) is True
    # a packed row stays packed under a mask of ones
    assert is_packed(torch.tensor([[0, 1, 0, 1]]), torch.ones(1, 4)) is True
