"""Every sample configuration, applied to a tiny Llama and a real Trainer, changes only what its
patchers record, and `undo_patches()` puts back every forward, accelerator and Trainer method and
module-level function it changed (one training step runs in between)."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

SAMPLES = Path(__file__).resolve().parents[3] / "sample-configurations"
CONTENTS = SAMPLES / "CONTENTS.yaml"

if not CONTENTS.is_file():  # installed outside the monorepo: nothing to check
    pytest.skip("sample-configurations/ is not beside this checkout", allow_module_level=True)

ENTRIES = yaml.safe_load(CONTENTS.read_text())["framework_configs"]

# Where a plugin could patch a function or a class attribute: every loaded module of these.
# (torch's own internals are left out: dynamo rebinds nn.Module.__init__ the first time it runs.)
WATCHED_MODULES = ("transformers", "peft", "accelerate", "bitsandbytes", "gptqmodel")
WATCHED_EXACT = ("torch.nn.functional",)
LORA = dict(
    r=4,
    lora_alpha=8,
    lora_dropout=0.0,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    task_type="CAUSAL_LM",
)


def _watched(name: str) -> bool:
    return name in WATCHED_EXACT or name.split(".")[0] in WATCHED_MODULES


def _hub_function(value: Any) -> bool:
    """A module function that transformers 5.2x turned into a callable module instance for the
    kernels hub (`@use_kernel_forward_from_hub` on `apply_rotary_pos_emb`)."""
    return isinstance(value, torch.nn.Module) and hasattr(type(value), "kernel_layer_name")


def module_level_objects() -> dict[tuple[str, ...], Any]:
    """Every function (plain or hub-decorated) and class of the watched modules, the functions
    and descriptors of their classes, and the entries of their upper-case dict tables (e.g.
    LOSS_MAPPING), by location."""
    found: dict[tuple[str, ...], Any] = {}
    for name, module in list(sys.modules.items()):
        if module is None or not _watched(name):
            continue
        for attr, value in list(vars(module).items()):
            if inspect.isroutine(value) or inspect.isclass(value) or _hub_function(value):
                found[(name, attr)] = value
                if inspect.isclass(value) and value.__module__ == name:
                    for key, member in list(vars(value).items()):
                        if inspect.isroutine(member) or isinstance(
                            member, (staticmethod, classmethod, property)
                        ):
                            found[(name, attr, key)] = member
                        elif type(member) is dict:  # a class's table, e.g. attention functions
                            for entry, function in list(member.items()):
                                if inspect.isroutine(function):
                                    found[(name, attr, key, str(entry))] = function
            elif type(value) is dict and attr.isupper():  # not transformers' lazy mappings
                for key, member in list(value.items()):
                    if inspect.isroutine(member) or inspect.isclass(member):
                        found[(name, attr, str(key))] = member
    return found


def _hub_function(value: Any) -> bool:
    return callable(value) and type(value).__name__ == "Func"


def _location(target: str) -> tuple[tuple[str, ...], Any]:
    """(key in module_level_objects, object there now) of a dotted patch target: a module's
    attribute ('pkg.mod.f'), a class's own attribute ('pkg.mod.Class.attr') or an entry of a
    class's table ('pkg.mod.Class.TABLE.key')."""
    parts = target.split(".")
    split = max(i for i in range(1, len(parts)) if ".".join(parts[:i]) in sys.modules)
    owner: Any = sys.modules[".".join(parts[:split])]
    for part in parts[split:]:
        owner = owner[part] if isinstance(owner, dict) else vars(owner)[part]
    return (".".join(parts[:split]), *parts[split:]), owner


def changed_locations(before: dict, after: dict) -> set[str]:
    """Dotted locations whose object is another one now (locations new since are not compared)."""
    return {".".join(key) for key, value in before.items() if after.get(key, value) is not value}


def method_overrides(obj: Any) -> dict[str, Any]:
    """Instance attributes that shadow a method of the object's class."""
    return {k: v for k, v in vars(obj).items() if inspect.isroutine(getattr(type(obj), k, None))}


def instance_forward(module: torch.nn.Module) -> Any:
    """The forward set on this instance (None: its class's), seen through the wrapper accelerate
    puts around the trained model's forward for mixed precision."""
    attrs = vars(module)
    forward = attrs.get("_original_forward", attrs.get("forward"))
    if (
        inspect.ismethod(forward)
        and forward.__self__ is module
        and forward.__func__ is type(module).forward
    ):
        return None
    return forward


def recorded(patcher: Any, kind: str | None = None) -> list[Any]:
    return [r for r in patcher.history if kind is None or r.kind == kind]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> str:
    from fms_acceleration.testing import save_tiny_model

    return str(save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", arch="llama"))


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory) -> str:
    from fms_acceleration.testing import save_tiny_model

    return str(save_tiny_model(tmp_path_factory.mktemp("tiny") / "mixtral", arch="mixtral"))


@pytest.fixture(scope="module")
def gptq_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny Llama GPTQ-quantized (4 bits) by the accelerated-peft plugin's quantizer."""
    pytest.importorskip("gptqmodel")
    from fms_acceleration_peft.quantize import quantize_checkpoint

    work = tmp_path_factory.mktemp("gptq")
    calibration = work / "calibration.txt"
    # words of the tiny tokenizer, so that calibration activations differ
    words = [f"tok{i}" for i in range(120)]
    calibration.write_text("\n".join(" ".join(words[s : s + 24]) for s in range(0, 96, 6)))
    with torch._dynamo.config.patch(disable=True):
        return str(quantize_checkpoint(tiny_model_dir, work / "q", 4, 32, calibration))


