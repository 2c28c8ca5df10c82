"""Shared fixtures: tiny random-init checkpoints, LoRA configs, a short Trainer run, and
bitsandbytes' CPU kernels as they behave on CPUs with and without AVX512F / AVX512-BF16.

Which CPU kind runs the suite is chance (CI machines differ), so every test whose outcome depends
on it runs under both kinds: the real kernel where this CPU is of that kind, a stand-in for the
other kind (see `bnb_dequant_kind`, `bnb_gemv_kind`; `test_bnb_cpu_kinds.py` checks each
stand-in against the real kernel on the CPUs that have it).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

from fms_acceleration.testing import save_tiny_model, tiny_dataset

DEQUANT_KINDS = ("avx512f", "no-avx512f")
GEMV_KINDS = ("avx512bf16", "no-avx512bf16")


# --- GPTQ: a decoder written independently of fms_acceleration_peft.gptq_format (arithmetic on
# unsigned words, not bit shifts on int32), and random layers -----------------------------------


def _unsigned(words: torch.Tensor) -> torch.Tensor:
    """int32 words as the unsigned values their bits spell (int64)."""
    return words.to(torch.int64) % (1 << 32)


def _code_at(words: torch.Tensor, position: torch.Tensor, bits: int) -> torch.Tensor:
    """The `position`-th `bits`-wide field of each word (int64)."""
    return torch.div(_unsigned(words), 2 ** (position * bits), rounding_mode="floor") % (1 << bits)


def _reference_weight(qweight, qzeros, scales, g_idx, bits: int, zero_offset: int) -> torch.Tensor:
    """W (in, out) in fp64: W[k, n] = scale[g, n] * (code[k, n] - zero[g, n]), g = g_idx[k]."""
    pack = 32 // bits
    k_in = g_idx.shape[0]
    n_out = scales.shape[1]
    rows = torch.arange(k_in)
    cols = torch.arange(n_out)
    codes = _code_at(qweight[rows // pack], (rows % pack)[:, None], bits)
    groups = g_idx.long()
    zeros = _code_at(qzeros[groups][:, cols // pack], (cols % pack)[None, :], bits) + zero_offset
    return scales.double()[groups] * (codes - zeros).double()


def _random_gptq_layer(
    in_features: int,
    out_features: int,
    bits: int,
    group_size: int,
    desc_act: bool,
    generator: torch.Generator,
    zero_offset: int = 1,
):
    """Random GPTQ tensors (qweight, qzeros, scales fp16, g_idx) of a valid layer."""
    from fms_acceleration_peft.gptq_format import GPTQLayout, pack_columns, pack_rows

    layout = GPTQLayout(in_features, out_features, bits, group_size, zero_offset)
    codes = torch.randint(0, layout.maxq + 1, (in_features, out_features), generator=generator)
    # stored zeros; with zero_offset 1 the largest stored value would read back as maxq + 1
    stored = torch.randint(0, layout.maxq, (layout.groups, out_features), generator=generator)
    scales = (torch.rand(layout.groups, out_features, generator=generator) * 0.02 + 0.002).half()
    g_idx = layout.default_g_idx()
    if desc_act:
        g_idx = g_idx[torch.randperm(in_features, generator=generator)]
    return pack_rows(codes, bits), pack_columns(stored, bits), scales, g_idx.to(torch.int32)


@pytest.fixture
def reference_weight():
    """The plain-torch GPTQ decoder: (qweight, qzeros, scales, g_idx, bits, zero_offset) -> W."""
    return _reference_weight


@pytest.fixture
def random_gptq_layer():
    """A factory of random GPTQ tensors (in, out, bits, group_size, desc_act, generator)."""
    return _random_gptq_layer


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    """A saved random-init tiny llama (fp32) with its tokenizer."""
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny_llama"), arch="llama", seed=0))


def calibration_file(directory) -> str:
    """Calibration text in the tiny tokenizer's words, so activations are not all <unk>."""
    path = directory / "calib.txt"
    rows = [" ".join(f"tok{(s + i) % 120}" for i in range(24)) for s in range(0, 96, 6)]
    path.write_text("\n".join(rows), encoding="utf-8")
    return str(path)


def quantize_with_cli(model_dir: str, output, calibration: str, *flags: str) -> str:
    """Run fms-acceleration-peft-quantize in a subprocess; the output directory."""
    command = [sys.executable, "-m", "fms_acceleration_peft.quantize", "--model", model_dir]
    command += ["--output", str(output), "--calibration", calibration, *flags]
    env = {**os.environ, "TORCH_COMPILE_DISABLE": "1"}  # inductor is slow on shared CPUs
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str(output)
    return str(output)


@pytest.fixture(scope="session")
def calibration_path(tmp_path_factory) -> str:
    """The calibration file every quantization fixture uses."""
    return calibration_file(tmp_path_factory.mktemp("calib"))


