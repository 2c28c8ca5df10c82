"""Ahead-of-time compile of every Triton kernel for CUDA targets, on a machine with no GPU.

    python -m fms_acceleration_foak.aot                       # sm_80 + sm_90, table on stdout
    python -m fms_acceleration_foak.aot --targets 90 --json aot.json

The kernels' own launch code runs on meta tensors at realistic shapes (Llama-3-8B and
SmolLM2-135M: hidden 4096 / 576, head_dim 128 / 64, vocab 128256 / 49152, intermediate
14336 / 1536, and a 16384-wide RMSNorm row) in fp16, bf16 and fp32, forward and backward. Each
launch is recorded instead of run, bound to Triton's own specialisation for the target (the
signature, constexprs and divisibility attributes a real launch would produce) and compiled by
triton.compile, ptxas included; ptxas's -v report gives registers and spills.

A kernel that only works in the Triton interpreter fails here. TRITON_INTERPRET must be unset
before triton is imported, so run this in a fresh process (the test suite does).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from types import ModuleType

from fms_acceleration.triton_aot import Launch, Workload, record_workloads, refuse_interpreter
from fms_acceleration.triton_aot import main as aot_main

refuse_interpreter("fms_acceleration_foak.aot")

import torch  # noqa: E402  (after the interpreter check: triton decides at import)

from . import kernels as K  # noqa: E402


def _module(name: str) -> ModuleType:
    # the package re-exports functions under the submodules' names: import the modules
    return importlib.import_module(f"{__package__}.kernels.{name}")


KERNEL_MODULES: tuple[ModuleType, ...] = tuple(
    _module(n) for n in ("rms_norm", "rope", "cross_entropy", "swiglu")
)
FLCE_MODULE = _module("fused_linear_cross_entropy")
TOKENS = 16384


# --- recording the launch code ------------------------------------------------------------------


def _meta(*shape: int, dtype: torch.dtype, grad: bool = True) -> torch.Tensor:
    return torch.empty(*shape, device="meta", dtype=dtype).requires_grad_(grad)


def _backward(*outputs: torch.Tensor) -> None:
    torch.autograd.backward(list(outputs), [torch.empty_like(o) for o in outputs])


def _rms(hidden: int, rows: int) -> Callable[[torch.dtype], None]:
    def run(dtype):
        _backward(K.rms_norm(_meta(rows, hidden, dtype=dtype), _meta(hidden, dtype=dtype)))

    return run


def _rope(heads: int, kv_heads: int, head_dim: int, table_fp32: bool = False):
    def run(dtype):
        batch, seq = 4, TOKENS // 4
        q = _meta(batch, seq, heads, head_dim, dtype=dtype).transpose(1, 2)
        k = _meta(batch, seq, kv_heads, head_dim, dtype=dtype).transpose(1, 2)
        table = torch.float32 if table_fp32 else dtype
        cos = _meta(1, seq, head_dim, dtype=table, grad=False)
        _backward(*K.rope(q, k, cos, cos.clone()))

    return run


def _cross_entropy(vocab: int):
    def run(dtype):
        target = torch.empty(TOKENS, device="meta", dtype=torch.long)
        _backward(K.cross_entropy(_meta(TOKENS, vocab, dtype=dtype), target))

    return run


def _fused_linear_ce(hidden: int, vocab: int):
    def run(dtype):
        target = torch.empty(TOKENS, device="meta", dtype=torch.long)
        h, w = _meta(TOKENS, hidden, dtype=dtype), _meta(vocab, hidden, dtype=dtype)
        divisor = torch.empty((), device="meta")
        # the Function itself: autocast has no meta device for the public wrapper to ask
        apply = FLCE_MODULE.FusedLinearCrossEntropyFunction.apply
        _backward(apply(h, w, target, None, None, -100, divisor, None, True))

    return run


def _swiglu(intermediate: int, packed: bool = False):
    def run(dtype):
        if packed:
            _backward(K.swiglu_packed(_meta(TOKENS, 2 * intermediate, dtype=dtype)))
            return
        gate, up = (_meta(TOKENS, intermediate, dtype=dtype) for _ in range(2))
        _backward(K.swiglu(gate, up))
        # the fused LoRA MLP's backward: h, dgate and dup in one pass
        KERNEL_MODULES[3].swiglu_backward(gate.detach(), gate.detach(), up.detach(), want_h=True)

    return run


# "large" (Llama-3-8B) runs in every dtype, "small" in bf16 only (fewer compiles)
WORKLOADS: tuple[Workload, ...] = (
    ("rms_norm hidden 4096", _rms(4096, TOKENS), "large"),
    ("rms_norm head_dim 128 rows", _rms(128, TOKENS * 32), "large"),
    ("rms_norm hidden 576", _rms(576, TOKENS), "small"),
    ("rms_norm head_dim 64 rows", _rms(64, TOKENS * 9), "small"),
    ("rms_norm hidden 8192", _rms(8192, TOKENS), "small"),
    ("rms_norm hidden 16384 (chunked)", _rms(16384, 2048), "large"),
    ("rope 32/8 heads x 128", _rope(32, 8, 128), "large"),
    ("rope 32/8 heads x 128, fp32 tables (autocast)", _rope(32, 8, 128, True), "small"),
    ("rope 9/3 heads x 64", _rope(9, 3, 64), "small"),
    ("cross_entropy vocab 128256", _cross_entropy(128256), "large"),
    ("cross_entropy vocab 49152", _cross_entropy(49152), "small"),
    ("fused_linear_ce 4096 x 128256", _fused_linear_ce(4096, 128256), "large"),
    ("fused_linear_ce 576 x 49152", _fused_linear_ce(576, 49152), "small"),
    ("swiglu intermediate 14336", _swiglu(14336), "large"),
    ("swiglu intermediate 1536", _swiglu(1536), "small"),
    ("swiglu packed experts 14336", _swiglu(14336, packed=True), "large"),
)


def record_launches(dtypes: list[str], small_dtypes: list[str]) -> list[tuple[str, Launch]]:
    """Every launch the launch code makes for the workloads, with the dtype it ran in."""
    dispatchers = (*KERNEL_MODULES, FLCE_MODULE)
    return record_workloads(WORKLOADS, dtypes, small_dtypes, KERNEL_MODULES, dispatchers)


def main(argv: list[str] | None = None) -> int:
    """Compile every kernel for the targets; exit 1 on a failure or an uncovered kernel."""
    return aot_main(
        __doc__.splitlines()[0],
        record_launches,
        KERNEL_MODULES,
        argv,
        small_shape_set="the second (SmolLM2-sized, 8192-wide) shape set",
    )


if __name__ == "__main__":
    sys.exit(main())
