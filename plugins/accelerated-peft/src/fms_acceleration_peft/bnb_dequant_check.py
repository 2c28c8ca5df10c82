"""Self-check of bitsandbytes' CPU 4-bit dequantization against a plain-torch decode of the codes.

What it guards against (bitsandbytes 0.50.2, x86-64 wheel; read in `csrc/cpu_ops.cpp`,
`dequantizeBlockwise4bitCpu`, and measured on a CPU with AVX512F and AVX512-BF16):

- 4-bit codes are quantized in flat blocks of `blocksize` values over the whole [rows, n] weight,
  so a block may straddle two rows when n is not a multiple of the blocksize.
- The native CPU kernel has an AVX512 branch, taken when the library was built with AVX512F (the
  PyPI wheel is) and the CPU reports `avx512f` at run time (`__builtin_cpu_supports`), n % 16 == 0
  and blocksize >= 16. It reads the scale of element (row, col) as
  `absmax[row * (n // blocksize) + col // blocksize]`, i.e. as if every row began a new block.
  That equals the flat block `(row * n + col) // blocksize` only when n % blocksize == 0 (or the
  weight has one row). Otherwise most values come out wrong: 16,964 of 19,200 at (200, 96), nf4,
  bf16, blocksize 64, for the seeded weights of test_bnb_dequant_check.py (the count depends on
  the data: a zero code is right under any scale); every dtype (fp32, fp16, bf16) and both quant
  types (nf4, fp4) are affected, and (4096, 576) with blocksize 128 (2,103,135 of 2,359,296),
  while (4096, 576) with blocksize 64 has none.
- The dependency is AVX512F, not AVX512-BF16 (which only decides the inference repack, see
  `bnb_cpu_repack`). CPUs without AVX512F run the scalar branch, which indexes flat blocks and is
  right. Widths with n % 16 != 0 take that scalar branch on every CPU, odd widths bitsandbytes'
  pure-torch fallback; both are right. ARM builds carry the n % blocksize == 0 check.
- Training, eval and the fused LoRA path all dequantize through `dequantize_4bit`, so an affected
  model silently trains against corrupted base weights.

The check runs bitsandbytes on a small probe per distinct (shape, blocksize, quant type, dtype)
and compares it with `decode_4bit`. The probe has every code non-zero and neighbouring blocks
scaled 2**0.25 apart, and enough rows for a block-indexing error to show (`probe_rows`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

# The AVX512 branch of bnb's CPU kernel handles 16 values per step.
AVX512_VALUES_PER_STEP = 16
# bnb's CPU wrapper sends blocksizes >= this to its pure-torch fallback (when torch runs AVX512).
TORCH_FALLBACK_BLOCKSIZE = 2048
# Far below the 2**0.25 scale step between neighbouring probe blocks, far above rounding.
PROBE_RTOL = 2**-6
_PROBE_SEED = 1234


@dataclass(frozen=True)
class DequantCase:
    """One distinct way a 4-bit weight is dequantized."""

    shape: tuple[int, int]
    blocksize: int
    quant_type: str
    dtype: torch.dtype


@dataclass(frozen=True)
class DequantMismatch:
    """bitsandbytes' dequantize disagreed with the decoded codes for `module` (and `others`)."""

    module: str
    case: DequantCase
    wrong: int
    probed: int
    others: tuple[str, ...] = ()

    @property
    def misreads_row_blocks(self) -> bool:
        """True when the shape falls in the AVX512 kernel's per-row block indexing bug."""
        return misreads_row_blocks(self.case.shape, self.case.blocksize)

    def describe(self) -> str:
        """One paragraph for the user: which module, what is wrong, why."""
        case = self.case
        rows, n = case.shape
        more = f"; and {len(self.others)} more {n} wide" if self.others else ""
        dtype = str(case.dtype).removeprefix("torch.")
        text = (
            f"bitsandbytes {_bnb_version()} dequantizes the 4-bit weight of {self.module} "
            f"(shape [{rows}, {n}], {case.quant_type}, blocks of {case.blocksize}, {dtype}{more}) "
            f"wrongly on this CPU: {self.wrong} of {self.probed} probe values differ from the "
            "decoded 4-bit codes, so the model would train on corrupted base weights."
        )
        if self.misreads_row_blocks:
            text += (
                f" Its AVX512 CPU kernel (CPUs with AVX512F, widths that are a multiple of 16) "
                f"reads the block scales as if every row started a new block, which is right "
                f"only when the last dimension ({n}) is a multiple of the blocksize "
                f"({case.blocksize})."
            )
        return text


def _bnb_version() -> str:
    import bitsandbytes

    return bitsandbytes.__version__


def cpu_has_avx512f() -> bool:
    """Whether bitsandbytes' native CPU library takes its AVX512 branches on this CPU."""
    from bitsandbytes.cextension import lib

    try:
        return bool(lib.has_avx512f_cpu())
    except (AttributeError, RuntimeError, OSError):  # a build without the symbol: no AVX512
        return False


