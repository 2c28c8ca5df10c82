"""The total gradient norm and clipping of a model whose parameters live on several meshes.

With expert parallelism a model holds plain (DDP-replicated) tensors, FSDP2 shards on the
data-parallel mesh and expert shards on the (replicate, expert_parallel) mesh. A norm of a
sharded gradient is a partial value that must be reduced over its own mesh; torch's
clip_grad_norm_ stacks the norms of all meshes together, which fails (accelerate 1.9 calls it
under FSDP2 and DDP). Here each mesh's norm is completed on its mesh, then combined.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor


def _by_mesh(parameters: Iterable[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[object, list[torch.Tensor]] = {}
    for param in parameters:
        if param.grad is not None:
            mesh = param.grad.device_mesh if isinstance(param.grad, DTensor) else None
            groups.setdefault(mesh, []).append(param)
    return list(groups.values())


def _group_norm(params: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def total_grad_norm(parameters: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The norm of all gradients as one vector, whatever mesh each lives on."""
    groups = _by_mesh(parameters)
    if not groups:
        return torch.tensor(0.0)
    norms = torch.stack([_group_norm(g, norm_type) for g in groups])
    return norms.max() if math.isinf(norm_type) else torch.linalg.vector_norm(norms, norm_type)


def clip_grad_norm_(
    parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0
) -> torch.Tensor:
    """Scale all gradients so their total norm is at most `max_norm`; return the norm before."""
    parameters = list(parameters)
    total = total_grad_norm(parameters, norm_type)
    for group in _by_mesh(parameters):
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total
