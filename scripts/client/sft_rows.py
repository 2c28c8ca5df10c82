"""The rows of the client matrix: each acceleration fms-hf-tuning documents that runs on a CPU,
spelled with the client's own flags, and the run its losses must match."""

from __future__ import annotations

from dataclasses import dataclass

# optimizer steps per run: enough to see the losses of two runs drift apart, cheap on a CPU
STEPS = 5
# what every run passes: a few seeded steps, one loss logged per step, no checkpoints, sdpa
# attention (the client's padding-free check wants use_flash_attn; sdpa is what a CPU has)
COMMON_FLAGS = (
    "--max_steps", str(STEPS),
    "--per_device_train_batch_size", "4",
    "--learning_rate", "1e-2",
    "--logging_strategy", "steps",
    "--logging_steps", "1",
    "--save_strategy", "no",
    "--seed", "42",
    "--data_seed", "42",
    "--use_flash_attn", "True",
    "--flash_attn_implementation", "sdpa",
    "--use_cpu", "True",
)  # fmt: skip
FP32 = ("--torch_dtype", "float32")
# fused LoRA on a quantized base trains only in mixed precision; bf16 is the CPU's half type
BF16 = ("--torch_dtype", "bfloat16", "--bf16", "True")
LORA = (
    "--peft_method", "lora",
    "--r", "8",
    "--lora_alpha", "16",
    "--lora_dropout", "0.0",
    "--target_modules", "q_proj", "k_proj", "v_proj", "o_proj",
)  # fmt: skip
FAST_KERNELS = ("--fast_kernels", "True", "True", "True")
PADDING_FREE = ("--padding_free", "huggingface")


# the models a row can train (sft_fixtures builds them): the tiny Llama, its GPTQ checkpoint
# made with our quantizer, and a tiny Mixtral for the MoE rows
BASES = ("llama", "gptq", "mixtral")


@dataclass(frozen=True)
class Check:
    """How a row's losses must match those of the row named `against`.

    `per_step`: every step's loss within `rtol` of the same step there (the same batches);
    otherwise only the first and the last loss (other batches, or quantized weights).
    """

    against: str
    rtol: float
    per_step: bool = True


@dataclass(frozen=True)
class Row:
    """One run of `python -m tuning.sft_trainer`: its flags and what it must show."""

    name: str
    flags: tuple[str, ...]
    plugins: frozenset[str] = frozenset()
    """the plugin classes the client must report active ("Active Plugin: <class>")"""
    check: Check | None = None
    base: str = "llama"
    """the model it trains: one of BASES"""


# Tolerances (relative). The client logs losses to 4 decimals (1e-5 of a loss near 4.9); a
# packed batch whose examples attend to each other moves this model's loss by about 3e-3.
FP32_STEP = 5e-4
# bf16 rounding, on CPUs with and without AVX512-BF16 (fused vs unfused measured 2.3e-4)
BF16_STEP = 2e-3
# 4-bit weights of a random model vs the bf16 LoRA run (nf4 and fp4 measured at most 5.5e-4)
QUANTIZED = 0.01
# multipack's batches are other batches of the same examples (first and last loss only)
OTHER_BATCHES = 0.02

_PEFT = "BNBAccelerationPlugin"
_GPTQ = "AutoGPTQAccelerationPlugin"
_FOAK = "FastKernelsAccelerationPlugin"
_PADDING_FREE = "PaddingFreeAccelerationPlugin"
_MULTIPACK = "MultipackDataloaderAccelerationPlugin"
_MOE = "ScatterMoEAccelerationPlugin"

ROWS: tuple[Row, ...] = (
    Row("full", FP32),
    Row("padding-free", FP32 + PADDING_FREE, frozenset({_PADDING_FREE}), Check("full", FP32_STEP)),
    Row(
        "multipack",
        FP32 + PADDING_FREE + ("--multipack", "16"),
        frozenset({_PADDING_FREE, _MULTIPACK}),
        Check("padding-free", OTHER_BATCHES, per_step=False),
    ),
    Row("fast-kernels", FP32 + FAST_KERNELS, frozenset({_FOAK}), Check("full", FP32_STEP)),
    Row("lora", FP32 + LORA),
    Row(
        "fast-kernels-lora",
        FP32 + LORA + FAST_KERNELS,
        frozenset({_FOAK}),
        Check("lora", FP32_STEP),
    ),
    Row("lora-bf16", BF16 + LORA),
    Row(
        "qlora-nf4",
        BF16 + LORA + ("--bnb_qlora", "nf4"),
        frozenset({_PEFT}),
        Check("lora-bf16", QUANTIZED, per_step=False),
    ),
    Row(
        "qlora-fp4",
        BF16 + LORA + ("--bnb_qlora", "fp4"),
        frozenset({_PEFT}),
        Check("lora-bf16", QUANTIZED, per_step=False),
    ),
    # the client's documented QLoRA acceleration: fused LoRA over bnb plus the fast kernels
    Row(
        "fused-lora-nf4",
        BF16 + LORA + ("--bnb_qlora", "nf4", "--fused_lora", "bitsandbytes", "True") + FAST_KERNELS,
        frozenset({_PEFT, _FOAK}),
        Check("qlora-nf4", BF16_STEP),
    ),
    Row(
        "gptq-lora",
        BF16 + LORA + ("--auto_gptq", "triton_v2"),
        frozenset({_GPTQ}),
        Check("lora-bf16", QUANTIZED, per_step=False),
        base="gptq",
    ),
    Row(
        "fused-lora-gptq",
        BF16
        + LORA
        + ("--auto_gptq", "triton_v2", "--fused_lora", "auto_gptq", "True")
        + FAST_KERNELS,
        frozenset({_GPTQ, _FOAK}),
        Check("gptq-lora", BF16_STEP),
        base="gptq",
    ),
    Row("moe-full", FP32, base="mixtral"),
    # ScatterMoE on one process (ep_degree 1): grouped expert GEMMs in place of the expert loop
    Row(
        "fast-moe",
        (*FP32, "--fast_moe", "1"),
        frozenset({_MOE}),
        Check("moe-full", FP32_STEP),
        base="mixtral",
    ),
)


def rows_by_name(rows: tuple[Row, ...] = ROWS) -> dict[str, Row]:
    """The rows by name; a duplicate name, an unknown base, or a check against a missing or later
    row raises ValueError."""
    named: dict[str, Row] = {}
    for row in rows:
        if row.name in named:
            raise ValueError(f"row {row.name!r} is defined twice")
        if row.base not in BASES:
            raise ValueError(f"row {row.name!r}: base {row.base!r} is not one of {BASES}")
        if row.check is not None and row.check.against not in named:
            raise ValueError(
                f"row {row.name!r} checks against {row.check.against!r}, which is not an "
                "earlier row"
            )
        named[row.name] = row
    return named