def misreads_row_blocks(shape: tuple[int, int], blocksize: int) -> bool:
    """Whether bnb 0.50's AVX512 CPU dequantize gets some element of a [rows, n] weight wrong.

    True when the AVX512 branch runs for this width and its per-row block index differs from
    the flat block index somewhere: never for n % blocksize == 0 or a single row.
    """
    rows, n = shape
    if n % AVX512_VALUES_PER_STEP or blocksize < AVX512_VALUES_PER_STEP or n % blocksize == 0:
        return False
    if (
        blocksize >= TORCH_FALLBACK_BLOCKSIZE
        and torch.backends.cpu.get_cpu_capability() == "AVX512"
    ):
        return False
    # Per row, element (r, c) reads block r * (n // blocksize) + c // blocksize; flat, it is in
    # (r * n + c) // blocksize. With n > blocksize they differ in row 1 (at c = blocksize - 1);
    # with n < blocksize every row reads block 0, wrong from the first row that reaches block 1.
    first_wrong_row = 1 if n > blocksize else -(-(blocksize + 1 - n) // n)
    return rows > first_wrong_row


def probe_rows(rows: int, n: int, blocksize: int) -> int:
    """Rows of a probe that starts and ends on a block boundary and shows any row misindexing.

    Row r misreads as soon as r * (n % blocksize) + (blocksize - 1) reaches the next block, so
    2 * blocksize / gcd(n, blocksize) rows (a whole number of blocks) always contain one.
    """
    whole = blocksize // math.gcd(n, blocksize)
    return min(rows, math.lcm(4, 2 * whole))


def decode_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: tuple[int, ...],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Plain-torch dequantize: high nibble first, one fp32 scale per flat block of `blocksize`."""
    data = packed.reshape(-1).view(torch.uint8)
    nibbles = torch.stack((data >> 4, data & 0xF), dim=1).reshape(-1).long()
    numel = math.prod(shape)
    values = code.float()[nibbles[:numel]]
    scales = absmax.float()[torch.arange(numel) // blocksize]
    return (values * scales).reshape(shape).to(dtype)


def _probe(case: DequantCase) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed codes, absmax, 16-entry code table) of a probe weight of `case.shape`."""
    from bitsandbytes.functional import get_4bit_type

    code = get_4bit_type(case.quant_type, device="cpu")
    numel = math.prod(case.shape)
    generator = torch.Generator().manual_seed(_PROBE_SEED)
    nonzero = torch.nonzero(code != 0).flatten()
    nibbles = nonzero[torch.randint(len(nonzero), (numel + numel % 2,), generator=generator)]
    packed = ((nibbles[0::2] << 4) | nibbles[1::2]).to(torch.uint8).unsqueeze(1)
    blocks = -(-numel // case.blocksize)
    absmax = 2.0 ** ((torch.arange(blocks) % 16).float() / 4)
    return packed, absmax, code


def probe_dequantize(case: DequantCase) -> tuple[int, int]:
    """(wrong, probed): how many values of bnb's dequantize of a probe differ from its decode."""
    from bitsandbytes.functional import QuantState, dequantize_4bit

    packed, absmax, code = _probe(case)
    state = QuantState(
        absmax=absmax,
        shape=torch.Size(case.shape),
        code=code,
        blocksize=case.blocksize,
        quant_type=case.quant_type,
        dtype=case.dtype,
    )
    got = dequantize_4bit(packed, state).float()
    want = decode_4bit(packed, absmax, code, case.blocksize, case.shape, case.dtype).float()
    if got.shape != want.shape:
        return want.numel(), want.numel()
    wrong = (got - want).abs() > PROBE_RTOL * want.abs()
    return int(wrong.sum()), want.numel()


def dequant_case(weight: torch.Tensor) -> DequantCase | None:
    """The probe case of a bitsandbytes 4-bit weight on CPU; None for anything else."""
    state = getattr(weight, "quant_state", None)
    if state is None or weight.device.type != "cpu" or len(state.shape) != 2:
        return None
    rows, n = (int(s) for s in state.shape)
    shape = (probe_rows(rows, n, state.blocksize), n)
    return DequantCase(shape, int(state.blocksize), state.quant_type, state.dtype)


def check_4bit_dequantize(modules: Iterable[tuple[str, nn.Module]]) -> list[DequantMismatch]:
    """Probe bnb's dequantize once per distinct case among the 4-bit CPU weights of `modules`.

    `modules` is (name, module) pairs, e.g. `model.named_modules()`; a module counts when its
    own `weight` carries a 4-bit quant state (Linear4bit, Embedding4bit). Returns a mismatch per
    failing case, naming its first module and the others of that case. A probe costs about a
    millisecond; an odd width goes to bnb's torch.compile'd fallback, whose first call compiles.
    """
    names: dict[DequantCase, list[str]] = {}
    shapes: dict[DequantCase, tuple[int, int]] = {}
    for name, module in modules:
        weight = module._parameters.get("weight")  # its own, not a wrapped layer's
        case = dequant_case(weight) if weight is not None else None
        if case is None:
            continue
        names.setdefault(case, []).append(name)
        rows, cols = (int(s) for s in weight.quant_state.shape)  # dequant_case saw it is 2-D
        shapes.setdefault(case, (rows, cols))
    mismatches = []
    for case, found in names.items():
        wrong, probed = probe_dequantize(case)
        if wrong:
            shown = DequantCase(shapes[case], case.blocksize, case.quant_type, case.dtype)
            mismatches.append(DequantMismatch(found[0], shown, wrong, probed, tuple(found[1:])))
    return mismatches
