"""Triton GPTQ matmuls: y = x @ W and dx = dy @ W^T with W dequantized tile by tile in registers.

The packed weight is read once per output tile and never written back as floats: each program
unpacks a (BLOCK_K, BLOCK_N) slice of codes, looks up the scale and zero point of every row's
group through g_idx (so desc_act checkpoints work unchanged), and feeds the tile to tl.dot.
The backward pass to the input (all LoRA training needs; the base weight is frozen) reads the
same tiles transposed.

Half-precision inputs go to tl.dot as they are, with an fp32 accumulator; fp32 inputs (and every
input under TRITON_INTERPRET, whose bf16 arithmetic is wrong) are multiplied in IEEE fp32.
Nothing here imports the framework or transformers.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

NUM_STAGES = 2
BLOCK_N = 64
BLOCK_K = 32
GROUP_M = 8  # programs sharing a weight column block run together (L2 reuse of its tiles)


def triton_interpret() -> bool:
    """True when Triton kernels run on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def launch(kernel: Any, grid: tuple[int, ...], device: torch.device, *args: Any, **meta: Any):
    """Launch `kernel` with the tensors' CUDA device current (Triton uses the current stream)."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            return kernel[grid](*args, **meta)
    return kernel[grid](*args, **meta)


def tile(rows: int, dtype: torch.dtype) -> tuple[int, int]:
    """(rows per program, warps): small tiles for decode-sized inputs, 64 rows for training
    batches; IEEE fp32 products keep their operands in registers (no tensor cores), so fp32
    takes at most 32 rows on 8 warps (64 rows on 4 warps spills on sm_80 and sm_90)."""
    rows = 16 if rows <= 16 else 32 if rows <= 32 else 64
    if dtype == torch.float32:
        return min(rows, 32), 8
    return rows, 4


@triton.jit
def _weight_tile(
    QW,
    QZ,
    SC,
    GI,
    offs_k,
    offs_n,
    K,
    N,
    stride_qw,
    stride_qz,
    stride_sc,
    BITS: tl.constexpr,
    ZERO_OFFSET: tl.constexpr,
):
    """W[offs_k, offs_n] in fp32 (0 outside K x N), decoded from the packed tensors."""
    mask_k = offs_k < K
    mask = mask_k[:, None] & (offs_n < N)[None, :]
    group = tl.load(GI + offs_k, mask=mask_k, other=0)
    words = tl.load(
        QW + (offs_k // (32 // BITS))[:, None] * stride_qw + offs_n[None, :], mask=mask, other=0
    )
    codes = (words >> ((offs_k % (32 // BITS)) * BITS)[:, None]) & ((1 << BITS) - 1)
    zero_words = tl.load(
        QZ + group[:, None] * stride_qz + (offs_n // (32 // BITS))[None, :], mask=mask, other=0
    )
    zeros = ((zero_words >> ((offs_n % (32 // BITS)) * BITS)[None, :]) & ((1 << BITS) - 1)) + (
        ZERO_OFFSET
    )
    scales = tl.load(SC + group[:, None] * stride_sc + offs_n[None, :], mask=mask, other=0.0)
    return (codes - zeros).to(tl.float32) * scales.to(tl.float32)


@triton.jit
def _swizzle(
    pid, rows, cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, GROUP: tl.constexpr
):
    """(row block, column block) of program `pid`, GROUP row blocks per column sweep."""
    blocks_r = tl.cdiv(rows, BLOCK_ROWS)
    blocks_c = tl.cdiv(cols, BLOCK_COLS)
    per_group = GROUP * blocks_c
    first = (pid // per_group) * GROUP
    size = tl.minimum(blocks_r - first, GROUP)
    return first + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def _gptq_matmul_kernel(
    X,
    QW,
    QZ,
    SC,
    GI,
    Y,
    M,
    N,
    K,
    stride_xm,
    stride_ym,
    stride_qw,
    stride_qz,
    stride_sc,
    BITS: tl.constexpr,
    ZERO_OFFSET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    pid_m, pid_n = _swizzle(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP)
    offs_m = tl.cast(pid_m, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            X + offs_m[:, None] * stride_xm + offs_k[None, :],
            mask=mask_m[:, None] & (offs_k < K)[None, :],
            other=0.0,
        )
        w = _weight_tile(
            QW, QZ, SC, GI, offs_k, offs_n, K, N, stride_qw, stride_qz, stride_sc, BITS, ZERO_OFFSET
        )
        if DOT_FP32:
            acc = tl.dot(x.to(tl.float32), w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
    mask = mask_m[:, None] & (offs_n < N)[None, :]
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty), mask)


@triton.jit
def _gptq_matmul_t_kernel(
    DY,
    QW,
    QZ,
    SC,
    GI,
    DX,
    M,
    N,
    K,
    stride_dym,
    stride_dxm,
    stride_qw,
    stride_qz,
    stride_sc,
    BITS: tl.constexpr,
    ZERO_OFFSET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    pid_m, pid_k = _swizzle(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP)
    offs_m = tl.cast(pid_m, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(
            DY + offs_m[:, None] * stride_dym + offs_n[None, :],
            mask=mask_m[:, None] & (offs_n < N)[None, :],
            other=0.0,
        )
        w = _weight_tile(
            QW, QZ, SC, GI, offs_k, offs_n, K, N, stride_qw, stride_qz, stride_sc, BITS, ZERO_OFFSET
        )
        if DOT_FP32:
            acc = tl.dot(dy.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(dy, tl.trans(w.to(dy.dtype)), acc)
    mask = mask_m[:, None] & (offs_k < K)[None, :]
    tl.store(DX + offs_m[:, None] * stride_dxm + offs_k[None, :], acc.to(DX.dtype.element_ty), mask)


def _dot_fp32(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 or triton_interpret()


def gptq_matmul_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    zero_offset: int,
) -> torch.Tensor:
    """x (M, K) @ W (K, N) -> (M, N) in x's dtype; x must have unit stride along K."""
    m, k = x.shape
    n = scales.shape[1]
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    rows, warps = tile(m, x.dtype)
    grid = (triton.cdiv(m, rows) * triton.cdiv(n, BLOCK_N),)
    launch(
        _gptq_matmul_kernel,
        grid,
        x.device,
        x,
        qweight,
        qzeros,
        scales,
        g_idx,
        y,
        m,
        n,
        k,
        x.stride(0),
        y.stride(0),
        qweight.stride(0),
        qzeros.stride(0),
        scales.stride(0),
        BITS=bits,
        ZERO_OFFSET=zero_offset,
        BLOCK_M=rows,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        GROUP=GROUP_M,
        DOT_FP32=_dot_fp32(x),
        num_warps=warps,
        num_stages=NUM_STAGES,
    )
    return y


def gptq_matmul_t_triton(
    dy: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    zero_offset: int,
) -> torch.Tensor:
    """dy (M, N) @ W^T (N, K) -> (M, K) in dy's dtype; dy must have unit stride along N."""
    m, n = dy.shape
    k = g_idx.shape[0]
    dx = torch.empty((m, k), device=dy.device, dtype=dy.dtype)
    rows, warps = tile(m, dy.dtype)
    grid = (triton.cdiv(m, rows) * triton.cdiv(k, BLOCK_K),)
    launch(
        _gptq_matmul_t_kernel,
        grid,
        dy.device,
        dy,
        qweight,
        qzeros,
        scales,
        g_idx,
        dx,
        m,
        n,
        k,
        dy.stride(0),
        dx.stride(0),
        qweight.stride(0),
        qzeros.stride(0),
        scales.stride(0),
        BITS=bits,
        ZERO_OFFSET=zero_offset,
        BLOCK_M=rows,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        GROUP=GROUP_M,
        DOT_FP32=_dot_fp32(dy),
        num_warps=warps,
        num_stages=NUM_STAGES,
    )
    return dx
