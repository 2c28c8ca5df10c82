"""The AOT helper's recorder: launches captured per workload and dtype, seams restored."""

from __future__ import annotations

import types

import pytest
import torch

from fms_acceleration.triton_aot import record_workloads


def _kernels_module() -> types.ModuleType:
    module = types.ModuleType("fake_kernels")

    def launch(kernel, grid, device, *args, **meta):
        raise AssertionError("a recorded workload ran its kernel")

    module.launch = launch
    module.use_triton = lambda *tensors: False
    return module


def test_record_workloads_captures_each_launch_per_dtype_and_restores_the_seams():
    kernels = _kernels_module()
    seams = (kernels.launch, kernels.use_triton)

    def workload(width):
        def run(dtype):
            x = torch.empty(3, width, device="meta", dtype=dtype)
            assert kernels.use_triton(x)
            kernels.launch("kernel-a", (3,), x.device, x, width, BLOCK=64)
            kernels.launch("kernel-b", (1,), x.device, x, num_warps=4)

        return run

    workloads = [("wide", workload(4096), "large"), ("narrow", workload(576), "small")]
    recorded = record_workloads(
        workloads, ["float16", "float32"], ["bfloat16"], [kernels], [kernels]
    )
    summary = [(dtype, launch.workload, launch.kernel) for dtype, launch in recorded]
    assert summary == [
        ("float16", "wide", "kernel-a"),
        ("float16", "wide", "kernel-b"),
        ("float32", "wide", "kernel-a"),
        ("float32", "wide", "kernel-b"),
        ("bfloat16", "narrow", "kernel-a"),
        ("bfloat16", "narrow", "kernel-b"),
    ]
    first = recorded[0][1]
    assert first.args[0].dtype == torch.float16 and first.args[1] == 4096  # grid, device dropped
    assert first.meta == {"BLOCK": 64}
    assert (kernels.launch, kernels.use_triton) == seams


def test_record_workloads_restores_the_seams_when_a_workload_fails():
    kernels = _kernels_module()
    seams = (kernels.launch, kernels.use_triton)

    def broken(dtype):
        raise ValueError("launch code read a meta tensor's value")

    with pytest.raises(ValueError, match="meta tensor"):
        record_workloads([("broken", broken, "large")], ["float32"], [], [kernels], [kernels])
    assert (kernels.launch, kernels.use_triton) == seams
