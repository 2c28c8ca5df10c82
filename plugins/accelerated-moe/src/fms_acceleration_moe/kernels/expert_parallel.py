"""Expert parallelism: each of the P processes of an expert-parallel group holds E / P experts.

A process routes its own tokens over all E experts, sends each (token, expert) row to the
process holding that expert, runs the grouped GEMMs of its local experts over the rows it
received from the whole group, and sends the results back (two autograd-aware all-to-alls;
their backward is the reverse exchange). Rows travel sorted by expert, so each destination's
rows are one contiguous block and every received block is already sorted by local expert.

Gradients: a local expert's weight gradient sums the rows of the whole expert-parallel group.
Data parallelism (DDP, FSDP) averages every other gradient over all W processes but never sees
the expert shards, so `replicated_grad` sums theirs over the processes holding the same
experts (the replicate group) and divides by W: the same mean as one process holding all
experts would get.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from .experts_mlp import ExpertLoRA, combine, expert_rows
from .gating import GateFn
from .routing import group_by_expert, offsets_from_counts


@dataclass(frozen=True)
class ExpertShard:
    """Which experts this process holds, and the groups it exchanges with."""

    num_experts: int
    """E, the experts of the model"""
    expert_group: dist.ProcessGroup
    """the P processes that split the experts between them"""
    replicate_group: dist.ProcessGroup | None
    """the processes holding the same experts as this one (None: only this one)"""
    world_size: int
    """W, every data-parallel process (the mean of the gradients is over these)"""

    @property
    def size(self) -> int:
        """P, the expert-parallel degree."""
        return dist.get_world_size(self.expert_group)

    @property
    def rank(self) -> int:
        """This process's index in its expert-parallel group."""
        return dist.get_rank(self.expert_group)

    @property
    def local_experts(self) -> int:
        """E / P, the experts held here."""
        return self.num_experts // self.size

    @property
    def first_expert(self) -> int:
        """The global index of the first expert held here."""
        return self.rank * self.local_experts


class _ReplicatedGrad(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the replicate group and scales it."""

    @staticmethod
    def forward(ctx, weight, group, scale):
        ctx.group, ctx.scale = group, scale
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        grad = grad * ctx.scale
        if ctx.group is not None and dist.get_world_size(ctx.group) > 1:
            dist.all_reduce(grad, group=ctx.group)
        return grad, None, None


def replicated_grad(weight: torch.Tensor, shard: ExpertShard) -> torch.Tensor:
    """`weight` (a local expert shard) whose gradient becomes the data-parallel mean."""
    return _ReplicatedGrad.apply(weight, shard.replicate_group, 1.0 / shard.world_size)


def _exchange(rows: torch.Tensor, out_splits: list[int], in_splits: list[int], group):
    return funcol.all_to_all_single_autograd(rows, out_splits, in_splits, group)


def experts_mlp_ep(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_local: torch.Tensor,
    down_local: torch.Tensor,
    gate_fn: GateFn,
    shard: ExpertShard,
    gate_up_loras: Sequence[ExpertLoRA] = (),
    down_loras: Sequence[ExpertLoRA] = (),
) -> torch.Tensor:
    """The MoE MLP of this process's N tokens (x: (N, H)) routed to k of E experts, computed
    by the expert-parallel group: (N, H). gate_up_local / down_local: the E / P experts here."""
    procs, local = shard.size, shard.local_experts
    groups = group_by_expert(top_k_index, shard.num_experts)
    counts = groups.counts()
    # per source process, how many rows it sends to each expert held here
    arriving = torch.empty_like(counts)
    dist.all_to_all_single(arriving, counts, group=shard.expert_group)
    arriving = arriving.view(procs, local)
    send = counts.view(procs, local).sum(1).tolist()
    receive = arriving.sum(1).tolist()
    arrived = _exchange(x.index_select(0, groups.tokens), receive, send, shard.expert_group)
    # blocks by source, each sorted by local expert: one stable sort groups them by expert
    expert_of_row = torch.repeat_interleave(
        torch.arange(local, device=counts.device).repeat(procs), arriving.reshape(-1)
    )
    order = torch.sort(expert_of_row, stable=True).indices
    rows = expert_rows(
        arrived,
        offsets_from_counts(arriving.sum(0)),
        order,
        order,
        gate_up_local,
        down_local,
        gate_fn,
        gate_up_loras,
        down_loras,
    )
    returned = _exchange(rows, send, receive, shard.expert_group)
    # back in this process's sorted-pair order: put each row at its (token, k) position
    position = torch.empty_like(groups.pairs)
    position[groups.pairs] = torch.arange(groups.num_pairs, device=position.device)
    return combine(returned.index_select(0, position), top_k_weights)
