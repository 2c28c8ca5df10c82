"""The GPTQ weight format that auto_gptq, gptqmodel and transformers/optimum read and write.

A linear layer y = x @ W + b with W of shape (in_features, out_features) is stored as

- `qweight` int32 (in_features * bits / 32, out_features): `32 / bits` codes of consecutive
  input rows per word, row j of a word in bits [j * bits, (j + 1) * bits);
- `qzeros` int32 (groups, out_features * bits / 32): one zero point per group and output
  column, packed the same way along the columns;
- `scales` float (groups, out_features);
- `g_idx` int32 (in_features,): the group of each input row (row // group_size, or a
  permutation of it when the checkpoint was quantized with desc_act);

and W[k, n] = scales[g, n] * (code[k, n] - zero[g, n]) with g = g_idx[k]. The original format
("gptq", auto_gptq's v1) stores zero - 1 and readers add 1 back; "gptq_v2" stores the zero
itself. Only widths whose codes fit whole in a word are read here: 2, 4 and 8 bits.

Pure torch: nothing here imports the framework, transformers or a GPTQ package.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PACKED_BITS = (2, 4, 8)
# checkpoint_format -> what to add to a stored zero point
ZERO_OFFSETS = {"gptq": 1, "gptq_v2": 0}
QUANTIZED_TENSORS = ("qweight", "qzeros", "scales", "g_idx")
_WORD = 32


class GPTQFormatError(ValueError):
    """GPTQ tensors or settings that cannot be read; the message names the tensor or key."""


def check_bits(bits: object, key: str = "bits") -> int:
    """`bits` if it is a width the packed format holds whole per word, else GPTQFormatError."""
    if isinstance(bits, bool) or bits not in PACKED_BITS:
        raise GPTQFormatError(
            f"{key}={bits!r} is not supported; use one of {', '.join(map(str, PACKED_BITS))} "
            "(3-bit codes straddle int32 words, which our kernels do not read)"
        )
    return int(bits)


def check_group_size(group_size: object, key: str = "group_size") -> int:
    """`group_size` if it is -1 (one group per row) or a positive integer, else an error."""
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise GPTQFormatError(f"{key}={group_size!r} is not an integer (-1 or a positive size)")
    if group_size == 0 or group_size < -1:
        raise GPTQFormatError(f"{key}={group_size} must be -1 (one group) or a positive size")
    return group_size


@dataclass(frozen=True)
class GPTQLayout:
    """Shapes and decoding constants of one GPTQ linear layer."""

    in_features: int
    out_features: int
    bits: int
    group_size: int
    zero_offset: int = 1

    def __post_init__(self) -> None:
        check_bits(self.bits)
        check_group_size(self.group_size)
        for name in ("in_features", "out_features"):
            size = getattr(self, name)
            if size <= 0 or size % self.pack != 0:
                raise GPTQFormatError(
                    f"{name}={size} must be a positive multiple of {self.pack} "
                    f"({self.pack} {self.bits}-bit codes per int32 word)"
                )

    @property
    def pack(self) -> int:
        """Codes per int32 word."""
        return _WORD // self.bits

    @property
    def maxq(self) -> int:
        """The largest code."""
        return (1 << self.bits) - 1

    @property
    def groups(self) -> int:
        """Rows of `scales` and `qzeros`."""
        if self.group_size == -1:
            return 1
        return math.ceil(self.in_features / self.group_size)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape each quantized tensor must have."""
        return {
            "qweight": (self.in_features // self.pack, self.out_features),
            "qzeros": (self.groups, self.out_features // self.pack),
            "scales": (self.groups, self.out_features),
            "g_idx": (self.in_features,),
        }

    def default_g_idx(self) -> torch.Tensor:
        """g_idx of a checkpoint quantized in column order (no desc_act)."""
        rows = torch.arange(self.in_features, dtype=torch.int32)
        return torch.zeros_like(rows) if self.group_size == -1 else rows // self.group_size

    def check(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """GPTQFormatError naming `where`.<tensor> when a tensor has the wrong shape or dtype."""
        for name, shape in self.shapes().items():
            tensor = tensors.get(name)
            if tensor is None:
                raise GPTQFormatError(f"{where}.{name}: missing")
            if tuple(tensor.shape) != shape:
                raise GPTQFormatError(
                    f"{where}.{name}: shape {list(tensor.shape)} does not fit a {self.bits}-bit "
                    f"layer of {self.in_features} -> {self.out_features} with group_size "
                    f"{self.group_size}; expected {list(shape)}"
                )
            integer = name != "scales"
            if integer != (not tensor.dtype.is_floating_point) or (
                integer and tensor.dtype not in (torch.int32, torch.int64)
            ):
                kind = "int32" if integer else "a floating dtype"
                raise GPTQFormatError(f"{where}.{name}: dtype {tensor.dtype}, expected {kind}")
        g_idx = tensors["g_idx"]
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= self.groups):
            raise GPTQFormatError(
                f"{where}.g_idx: group indices span [{int(g_idx.min())}, {int(g_idx.max())}], "
                f"outside the {self.groups} groups of scales"
            )


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) reinterpreted as the int32 with the same bits."""
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, cols) integer codes -> (rows * bits / 32, cols) int32 words (the qweight layout)."""
    pack = _WORD // check_bits(bits)
    rows, cols = codes.shape
    if rows % pack:
        raise GPTQFormatError(f"{rows} rows cannot be packed {pack} to a word")
    grouped = codes.to(torch.int64).reshape(rows // pack, pack, cols)
    shifts = (torch.arange(pack, device=codes.device) * bits).view(1, pack, 1)
    return _as_int32((grouped << shifts).sum(dim=1))


def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_rows: (rows * bits / 32, cols) int32 -> (rows, cols) int32 codes."""
    pack = _WORD // check_bits(bits)
    shifts = (torch.arange(pack, device=words.device, dtype=torch.int32) * bits).view(1, pack, 1)
    codes = (words.to(torch.int32).unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1, words.shape[-1])


def pack_columns(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, cols) integer codes -> (rows, cols * bits / 32) int32 words (the qzeros layout)."""
    return pack_rows(codes.t(), bits).t().contiguous()


def unpack_columns(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_columns."""
    return unpack_rows(words.t(), bits).t().contiguous()


def dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    zero_offset: int = 1,
) -> torch.Tensor:
    """W (in_features, out_features) in fp32 from GPTQ tensors: the plain-torch reference."""
    codes = unpack_rows(qweight, bits).float()
    zeros = unpack_columns(qzeros, bits).float() + zero_offset
    groups = g_idx.long()
    return scales.float()[groups] * (codes - zeros[groups])
