"""The training job: LoRA fine-tuning with transformers.Trainer, driven by the framework."""

from __future__ import annotations

import os
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, ConfigDict, Field

from fms_acceleration import choice
from fms_acceleration.compat import dtype_kwargs
from fms_acceleration.packages import installed_versions

from .data import Example, PaddingCollator, load_jsonl, pad_token_id, tokenize
from .errors import TrainJobError, require
from .eval_and_checkpoints import (
    eval_steps_need_a_split,
    resolve_resume,
    schedule_arguments,
    split_for_evaluation,
)
from .evaluation import answer_accuracy
from .flags import Flag, FlagModel
from .mixture_training import HeldOutCurve, plan_mixture
from .preflight import (
    check_checkpoint,
    check_model_dir,
    check_output_dir,
    folder_problem,
    resolve_output_dir,
)
from .summary import TrainSummary, peak_memory_mib

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
DEFAULT_DATASET = "built-in (sentiment / category / opposite, one-word answers)"
# the libraries a run's figures depend on; the active plugins' packages are added per run
_LIBRARIES = (
    "torch", "transformers", "peft", "accelerate", "triton", "bitsandbytes", "gptqmodel",
    "fms-acceleration", "fms-acceleration-train",
)  # fmt: skip


def _versioned(framework: Any) -> tuple[str, ...]:
    """Packages whose versions the summary records: the libraries and the active plugins'."""
    active = framework.plugins.values() if framework is not None else ()
    return (*_LIBRARIES, *dict.fromkeys(p._registration.package_name for p in active))


def _existing_file(value: str | None) -> str | None:
    if value is not None and not Path(value).is_file():
        raise ValueError("file not found")
    return value


def _folder_can_be_made(value: str | None) -> str | None:
    problem = None if value is None else folder_problem(Path(value))
    if problem is not None:
        raise ValueError(problem)
    return value


Positive = Field(gt=0)
_BUILT_IN_ACCELERATION = "the built-in padding-free training with fused linear cross-entropy"


class TrainJobConfig(FlagModel):
    """Options of `fms-acceleration train`, each also its flag (`--` + the name with dashes).

    Errors name the flag: `--max-steps: 0 must be greater than 0.`
    """

    model_config = ConfigDict(frozen=True)
    error_type = TrainJobError

    # None: no acceleration (on the command line: the built-in one, unless --no-acceleration)
    acceleration_config: Annotated[
        str | None,
        AfterValidator(_existing_file),
        Flag(metavar="FILE", default=_BUILT_IN_ACCELERATION),
    ] = None
    """framework YAML (a sample-configurations/*.yaml)"""
    model: Annotated[
        str | None, Flag(metavar="DIR", default="the embedded SmolLM2-135M-Instruct")
    ] = None
    """local HF model directory; smollm2-moe: the embedded model up-cycled into 8 experts,
    top-2 (a Mixtral, built once)"""
    dataset: Annotated[
        str | None,
        Flag(
            metavar="JSONL",
            default="a built-in dataset whose held-out prompts measure answer accuracy before "
            "and after training",
        ),
    ] = None
    """{"prompt": ..., "response": ...} per line"""
    output_dir: Annotated[
        str | None,
        AfterValidator(_folder_can_be_made),
        Flag(metavar="DIR", default="a new outputs/train/run-<UTC time> folder"),
    ] = None
    """adapter and summary go here"""
    max_steps: Annotated[int, Positive] = 40
    """optimizer steps"""
    batch_size: Annotated[int, Positive] = 8
    """examples per step"""
    seq_len: Annotated[int, Field(ge=8)] = 128
    """max tokens per example"""
    learning_rate: Annotated[float, Positive] = 1e-3
    """peak learning rate"""
    lora_r: Annotated[int, Positive] = 8
    """LoRA rank"""
    lora_alpha: int = 16
    """LoRA scale"""
    lora_dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    """LoRA dropout"""
    target_modules: Annotated[tuple[str, ...], Field(min_length=1)] = DEFAULT_TARGET_MODULES
    """modules that get LoRA adapters"""
    full_finetuning: bool = False
    """train all parameters (or those a plugin such as finetuning_schedule thaws) instead of
    LoRA adapters; saves the whole model"""
    overwrite: bool = False
    """write into a non-empty --output-dir, replacing the results there"""
    dtype: choice("auto", "float32", "bfloat16", "float16") = "auto"
    """auto: bfloat16 on GPU, float32 on CPU"""
    cpu_threads: Annotated[int, Field(ge=0)] = 0
    """torch threads on CPU; 0: $OMP_NUM_THREADS, else half the logical CPUs"""
    seed: Annotated[int, Field(ge=0)] = 42
    """data order and LoRA init"""
    evaluate: Annotated[bool, Flag(name="--no-eval")] = True
    """check answer accuracy on the held-out prompts before and after training"""
    eval_max_new_tokens: Annotated[int, Positive] = 6
    """tokens generated per held-out answer"""
    log_every: Annotated[int, Positive] = 5
    """print the loss every N steps"""
    # --- evaluation split, periodic evaluation and checkpoints, resume (eval_and_checkpoints.py)
    eval_split: Annotated[float, Field(ge=0.0, lt=1.0), Flag(metavar="FRACTION")] = 0.0
    """hold out this fraction of the training examples to report eval_loss on"""
    eval_steps: Annotated[
        int | None,
        Positive,
        AfterValidator(eval_steps_need_a_split),
        Flag(default="once per epoch"),
    ] = None
    """evaluate every N steps"""
    save_steps: Annotated[int | None, Positive] = None
    """save a checkpoint every N steps"""
    resume_from_checkpoint: Annotated[str | None, Flag(metavar="DIR|last")] = None
    """continue from a checkpoint-N folder, or 'last': the newest one in --output-dir (without
    --output-dir: in the newest run under outputs/train)"""
    allow_partial_resume: bool = False
    """resume even if the checkpoint lacks the optimizer or scheduler state (the run then
    differs from an uninterrupted one)"""
    uniform_mixture: bool = False
    """train on the uniform mixture of the built-in domains (what --compare runs as the
    baseline of an online-data-mixing configuration; mixture_training.py)"""


