"""Expert parallelism in a model: the experts of every MoE block split over `ep_degree`
processes, and what the data-parallel wrappers must not do to them.

The processes form a (replicate, expert_parallel) DeviceMesh. Each keeps experts
[r * E / P, (r + 1) * E / P) of every block as DTensor parameters (Replicate, Shard(0)), so
`full_tensor()` gathers them and gradient norms reduce over the right processes. The swap is a
recorded patch: undo gathers the trained experts back into the original full parameters.

DDP and FSDP2 would treat a shard as a replicated parameter (broadcast rank 0's, average
gradients over all processes, shard it again); the shards are set aside while they wrap the
model, so they never see them, and the shards' gradients are averaged by the kernels'
`replicated_grad` instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from fms_acceleration import AccelerationPluginConfigError, ModelPatcher

from .errors import STANZA
from .grouped_experts import DOWN, GATE_UP
from .kernels.expert_parallel import ExpertShard
from .utils.scattermoe_constants import KEY_EXPERT_PARALLEL, KEY_REPLICATE

EP_RULE = "scattermoe.ep"


def expert_mesh(ep_degree: int) -> DeviceMesh:
    """The (replicate, expert_parallel) mesh of all processes, ep_degree along experts."""
    if not (dist.is_available() and dist.is_initialized()):
        raise AccelerationPluginConfigError(
            f"{STANZA}.ep_degree: {ep_degree} needs torch.distributed initialised before "
            "augmentation (launch with torchrun or accelerate launch)"
        )
    world = dist.get_world_size()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return init_device_mesh(
        device, (world // ep_degree, ep_degree), mesh_dim_names=(KEY_REPLICATE, KEY_EXPERT_PARALLEL)
    )


def expert_shard(mesh: DeviceMesh, num_experts: int) -> ExpertShard:
    """What the kernels need to know of this process's place in the mesh."""
    replicate = mesh[KEY_REPLICATE]
    return ExpertShard(
        num_experts=num_experts,
        expert_group=mesh[KEY_EXPERT_PARALLEL].get_group(),
        replicate_group=replicate.get_group() if replicate.size() > 1 else None,
        world_size=mesh.size(),
    )


def _gather_back(original: torch.nn.Parameter, shard: torch.nn.Parameter) -> None:
    # every process undoes its patches, so every process joins this all-gather
    original.data = shard.full_tensor().detach()


def shard_experts(
    patcher: ModelPatcher,
    experts: list[tuple[str, torch.nn.Module]],
    mesh: DeviceMesh,
    shard: ExpertShard,
) -> None:
    """Keep this process's experts of every experts module, as recorded parameter swaps."""
    lo, hi = shard.first_expert, shard.first_expert + shard.local_experts
    for where, module in experts:
        for name in (GATE_UP, DOWN):
            full = module._parameters[name]
            local = full.detach()[lo:hi].clone()
            placed = DTensor.from_local(local, mesh, [Replicate(), Shard(0)], run_check=False)
            patcher.replace_member(
                f"{EP_RULE}.{type(module).__name__}",
                module,
                name,
                torch.nn.Parameter(placed, requires_grad=full.requires_grad),
                where=where,
                carry_back=_gather_back,
            )
            # the full experts live on no process until undo gathers them
            full.data = full.data.new_empty(0)


def is_expert_shard(param: torch.Tensor) -> bool:
    """Whether `param` is an expert-parallel shard of this plugin."""
    if not isinstance(param, DTensor):
        return False
    return KEY_EXPERT_PARALLEL in (param.device_mesh.mesh_dim_names or ())


def expert_parallel_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The expert shards of a model (e.g. for fully_shard's ignored_params)."""
    return [p for p in model.parameters() if is_expert_shard(p)]


@contextlib.contextmanager
def expert_shards_set_aside(model: torch.nn.Module) -> Iterator[None]:
    """Within the block the model has no expert shards: wrap it in DDP or shard it with
    FSDP2 there, and neither broadcasts, averages nor re-shards them."""
    held = [
        (module, name, param)
        for module in model.modules()
        for name, param in list(module._parameters.items())
        if param is not None and is_expert_shard(param)
    ]
    for module, name, _ in held:
        del module._parameters[name]
    try:
        yield
    finally:
        for module, name, param in held:
            module._parameters[name] = param


def setting_aside_expert_shards(prepare: Any) -> Any:
    """`prepare(model, ...)` (accelerate's DDP or FSDP2 preparation) with the shards set aside."""

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        model = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.nn.Module))
        with expert_shards_set_aside(model):
            return prepare(*args, **kwargs)

    return wrapped


def refuse_fsdp1(accelerator: Any, ep_degree: int) -> None:
    """FSDP1 flattens every parameter of a wrapped module into one: no shard can stay out."""
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    if plugin is not None and getattr(plugin, "fsdp_version", 1) == 1:
        raise AccelerationPluginConfigError(
            f"{STANZA}.ep_degree: {ep_degree} cannot run under FSDP version 1 (it flattens the "
            "expert shards into its own); use FSDP2 (fsdp_version: 2) or DDP, or ep_degree: 1."
        )