@pytest.fixture(scope="session")
def gptq_dir(tiny_llama_dir, calibration_path, tmp_path_factory) -> str:
    """The tiny llama quantized by our GPTQ to 4 bits (group 32, symmetric, column order)."""
    output = tmp_path_factory.mktemp("gptq") / "tiny-gptq"
    flags = ("--bits", "4", "--group-size", "32")
    return quantize_with_cli(tiny_llama_dir, output, calibration_path, *flags)


@pytest.fixture(scope="session")
def gptq_desc_act_dir(tiny_llama_dir, calibration_path, tmp_path_factory) -> str:
    """The tiny llama quantized by our GPTQ to 8 bits, groups of 16, asymmetric, desc_act."""
    output = tmp_path_factory.mktemp("gptq") / "tiny-gptq-8bit-desc-act"
    flags = ("--bits", "8", "--group-size", "16", "--asym", "--desc-act", "--dtype", "float16")
    return quantize_with_cli(tiny_llama_dir, output, calibration_path, *flags)


@pytest.fixture(scope="session")
def gptqmodel_dir(tiny_llama_dir, calibration_path, tmp_path_factory) -> str:
    """The tiny llama quantized by gptqmodel (through our CLI) like gptq_dir: 4 bits, group 32."""
    output = tmp_path_factory.mktemp("gptqmodel") / "tiny-gptqmodel"
    flags = ("--bits", "4", "--group-size", "32", "--quantizer", "gptqmodel")
    return quantize_with_cli(tiny_llama_dir, output, calibration_path, *flags)


@pytest.fixture
def lora_config():
    """A LoRA config on the attention projections (r=8) for a causal LM."""
    from peft import LoraConfig

    return LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        task_type="CAUSAL_LM",
    )


@pytest.fixture
def all_linear_lora_config():
    """LoRA (r=8) on every linear layer of the blocks: learns the tiny task in a few steps."""
    from peft import LoraConfig

    return LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        task_type="CAUSAL_LM",
    )


@pytest.fixture
def train_args(tmp_path):
    """A factory of CPU TrainingArguments for short seeded runs."""
    from transformers import TrainingArguments

    def make(**overrides):
        defaults = dict(
            output_dir=str(tmp_path / "out"),
            max_steps=12,
            per_device_train_batch_size=8,
            learning_rate=1e-2,
            lr_scheduler_type="constant",
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=0,
            disable_tqdm=True,
        )
        return TrainingArguments(**{**defaults, **overrides})

    return make


@pytest.fixture
def run_trainer():
    """Train `model` with `args` on one repeated batch of 8 rows; return the per-step losses."""
    from transformers import Trainer, default_data_collator

    def run(model, args, framework=None, n=8):
        torch.manual_seed(0)
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=tiny_dataset(n=n, seq_len=16),
            data_collator=default_data_collator,
        )
        if framework is not None:
            for callback in framework.get_callbacks_and_ready_for_train(model, trainer.accelerator):
                trainer.add_callback(callback)
        trainer.train()
        return [row["loss"] for row in trainer.state.log_history if "loss" in row]

    return run


def _cpu_has_avx512f() -> bool:
    from fms_acceleration_peft.bnb_dequant_check import cpu_has_avx512f

    return cpu_has_avx512f()


def _cpu_has_bnb_gemv_kernel() -> bool:
    """bnb registers its compiled CPU gemv_4bit only where the CPU has AVX512-BF16."""
    import bitsandbytes  # noqa: F401  (registers the kernels)

    return torch._C._dispatch_has_kernel_for_dispatch_key("bitsandbytes::gemv_4bit", "CPU")


@contextlib.contextmanager
def _cpu_kernel(op_name: str, kernel):
    """Route `bitsandbytes::<op_name>` on CPU tensors to `kernel` until exit (then bnb's own)."""
    with torch.library._scoped_library("bitsandbytes", "IMPL") as lib:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Overriding a previously registered"
            lib.impl(op_name, kernel, "CPU")
        yield


def _composite(op_name: str):
    """bnb's pure-torch "default" kernel of an op (CompositeExplicitAutograd)."""
    op = getattr(torch.ops.bitsandbytes, op_name).default
    key = torch._C.DispatchKey.CompositeExplicitAutograd
    return lambda *args: op._op_dk(key, *args)


def _goes_to_torch_fallback(blocksize: int, shape) -> bool:
    # bnb's CPU wrapper (backends/cpu/ops.py) sends these to its pure-torch kernel on any CPU.
    big_block = torch.backends.cpu.get_cpu_capability() == "AVX512" and blocksize >= 2048
    return shape[-1] % 2 != 0 or big_block