def with_run_folder(config: TrainJobConfig) -> TrainJobConfig:
    """`config` with its output folder chosen (a new run folder when none was given)."""
    folder = resolve_output_dir(config.output_dir, config.resume_from_checkpoint)
    return config.model_copy(update={"output_dir": str(folder)})


def _load_examples(config: TrainJobConfig) -> tuple[list[Example], list[Example], str]:
    """(train, held_out, description); held-out prompts exist only for the built-in dataset."""
    if config.dataset is None:
        from .default_dataset import default_splits

        train, held = default_splits()
        return train, (held if config.evaluate else []), DEFAULT_DATASET
    return load_jsonl(config.dataset), [], str(config.dataset)


def _torch_dtype(name: str, device_type: str) -> Any:
    import torch

    if name == "auto":
        # bf16 on GPU; fp32 on CPU, where bf16 matmuls are slow or emulated on many chips.
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    return getattr(torch, name)


def _cpu_threads(requested: int) -> int:
    """Torch threads on CPU: as asked, else $OMP_NUM_THREADS, else half the logical CPUs.

    Half, because on shared or hyper-threaded machines one thread per logical CPU was measured
    2.6x slower per step than half as many (2-vCPU machine, default job).
    """
    if requested:
        return requested
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, (os.cpu_count() or 2) // 2)


def _plugin_names(framework: Any) -> list[str]:
    """Ids of the active plugins, in run order."""
    return list(framework.plugins)


def process_started() -> float:
    """Wall-clock time this process started (the command, for the job's start-up time)."""
    import psutil

    return psutil.Process().create_time()


def _make_callbacks(log_every: int, losses: list[float]) -> tuple[Any, Any]:
    """(loss recorder, progress bar that prints the loss every `log_every` steps)."""
    from transformers import ProgressCallback, TrainerCallback

    class LossRecorder(TrainerCallback):
        first_step_at: float | None = None  # wall-clock time the first step began

        def on_step_begin(self, args, state, control, **kwargs):
            if self.first_step_at is None:
                self.first_step_at = time.time()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    class SparseProgress(ProgressCallback):
        # logging_steps is 1 so every step's loss is recorded; print only some of them.
        def on_log(self, args, state, control, logs=None, **kwargs):
            last = state.global_step >= state.max_steps
            if logs and ("loss" not in logs or state.global_step % log_every == 0 or last):
                super().on_log(args, state, control, logs=logs, **kwargs)

    return LossRecorder(), SparseProgress()


