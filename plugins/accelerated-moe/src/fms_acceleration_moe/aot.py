"""AOT spec of the grouped expert GEMM kernels: compile them for CUDA targets, with no GPU.

    python -m fms_acceleration_moe.aot                        # sm_80 + sm_90, table on stdout
    python -m fms_acceleration_moe.aot --targets 90 --json aot.json

The launch code runs on meta tensors at realistic MoE shapes (Mixtral-8x7B: hidden 4096,
intermediate 14336, 8 experts, top-2; granite-3.0-3b-a800m: 1536 / 512, 40 experts, top-8;
SmolLM2-135M up-cycled: 576 / 1536, 8 experts, top-2) for the up projection (gathered input),
the down projection (scattered output) and their backward passes; the core's
fms_acceleration.triton_aot binds, compiles (ptxas included) and reports each launch.
"""

from __future__ import annotations

import sys

from fms_acceleration.triton_aot import Launch, Workload, record_workloads, refuse_interpreter
from fms_acceleration.triton_aot import main as aot_main

refuse_interpreter("fms_acceleration_moe.aot")

import torch  # noqa: E402  (after the interpreter check: triton decides at import)

from .kernels import grouped_gemm as dispatching  # noqa: E402
from .kernels import grouped_gemm_triton as triton_gemm  # noqa: E402

KERNEL_MODULES = (triton_gemm,)
TOKENS = 8192


def _meta(*shape: int, dtype: torch.dtype, grad: bool = True) -> torch.Tensor:
    return torch.empty(*shape, device="meta", dtype=dtype).requires_grad_(grad)


def _index(rows: int) -> torch.Tensor:
    return torch.empty(rows, device="meta", dtype=torch.int64)


def _moe(hidden: int, intermediate: int, experts: int, top_k: int):
    def run(dtype: torch.dtype) -> None:
        tokens = TOKENS // top_k
        pairs = tokens * top_k
        offsets = torch.empty(experts + 1, device="meta", dtype=torch.int64)
        x = _meta(tokens, hidden, dtype=dtype)
        gate_up = _meta(experts, 2 * intermediate, hidden, dtype=dtype)
        down = _meta(experts, hidden, intermediate, dtype=dtype)
        apply = triton_gemm.GroupedLinearFunction.apply
        up = apply(x, gate_up, offsets, _index(pairs), None)  # gathered input
        act = _meta(pairs, intermediate, dtype=dtype)
        out = apply(act, down, offsets, None, _index(pairs))  # scattered output
        torch.autograd.backward([up, out], [torch.empty_like(up), torch.empty_like(out)])

    return run


# "large" runs in every dtype, "small" in the small-set dtypes
WORKLOADS: tuple[Workload, ...] = (
    ("mixtral-8x7b 4096/14336 8 experts top-2", _moe(4096, 14336, 8, 2), "large"),
    ("granite-3b-a800m 1536/512 40 experts top-8", _moe(1536, 512, 40, 8), "large"),
    ("smollm2-moe 576/1536 8 experts top-2", _moe(576, 1536, 8, 2), "small"),
)


def record_launches(dtypes: list[str], small_dtypes: list[str]) -> list[tuple[str, Launch]]:
    """Every launch the workloads make, with the dtype they ran in."""
    return record_workloads(WORKLOADS, dtypes, small_dtypes, KERNEL_MODULES, (dispatching,))


def main(argv: list[str] | None = None) -> int:
    """Compile every kernel for the targets; exit 1 on a failure or an uncovered kernel."""
    return aot_main(
        __doc__.splitlines()[0],
        record_launches,
        KERNEL_MODULES,
        argv,
        small_shape_set="the SmolLM2-sized shape set",
    )


if __name__ == "__main__":
    sys.exit(main())
