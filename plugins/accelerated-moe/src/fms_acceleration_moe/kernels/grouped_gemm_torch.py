"""The grouped expert GEMM in plain PyTorch: the CPU path and the reference of the kernels.

Each expert's rows are contiguous after the sort, so one `mm` per expert on a slice (a view,
not a copy) does the work; autograd differentiates it. Reading the input through `gather` and
writing the output through `scatter` is one index_select and one index_copy.
"""

from __future__ import annotations

import torch


def grouped_linear_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor,
    gather: torch.Tensor | None = None,
    scatter: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows i of expert e: y[scatter[i]] = x[gather[i]] @ weight[e].T (see grouped_linear)."""
    rows = x if gather is None else x.index_select(0, gather)
    bounds = offsets.tolist()
    parts = [
        rows[bounds[e] : bounds[e + 1]] @ weight[e].transpose(0, 1)
        for e in range(weight.shape[0])
        if bounds[e + 1] > bounds[e]
    ]
    out = torch.cat(parts) if parts else rows.new_zeros(0, weight.shape[1])
    if scatter is None:
        return out
    return torch.zeros_like(out).index_copy(0, scatter, out)