def _build_model(model_dir: Path, framework: Any, dtype: Any) -> Any:
    from transformers import AutoModelForCausalLM

    if framework is not None and framework.requires_custom_loading:
        return framework.model_loader(str(model_dir), dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(model_dir, **dtype_kwargs(dtype))


def _place(model: Any, device_type: str) -> Any:
    # Quantized or device-mapped models were placed by their loader; move only plain ones.
    quantized = getattr(model, "is_quantized", False) or getattr(model, "hf_device_map", None)
    if device_type == "cuda" and not quantized:
        model = model.to("cuda")
    return model


def _training_arguments(config: TrainJobConfig, dtype: Any, device_type: str) -> Any:
    """TrainingArguments of the job: per-step loss logging, no checkpoints."""
    import torch
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=config.output_dir,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(5, config.max_steps // 5),
        logging_steps=1,
        **schedule_arguments(
            config.eval_steps, config.save_steps, config.eval_split > 0, config.batch_size
        ),
        report_to="none",
        seed=config.seed,
        data_seed=config.seed,
        use_cpu=device_type == "cpu",
        # Half-precision weights train under autocast of the same type (plugins such as the
        # fused LoRA kernels on quantized layers require mixed precision).
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        dataloader_num_workers=0,
    )


def _lora_config(config: TrainJobConfig) -> Any:
    """The LoRA config handed to the framework (None for full fine-tuning)."""
    if config.full_finetuning:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        task_type="CAUSAL_LM",
    )