@pytest.fixture(autouse=True)
def eager_gptq_dequantization():
    """gptqmodel torch.compiles its dequantization; inductor takes seconds per shape on CPU."""
    with torch._dynamo.config.patch(disable=True):
        yield


@pytest.fixture(scope="module", autouse=True)
def third_party_imports_done():
    """gptqmodel rebinds transformers and accelerate functions when it is first imported (peft
    imports it lazily): that is the environment every sample starts from, not a plugin's patch."""
    if importlib.util.find_spec("gptqmodel") is not None:
        importlib.import_module("gptqmodel")


def training_set(framework: Any, tiny_dataset: Any, tmp_path: Path) -> Any:
    """Two rows; under online data mixing, a mixer over two categories of two rows each (the
    plugin refuses any other training set)."""
    if "odm" not in framework.plugins:
        return tiny_dataset(n=2, seq_len=8)
    from fms_acceleration_odm import OnlineMixingDataset

    options = framework.plugins["odm"].options
    parts = {name: tiny_dataset(n=2, seq_len=8) for name in ("a", "b")}
    return OnlineMixingDataset(
        parts, None, parts, None, output_dir=tmp_path / "odm", **options.dataset_kwargs()
    )


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["shortname"] for e in ENTRIES])
def test_sample_is_undone_completely(entry, request, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        Trainer,
        TrainingArguments,
        default_data_collator,
    )

    from fms_acceleration import AccelerationFramework
    from fms_acceleration.testing import tiny_dataset

    path = SAMPLES / entry["filename"]
    plugins = yaml.safe_load(path.read_text())["plugins"]
    peft_stanzas = plugins.get("peft", {})
    loaders = {"bitsandbytes", "auto_gptq"} & set(peft_stanzas.get("quantization", {}))
    if "bitsandbytes" in loaders:
        pytest.importorskip("bitsandbytes")
    moe = plugins.get("training", {}).get("moe", {}).get("scattermoe")
    if moe is not None and moe.get("ep_degree", 1) > 1:
        pytest.skip("ep_degree > 1 shards experts over processes (accelerated-moe's torchrun test)")
    fixture = "gptq_model_dir" if "auto_gptq" in loaders else "tiny_model_dir"
    fixture = "tiny_moe_dir" if moe is not None else fixture
    model_dir = request.getfixturevalue(fixture)

    framework = AccelerationFramework(str(path))
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        per_device_train_batch_size=2,
        bf16=bool(loaders),  # quantized base layers (and fused LoRA on them) train in bf16
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    if framework.requires_custom_loading:
        model = framework.model_loader(model_dir, dtype=torch.bfloat16)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert framework.requires_custom_loading == bool(loaders)

    functions_before = module_level_objects()
    loaded = {id(m): (m, instance_forward(m)) for m in model.modules()}

    def original_forward(module: torch.nn.Module) -> Any:
        """What the module's own forward was when loaded (None for modules made since)."""
        return loaded.get(id(module), (module, None))[1]

    model, (peft_config,) = framework.augmentation(model, args, (LoraConfig(**LORA),))
    if peft_config is not None:
        model = get_peft_model(model, peft_config)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=training_set(framework, tiny_dataset, tmp_path),
        data_collator=default_data_collator,
    )
    accelerator = trainer.accelerator
    accelerator_before, trainer_before = method_overrides(accelerator), method_overrides(trainer)
    for callback in framework.get_callbacks_and_ready_for_train(model, accelerator, trainer):
        trainer.add_callback(callback)

    # Ready for train: what changed is exactly what the patchers recorded.
    names = {id(m): name or "<root>" for name, m in model.named_modules()}
    assert {
        names[id(m)] for m in model.modules() if instance_forward(m) is not original_forward(m)
    } == {names[r.instance] for r in recorded(framework.model_patcher, "forward")}
    assert changed_locations(functions_before, module_level_objects()) == {
        r.target for r in recorded(framework.model_patcher, "attribute")
    }
    assert set(method_overrides(accelerator)) - set(accelerator_before) == {
        r.module_name for r in recorded(framework.accelerator_patcher, "method")
    }
    assert set(method_overrides(trainer)) - set(trainer_before) == {
        r.module_name for r in recorded(framework.trainer_patcher, "method")
    }
    model_records = recorded(framework.model_patcher)
    # the kernels, padding-free and MoE patch the model; the schedule wraps prepare_optimizer
    assert bool(model_records) == bool(
        {"fused_ops_and_kernels", "padding_free", "scattermoe"} & set(framework.plugins)
    )
    # the schedule wraps prepare_optimizer, padding-free prepare (for its collator)
    wraps = bool({"finetuning_schedule", "padding_free"} & set(framework.plugins))
    assert bool(recorded(framework.accelerator_patcher)) == wraps

    trainer.train()
    assert trainer.state.global_step == 1
    framework.undo_patches()

    assert changed_locations(functions_before, module_level_objects()) == set()
    assert [
        name for name, m in model.named_modules() if instance_forward(m) is not original_forward(m)
    ] == []
    assert method_overrides(accelerator) == accelerator_before
    assert method_overrides(trainer) == trainer_before
    for rule in framework.model_patcher.rules.values():
        if rule.is_import_rule:
            target = rule.import_and_maybe_reload[0]
            key, current = _location(target)
            assert functions_before[key] is current, target