def _avx512f_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
    """Stand-in for bnb 0.50.2 on a CPU with AVX512F: its AVX512 branch (n % 16 == 0, blocksize
    >= 16) reads the scale of (row, col) at absmax[row * (n // blocksize) + col // blocksize]."""
    from bitsandbytes.functional import get_4bit_type

    if _goes_to_torch_fallback(blocksize, shape):
        return _composite("dequantize_4bit")(A, absmax, blocksize, quant_type, shape, dtype)
    rows, n = math.prod(shape[:-1]), shape[-1]
    data = A.reshape(-1).view(torch.uint8)
    codes = torch.stack((data >> 4, data & 0xF), dim=1).reshape(-1)[: rows * n].long()
    values = get_4bit_type(quant_type, device="cpu")[codes].view(rows, n)
    row, col = torch.arange(rows)[:, None], torch.arange(n)[None, :]
    if n % 16 == 0 and blocksize >= 16:
        block = row * (n // blocksize) + col // blocksize
    else:  # the scalar branch: flat blocks
        block = (row * n + col) // blocksize
    return (values * absmax.float()[block]).to(dtype).reshape(shape)


def _no_avx512f_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
    """Stand-in for bnb on a CPU without AVX512F: bnb's own native kernel, called on the weight
    as one row, indexes flat blocks exactly as its scalar branch does there."""
    from bitsandbytes.cextension import lib
    from bitsandbytes.functional import get_ptr

    if _goes_to_torch_fallback(blocksize, shape):
        return _composite("dequantize_4bit")(A, absmax, blocksize, quant_type, shape, dtype)
    suffix = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    native = getattr(lib, f"cdequantize_blockwise_cpu_{quant_type}_{suffix}")
    data = A.reshape(-1).view(torch.uint8).contiguous()
    absmax = absmax.float().contiguous()
    out = torch.empty(tuple(shape), dtype=dtype)
    numel = ctypes.c_longlong(math.prod(shape))
    native(get_ptr(data), get_ptr(absmax), get_ptr(out), ctypes.c_longlong(blocksize),
           ctypes.c_longlong(1), numel)  # fmt: skip
    return out


@pytest.fixture(params=DEQUANT_KINDS)
def bnb_dequant_kind(request) -> str:
    """bitsandbytes' CPU dequantize_4bit as on a CPU with ("avx512f") or without AVX512F."""
    kind = request.param
    if (kind == "avx512f") == _cpu_has_avx512f():
        yield kind  # this CPU is of that kind: bnb's real kernel
        return
    stand_in = _avx512f_dequantize_4bit if kind == "avx512f" else _no_avx512f_dequantize_4bit
    with _cpu_kernel("dequantize_4bit", stand_in):
        yield kind


def _avx512bf16_gemv_4bit(A, B, shapeB, absmax, code, blocksize):
    """Stand-in for bnb's compiled AVX512-BF16 gemv_4bit: reads the CPU repack layout right
    (bitsandbytes.functional._convert_weight_packed_for_cpu: [N, K/2] bytes, 32 rows x 2
    columns per 64 nibbles, absmax [K/blocksize, N]) but, as that kernel, unseen by autograd."""
    with torch.no_grad():
        n, k = shapeB
        packed = B.view(torch.uint8).reshape(-1, 32)
        nibbles = torch.cat((packed & 0xF, packed >> 4), dim=-1)
        codes = nibbles.reshape(n // 32, k // 2, 32, 2).transpose(1, 2).reshape(n, k).long()
        scales = absmax.float().t().repeat_interleave(blocksize, dim=1)[:, :k]
        weight = code.float()[codes] * scales
        return (A.float() @ weight.t()).to(A.dtype)


@pytest.fixture(params=GEMV_KINDS)
def bnb_gemv_kind(request, monkeypatch) -> str:
    """Linear4bit instances created from now on believe the CPU has AVX512-BF16 (so an eval
    forward repacks them), and bnb's CPU gemv_4bit is the compiled AVX512-BF16 kernel
    ("avx512bf16": right values, no autograd: LoRA gradients upstream become None) or, as on
    CPUs without it, bnb's pure-torch default ("no-avx512bf16": traced, but it misreads the
    packed layout)."""
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    kind = request.param
    if (kind == "avx512bf16") == _cpu_has_bnb_gemv_kernel():
        yield kind
        return
    stand_in = _avx512bf16_gemv_4bit if kind == "avx512bf16" else _composite("gemv_4bit")
    with _cpu_kernel("gemv_4bit", stand_in):
        yield kind


@pytest.fixture
def cpu_kinds() -> dict[str, bool]:
    """What this CPU is, as bitsandbytes sees it."""
    return {"avx512f": _cpu_has_avx512f(), "avx512bf16": _cpu_has_bnb_gemv_kernel()}


@pytest.fixture
def dequant_stand_ins():
    """The dequantize_4bit stand-ins by the kind they stand in for."""
    return {"avx512f": _avx512f_dequantize_4bit, "no-avx512f": _no_avx512f_dequantize_4bit}


@pytest.fixture
def gemv_stand_ins():
    """The gemv_4bit stand-ins by the kind they stand in for."""
    return {"avx512bf16": _avx512bf16_gemv_4bit, "no-avx512bf16": _composite("gemv_4bit")}
