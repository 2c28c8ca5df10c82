"""AOT worker (not a test module): compiles the GPTQ Triton kernels for sm_80 and sm_90 at the
launches their launch code makes for realistic shapes, with no GPU.

    python gptq_aot_worker.py OUT_JSON      (TRITON_INTERPRET must be unset)

The launch code runs on meta tensors; each launch is recorded instead of run and compiled by
the core's AOT helper, fms_acceleration.triton_aot (triton.compile with ptxas, which reports
registers and spills).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

import torch

from fms_acceleration import triton_aot as aot
from fms_acceleration_peft import gptq_triton

TARGETS = (80, 90)
TOKENS = 16384
# (name, in_features, out_features, bits, group_size): Llama-3-8B and SmolLM2-135M projections
LAYERS = (
    ("llama q/o 4096x4096", 4096, 4096, 4, 128),
    ("llama k/v 4096x1024", 4096, 1024, 4, 128),
    ("llama gate/up 4096x14336", 4096, 14336, 4, 128),
    ("llama down 14336x4096", 14336, 4096, 4, 128),
    ("smollm2 q 576x576", 576, 576, 4, 64),
    ("smollm2 down 1536x576", 1536, 576, 4, 64),
    ("llama q 8-bit", 4096, 4096, 8, 128),
    ("llama q 2-bit", 4096, 4096, 2, 128),
)


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(*shape, device="meta", dtype=dtype)


def _layer(k: int, n: int, bits: int, group: int, rows: int):
    pack = 32 // bits

    def run(dtype: torch.dtype) -> None:
        tensors = (
            _meta(k // pack, n, dtype=torch.int32),
            _meta(k // group, n // pack, dtype=torch.int32),
            _meta(k // group, n, dtype=torch.float16),
            _meta(k, dtype=torch.int32),
        )
        gptq_triton.gptq_matmul_triton(_meta(rows, k, dtype=dtype), *tensors, bits, 1)
        gptq_triton.gptq_matmul_t_triton(_meta(rows, n, dtype=dtype), *tensors, bits, 1)

    return run


# 4-bit layers in every dtype ("large"); the other widths differ only in BITS: bf16 ("small")
WORKLOADS: tuple[aot.Workload, ...] = tuple(
    (f"{name}, {rows} rows", _layer(k, n, bits, group, rows), "large" if bits == 4 else "small")
    for name, k, n, bits, group in LAYERS
    for rows in (TOKENS, 8)  # training batch, decode
)


def record() -> list[tuple[str, aot.Launch]]:
    """Every launch of the forward and backward kernels, with the dtype it ran in."""
    return aot.record_workloads(WORKLOADS, list(aot.DTYPE_NAMES), ["bfloat16"], (gptq_triton,))


def main() -> None:
    aot.refuse_interpreter("the GPTQ AOT worker")
    seen: set[tuple] = set()
    compiled, failures = [], []
    for capability in TARGETS:
        for dtype, launch in record():
            try:
                result = aot.compile_launch(launch, capability, dtype, seen)
            except Exception as err:  # report every failing specialisation
                failures.append(f"{launch.kernel.fn.__name__} sm_{capability} {dtype}: {err}")
                continue
            if result is not None:
                compiled.append(asdict(result))
    with open(sys.argv[1], "w", encoding="utf-8") as handle:
        json.dump({"compiled": compiled, "failures": failures}, handle, indent=1)


if __name__ == "__main__":
    main()
