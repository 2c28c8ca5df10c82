"""The GPTQ algorithm (Frantar et al., 2022) for one linear layer, and the rounding grid it uses.

Given a layer's weight W (out, in) and the Hessian H = 2/n * sum(x x^T) of its inputs over
calibration tokens, columns are quantized one at a time and the rounding error of each is
spread over the columns not yet quantized, weighted by the inverse Hessian (the optimal brain
quantization update), so the layer's outputs on the calibration inputs move as little as
possible. H is damped by a fraction of its mean diagonal; columns are taken in blocks so the
update is a matrix product per block; with desc_act, columns go in order of decreasing H
diagonal (the most active inputs first) and g_idx records each input's group.

Pure torch: nothing here imports the framework, transformers or a GPTQ package.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .gptq_format import GPTQFormatError, check_bits, check_group_size

# GPTQ checkpoints store scales in fp16: codes are chosen against the scale as stored, so the
# error GPTQ compensates is the error the checkpoint really has
SCALE_DTYPE = torch.float16
_SMALLEST_SCALE = 2.0**-24  # the smallest fp16 subnormal: a scale never rounds to 0


@dataclass(frozen=True)
class QuantizedWeight:
    """A quantized weight: codes (in, out), per-group zeros and scales (groups, out), g_idx."""

    codes: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """The (out, in) fp32 weight these codes stand for."""
        groups = self.g_idx.long()
        return (self.scales[groups] * (self.codes - self.zeros[groups]).float()).t()


def grid(
    weight: torch.Tensor, bits: int, sym: bool, min_zero: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of `weight` (rows, cols) so its min..max (always spanning 0) maps
    onto codes 0..2^bits-1, the scale rounded to fp16 as stored. Symmetric grids center on
    2^(bits-1); `min_zero` raises the zero of an asymmetric grid (the "gptq" format cannot
    store a zero of 0; see gptq_format)."""
    maxq = (1 << bits) - 1
    low = weight.min(dim=1).values.clamp(max=0)
    high = weight.max(dim=1).values.clamp(min=0)
    if sym:
        high = torch.maximum(low.abs(), high)
        low = -high
    flat = (low == 0) & (high == 0)
    low, high = torch.where(flat, -1.0, low), torch.where(flat, 1.0, high)
    scale = ((high - low) / maxq).clamp(min=_SMALLEST_SCALE).to(SCALE_DTYPE).float()
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-low / scale).clamp(min_zero, maxq)
    return scale, zero


def round_to_grid(column: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int):
    """(codes, dequantized values) of `column` on the grid (scale, zero)."""
    codes = torch.clamp(torch.round(column / scale) + zero, 0, (1 << bits) - 1)
    return codes, scale * (codes - zero)


def quantize_rtn(
    weight: torch.Tensor, bits: int, group_size: int, sym: bool = True, min_zero: int = 0
) -> QuantizedWeight:
    """Round-to-nearest per group (no calibration): the baseline GPTQ improves on."""
    check_bits(bits)
    out_features, in_features = weight.shape
    size = in_features if check_group_size(group_size) == -1 else group_size
    weight = weight.detach().float()
    codes = torch.empty(in_features, out_features, dtype=torch.int32)
    scales, zeros = [], []
    for start in range(0, in_features, size):
        block = weight[:, start : start + size]
        scale, zero = grid(block, bits, sym, min_zero)
        q, _ = round_to_grid(block, scale[:, None], zero[:, None], bits)
        codes[start : start + size] = q.t().to(torch.int32)
        scales.append(scale)
        zeros.append(zero)
    g_idx = torch.arange(in_features, dtype=torch.int32) // size
    return QuantizedWeight(
        codes, torch.stack(zeros).to(torch.int32), torch.stack(scales), g_idx.to(torch.int32)
    )


def _inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 after damping H by `damp` x its mean diagonal."""
    diagonal = torch.arange(hessian.shape[0], device=hessian.device)
    hessian = hessian.clone()
    hessian[diagonal, diagonal] += damp * torch.mean(torch.diag(hessian))
    lower = torch.linalg.cholesky(hessian)
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def quantize_gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool = True,
    desc_act: bool = False,
    damp: float = 0.01,
    block: int = 128,
    min_zero: int = 0,
) -> QuantizedWeight:
    """GPTQ-quantize `weight` (out, in) given the Hessian (in, in) of its inputs.

    A Hessian that is not positive definite after damping is retried with 10x more damping
    (up to 1.0); beyond that GPTQFormatError says so.
    """
    check_bits(bits)
    check_group_size(group_size)
    if not 0 < damp <= 1:
        raise GPTQFormatError(f"damp_percent={damp} must be in (0, 1]")
    in_features = weight.shape[1]
    if hessian.shape != (in_features, in_features):
        raise GPTQFormatError(
            f"Hessian of shape {list(hessian.shape)} does not match {in_features} inputs"
        )
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0  # inputs never active: their weights cannot matter
    h[dead, dead] = 1
    w[:, dead] = 0
    order = torch.argsort(torch.diag(h), descending=True) if desc_act else None
    if order is not None:
        w, h = w[:, order], h[order][:, order]

    factor = None
    while factor is None:
        try:
            factor = _inverse_hessian_factor(h, damp)
        except torch.linalg.LinAlgError:
            if damp >= 1:
                raise GPTQFormatError(
                    "the calibration Hessian is not positive definite even with damp_percent=1; "
                    "use more (or more varied) calibration text"
                ) from None
            damp = min(1.0, damp * 10)

    size = in_features if group_size == -1 else group_size
    codes = torch.empty_like(w, dtype=torch.int32)
    scale_of, zero_of = [], []
    scale = zero = None
    for start in range(0, in_features, block):
        end = min(start + block, in_features)
        w_block = w[:, start:end].clone()
        errors = torch.zeros_like(w_block)
        f_block = factor[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if column % size == 0:
                # the group's grid from its columns as updated so far (earlier errors included)
                pending = torch.cat((w_block[:, i:], w[:, end:]), dim=1)[:, :size]
                scale, zero = grid(pending, bits, sym, min_zero)
                scale_of.append(scale)
                zero_of.append(zero)
            q, deq = round_to_grid(w_block[:, i], scale, zero, bits)
            codes[:, column] = q.to(torch.int32)
            err = (w_block[:, i] - deq) / f_block[i, i]
            w_block[:, i:] -= err[:, None] * f_block[i, i:][None, :]
            errors[:, i] = err
        w[:, end:] -= errors @ factor[start:end, end:]

    position_group = torch.arange(in_features, dtype=torch.int32) // size
    if order is not None:
        inverse = torch.argsort(order)
        codes = codes[:, inverse]
        g_idx = position_group[inverse]
    else:
        g_idx = position_group
    return QuantizedWeight(
        codes.t().contiguous(),
        torch.stack(zero_of).to(torch.int32),
        torch.stack(scale_of),
        g_idx.to(torch.int32),
    )
