"""Huge-page advice for the fused loss's CPU buffers must reach the kernel's mappings."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fms_acceleration_foak.kernels import _host_memory as host_memory

THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping that holds `address` in this process (Linux smaps)."""
    mapping = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            begin, end = (int(x, 16) for x in head.split("-"))
            mapping = begin <= address < end
        elif mapping and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and THP_ENABLED.exists()),
    reason="transparent huge pages are a Linux kernel feature, absent here",
)
def test_large_buffers_are_advised_huge_pages():
    rows = 3 * host_memory.HUGE_PAGE // (4 * 1000) + 7  # 6 MiB and a bit: odd, unaligned
    buffer = host_memory.empty((rows, 1000), torch.float32)
    assert buffer.shape == (rows, 1000) and buffer.dtype == torch.float32
    assert buffer.is_contiguous()
    first_huge = -(-buffer.data_ptr() // host_memory.HUGE_PAGE) * host_memory.HUGE_PAGE
    assert "hg" in _vm_flags(first_huge)  # MADV_HUGEPAGE took effect on the mapping
    # the buffer is plain memory otherwise
    buffer.copy_(torch.arange(buffer.numel(), dtype=torch.float32).view_as(buffer))
    assert buffer[-1, -1].item() == buffer.numel() - 1


def test_small_and_non_cpu_buffers_are_left_alone():
    small = torch.empty(host_memory.MIN_BYTES // 4 - 1, dtype=torch.float32)
    assert host_memory.advise_huge_pages(small) is False
    assert host_memory.empty_like(small).shape == small.shape
    meta = torch.empty(2**24, dtype=torch.float32, device="meta")
    assert host_memory.advise_huge_pages(meta) is False
