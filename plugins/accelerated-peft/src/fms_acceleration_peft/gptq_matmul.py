"""x @ W for a GPTQ-packed W, with a backward pass to x (LoRA trains on a frozen GPTQ base).

Two paths compute the same thing: "torch" dequantizes W in fp32 (gptq_format.dequantize),
rounds it to the input's dtype and multiplies; "triton" fuses the dequantization into the
matmul (gptq_triton). "auto" takes Triton on CUDA and torch elsewhere. Neither saves a float
copy of W for backward: the backward pass decodes it again, as the forward did.

Nothing here imports the framework or transformers.
"""

from __future__ import annotations

import torch

from .gptq_format import dequantize

PATHS = ("auto", "triton", "torch")


def resolve_path(path: str, device: torch.device) -> str:
    """'triton' or 'torch' for `path` on `device`; 'auto' picks Triton on CUDA only."""
    if path not in PATHS:
        raise ValueError(f"GPTQ matmul path {path!r} is not one of {', '.join(PATHS)}")
    if path == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if path == "triton" and device.type != "cuda":
        from .gptq_triton import triton_interpret

        if not triton_interpret():
            raise ValueError(
                f"the Triton GPTQ kernel needs CUDA tensors (got {device.type}) or "
                "TRITON_INTERPRET=1 set before triton is imported"
            )
    return path


def _matmul_torch(x2, qweight, qzeros, scales, g_idx, bits, zero_offset, transpose):
    weight = dequantize(qweight, qzeros, scales, g_idx, bits, zero_offset).to(x2.dtype)
    return x2 @ (weight.t() if transpose else weight)


def _matmul(x2, tensors, bits, zero_offset, path, transpose):
    if path == "torch":
        return _matmul_torch(x2, *tensors, bits, zero_offset, transpose)
    from .gptq_triton import gptq_matmul_t_triton, gptq_matmul_triton

    kernel = gptq_matmul_t_triton if transpose else gptq_matmul_triton
    return kernel(x2.contiguous(), *tensors, bits, zero_offset)


class GPTQMatmulFunction(torch.autograd.Function):
    """y = x @ W (W frozen, GPTQ-packed); backward gives dx = dy @ W^T only."""

    @staticmethod
    def forward(ctx, x, qweight, qzeros, scales, g_idx, bits, zero_offset, path):
        tensors = (qweight, qzeros, scales, g_idx)
        ctx.save_for_backward(*tensors)
        ctx.settings = (bits, zero_offset, path)
        x2 = x.reshape(-1, x.shape[-1])
        y = _matmul(x2, tensors, bits, zero_offset, path, transpose=False)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        dx = None
        if ctx.needs_input_grad[0]:
            bits, zero_offset, path = ctx.settings
            dy2 = dy.reshape(-1, dy.shape[-1])
            dx2 = _matmul(dy2, ctx.saved_tensors, bits, zero_offset, path, transpose=True)
            dx = dx2.view(*dy.shape[:-1], dx2.shape[-1])
        return dx, None, None, None, None, None, None, None


def gptq_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    zero_offset: int = 1,
    path: str = "auto",
) -> torch.Tensor:
    """x (..., in_features) @ W -> (..., out_features) in x's dtype, differentiable in x."""
    resolved = resolve_path(path, x.device)
    return GPTQMatmulFunction.apply(x, qweight, qzeros, scales, g_idx, bits, zero_offset, resolved)
