"""The GPU suite's plumbing on CPU: the script parses, the benchmark writes its CSV columns, and
the summary turns CSVs into the goals table (scripts/gpu/suite.sh dry-runs all of it)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def test_suite_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "scripts/gpu/suite.sh")], check=True)


def test_kernel_benchmark_writes_a_row_per_impl(tmp_path):
    out = tmp_path / "k.csv"
    args = ["--device", "cpu", "--in-process", "--kernels", "swiglu", "--passes", "full"]
    args += ["--tokens", "64", "--intermediate", "32", "--warmup", "0", "--repeat", "1"]
    args += ["--out", str(out)]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts/benchmarks/benchmark_kernels.py"), *args],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "0", "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert [r["impl"] for r in rows] == ["foak", "reference", "hf_eager"]  # liger: CUDA only
    assert all(float(r["ms"]) > 0 and float(r["copy_gbps"]) > 0 for r in rows)
    assert rows[0]["shape"] == "64x32" and rows[0]["dtype"] == "float32"
    assert all(float(r["alloc_peak_mb"]) > 0 for r in rows)  # CPU: the allocator's peak too


def test_summary_reports_goals(tmp_path):
    fields = ["date", "device", "torch", "triton", "transformers", "liger", "kernel", "impl"]
    fields += ["shape", "dtype", "pass", "ms", "peak_mb", "gbps", "copy_gbps"]
    fields += ["bandwidth_fraction", "note"]
    common = {"date": "d", "device": "H200", "torch": "2.11", "triton": "3.6"}
    common.update(transformers="5.17", liger="0.8.5", dtype="bfloat16", copy_gbps="4300")
    rows = [
        dict(kernel="swiglu", impl="foak", shape="s", ms="1.0", gbps="3900", note=""),
        dict(kernel="swiglu", impl="liger", shape="s", ms="1.1", gbps="3500", note=""),
        dict(kernel="fused_linear_cross_entropy", impl="foak", shape="f", ms="90", note=""),
        dict(kernel="fused_linear_cross_entropy", impl="hf_eager", shape="f", ms="100", note=""),
        dict(kernel="fused_linear_cross_entropy", impl="cce", shape="f", ms="95", note=""),
    ]
    peaks = ["0", "0", "4000", "30000", "3900"]
    with (tmp_path / "gpu_kernels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row, peak in zip(rows, peaks):
            fraction = str(float(row.get("gbps", 0)) / 4300) if "gbps" in row else "0"
            writer.writerow(
                {**common, **row, "pass": "full", "peak_mb": peak, "bandwidth_fraction": fraction}
            )
    sys.path.insert(0, str(ROOT / "scripts/gpu"))
    try:
        import summarize
    finally:
        sys.path.pop(0)
    text = summarize.summarize(tmp_path)
    assert "| swiglu: >= 85% of copy bandwidth | met | 91% |" in text
    assert "| swiglu: no slower than Liger | met | 1.10x Liger's speed |" in text
    assert "<= 1/10 unfused memory | NOT met | 0.133 |" in text
    assert ">= 1.0x unfused speed | met | 1.11x |" in text
    peer = "at least Cut Cross-Entropy's speed at no more memory | NOT met"
    assert f"{peer} | time 0.95x, memory 1.03x of theirs |" in text


def _benchmark_module():
    sys.path.insert(0, str(ROOT / "scripts/benchmarks"))
    try:
        import benchmark_kernels
    finally:
        sys.path.pop(0)
    return benchmark_kernels


def test_peer_that_is_not_installed_is_skipped_with_its_reason(monkeypatch):
    import torch

    bench = _benchmark_module()
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", None)  # import fails
    with pytest.raises(bench.NotApplicable, match="cut-cross-entropy not installed"):
        bench._cce(torch.device("cpu"))
    assert bench.cce_impl(torch.device("cpu")) == "torch_compile"
    assert bench.cce_impl(torch.device("cuda")) == "cce"  # its Triton kernels


def test_flce_markdown_gives_ours_over_each_peer():
    bench = _benchmark_module()
    common = {"kernel": "fused_linear_cross_entropy", "pass": "full", "dtype": "bfloat16"}
    common.update(shape="1024x576x128256", date="d", device="cpu", timer="cpu", threads=1)
    rows = [
        {**common, "impl": impl, "ignored": ignored, "ms": ms, "peak_mb": mb, "note": ""}
        for impl, ignored, ms, mb in (
            ("foak", 0.0, 900.0, 400.0),
            ("hf_eager", 0.0, 1800.0, 2400.0),
            ("cce", 0.0, 1000.0, 1000.0),
            ("foak", 0.5, 500.0, 200.0),
            ("cce", 0.5, 400.0, 500.0),
        )
    ]
    text = bench.flce_markdown(rows, "peers", command="python bench.py --x")
    assert "- made by: `python bench.py --x`" in text
    assert "| foak/hf_eager time | foak/hf_eager memory | foak/cce time | foak/cce memory |" in text
    assert "| bfloat16 | 1024x576x128256 | 0% | 900.0 | 1800.0 | 1000.0 | 400.0 | 2400.0 |" in text
    assert "| 1000.0 | 0.50 | 0.17 | 0.90 | 0.40 |" in text
    assert "| bfloat16 | 1024x576x128256 | 50% | 500.0 | - | 400.0 | 200.0 | - | 500.0 |" in text
    assert "| - | - | 1.25 | 0.40 |" in text


def test_allocator_peak_is_the_most_held_at_once():
    import torch

    bench = _benchmark_module()
    kept = []

    def step():
        a = torch.empty(3 * 2**20, dtype=torch.uint8)
        b = torch.empty(5 * 2**20, dtype=torch.uint8)
        del a
        c = torch.empty(1 * 2**20, dtype=torch.uint8)  # after a is freed: 6 MiB held
        kept.append(c)
        del b

    peak = bench._allocator_peak(step)
    assert peak is not None and 8 * 2**20 <= peak < 8 * 2**20 + 4096


def test_flce_markdown_adds_the_allocator_columns_where_rows_have_them():
    bench = _benchmark_module()
    common = {"kernel": "fused_linear_cross_entropy", "pass": "full", "dtype": "float32"}
    common.update(shape="512x576x32768", date="d", device="cpu", timer="cpu", threads=1)
    rows = [
        {**common, "impl": i, "ignored": 0.5, "ms": ms, "peak_mb": mb, "alloc_peak_mb": al}
        for i, ms, mb, al in (("foak", 250.0, 105.0, 104.56), ("cce", 260.0, 104.2, 104.57))
    ]
    rows = [{**r, "note": ""} for r in rows]
    text = bench.flce_markdown(rows, "peers", command="python bench.py")
    assert "| foak allocator MB | cce allocator MB |" in text
    assert "| foak/cce time | foak/cce memory | foak/cce allocator memory |" in text
    assert "| 105.0 | 104.2 | 104.56 | 104.57 | 0.96 | 1.01 | 1.00 |" in text
    assert "allocator: the most torch's allocator held during one step" in text