def run_train_job(config: TrainJobConfig, framework: Any = None) -> TrainSummary:
    """Fine-tune with LoRA through the framework; write the adapter and train_summary.json.

    `framework` (an AccelerationFramework) is used as given instead of one built from
    `config.acceleration_config`, e.g. one made by fms_acceleration.testing.build_framework.
    """
    for name, pip_name in (("torch", "torch"), ("transformers", "transformers>=4.55")):
        require(name, pip_name, purpose="fms-acceleration train")
    require("peft", "peft", purpose="LoRA fine-tuning in fms-acceleration train")

    import torch
    from peft import get_peft_model
    from transformers import AutoTokenizer, ProgressCallback, Trainer, set_seed

    from .interrupt import TrainingInterrupted, checkpoint_on_interrupt
    from .model_source import resolve_model
    from .token_count import TrainingTokenCounter

    config = with_run_folder(config)
    output_dir = Path(config.output_dir)
    check_output_dir(output_dir, config.overwrite, config.resume_from_checkpoint is not None)
    train, held_out, dataset_name = _load_examples(config)
    train, evaluation = split_for_evaluation(train, config.eval_split, config.seed)
    resume = resolve_resume(config.resume_from_checkpoint, output_dir)
    if resume is not None:
        check_checkpoint(Path(resume), config.allow_partial_resume)
    model_dir, embedded = resolve_model(config.model)
    check_model_dir(model_dir)
    if framework is None and config.acceleration_config is not None:
        from fms_acceleration import AccelerationFramework

        framework = AccelerationFramework(config.acceleration_config)
    mixture = plan_mixture(config, framework)
    if mixture is not None:
        # held-out losses per domain measure it; the generated-answer check is left out
        held_out, dataset_name = [], mixture.description

    set_seed(config.seed)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = _torch_dtype(config.dtype, device_type)
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        torch.set_num_threads(_cpu_threads(config.cpu_threads))

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = tokenize(train, tokenizer, config.seq_len)
    model = _place(_build_model(model_dir, framework, dtype), device_type)

    before = answer_accuracy(model, tokenizer, held_out, config.eval_max_new_tokens)

    # whatever happens, leave the process's modules (e.g. attention functions) as they were
    with ExitStack() as undo:
        if framework is not None:
            undo.callback(framework.undo_patches)
        args = _training_arguments(config, dtype, device_type)
        peft_config = _lora_config(config)
        if framework is not None and framework.requires_augmentation:
            model, (peft_config,) = framework.augmentation(
                model, args, modifiable_args=(peft_config,)
            )
        if peft_config is not None:
            try:
                model = get_peft_model(model, peft_config)
            except ValueError as e:
                raise TrainJobError(f"--target-modules {list(config.target_modules)}: {e}") from e
        # else: full fine-tuning, or a plugin (e.g. quantized peft) put the LoRA layers in itself.
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if trainable == 0:
            raise TrainJobError("the model has no trainable parameters after augmentation")

        losses: list[float] = []
        train_dataset: Any = rows
        eval_dataset: Any = tokenize(evaluation, tokenizer, config.seq_len) if evaluation else None
        if mixture is not None:
            train_dataset, eval_dataset = mixture.datasets(
                tokenizer, config.seq_len, config.output_dir, config.seed
            )
            mixture.evaluation_arguments(args, config.log_every, config.batch_size)
            curve = HeldOutCurve(list(eval_dataset))
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=PaddingCollator(pad_token_id(tokenizer)),
        )
        if mixture is not None:
            trainer.add_callback(curve.callback())
        recorder, progress = _make_callbacks(config.log_every, losses)
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(progress)
        trainer.add_callback(recorder)
        if framework is not None:
            for callback in framework.get_callbacks_and_ready_for_train(
                model, trainer.accelerator, trainer=trainer
            ):
                trainer.add_callback(callback)

        counter = TrainingTokenCounter(model)
        undo.callback(counter.remove)
        with checkpoint_on_interrupt() as interrupt:
            trainer.add_callback(interrupt)
            result = trainer.train(resume_from_checkpoint=resume)
        if interrupt.requested:
            raise TrainingInterrupted(interrupt.outcome(config.max_steps))
        runtime = float(result.metrics["train_runtime"])
        tokens = counter.tokens
        peak, peak_kind = peak_memory_mib(device_type)

        after = answer_accuracy(model, tokenizer, held_out, config.eval_max_new_tokens)

        # A LoRA run saves the adapter; full fine-tuning saves the whole model.
        saved_to = output_dir / ("adapter" if hasattr(model, "peft_config") else "model")
        if hasattr(model, "peft_config"):
            model.save_pretrained(saved_to)
        else:
            trainer.save_model(str(saved_to))

        summary = TrainSummary(
            model=f"{model_dir}" + (" (embedded SmolLM2-135M-Instruct)" if embedded else ""),
            dataset=dataset_name,
            acceleration_config=config.acceleration_config,
            active_plugins=_plugin_names(framework) if framework is not None else [],
            device=torch.cuda.get_device_name() if device_type == "cuda" else "cpu",
            dtype=str(dtype).removeprefix("torch."),
            cpu_threads=torch.get_num_threads() if device_type == "cpu" else 0,
            max_steps=config.max_steps,
            steps=int(trainer.state.global_step),
            batch_size=config.batch_size,
            seq_len=config.seq_len,
            train_examples=len(rows),
            train_tokens=tokens,
            # enough digits that tokens / runtime reproduces tokens/s even for sub-second runs
            train_runtime_s=round(runtime, 6),
            train_tokens_per_s=round(tokens / runtime, 2) if runtime > 0 else 0.0,
            peak_memory_mib=round(peak, 1),
            peak_memory_kind=peak_kind,
            first_loss=losses[0] if losses else float("nan"),
            last_loss=losses[-1] if losses else float("nan"),
            losses=losses,
            trainable_params=trainable,
            saved_to=str(saved_to),
            versions=installed_versions(_versioned(framework)),
            startup_s=round(recorder.first_step_at - process_started(), 1)
            if recorder.first_step_at is not None
            else 0.0,
        )
        if held_out:
            summary.accuracy_before = before.value
            summary.accuracy_after = after.value
            summary.eval_examples = before.total
            summary.eval_samples = [
                {"prompt": prompt, "expected": expected, "before": b[2], "after": answer}
                for (prompt, expected, answer), b in zip(after.samples, before.samples)
            ]
        if mixture is not None:
            summary.train_examples = mixture.train_examples()
            summary.heldout_losses = curve.points
            summary.data_mixing = mixture.report(train_dataset, framework)
        summary.write(output_dir)
    return summary
