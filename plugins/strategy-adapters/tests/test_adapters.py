"""Name, schedule and state-dict translation of each built-in adapter."""

from __future__ import annotations

import math
import types

import pytest
import torch

from fms_acceleration_adapters import (
    DDPStrategyAdapter,
    FSDPStrategyAdapter,
    PeftStrategyAdapter,
    StrategyAdapter,
    StrategyAdapterError,
    peft_logical_name,
)

LORA_SUFFIXES = ("lora_A.weight", "lora_B.weight")
PEFT_ONLY = (*LORA_SUFFIXES, "original_module.weight")  # logical names with no base-model twin


# ------------------------------------------------------------------ base / single device
def test_options_are_checked():
    with pytest.raises(StrategyAdapterError) as info:
        StrategyAdapter(phase_sze=3)
    assert str(info.value) == (
        "strategy_adapter_cfg.phase_sze: unknown key 'phase_sze' (did you mean 'phase_size'?); "
        "allowed keys: peft, peft_adapter_name, phase_size. (adapter 'single_device', "
        "StrategyAdapter)"
    )
    with pytest.raises(
        StrategyAdapterError,
        match=r"strategy_adapter_cfg.phase_size: expected an integer, got bool true",
    ):
        StrategyAdapter(phase_size=True)
    with pytest.raises(
        StrategyAdapterError, match=r"strategy_adapter_cfg.phase_size: 0 must be greater than or"
    ):
        StrategyAdapter(phase_size=0)
    with pytest.raises(
        StrategyAdapterError,
        match=r"sync_thawed_grads: expected a boolean \(true/false\), got str 'yes'.*'ddp'",
    ):
        DDPStrategyAdapter(sync_thawed_grads="yes")
    # options of base classes are inherited, subclass options are not leaked upwards
    assert DDPStrategyAdapter(phase_size=3).cfg["phase_size"] == 3
    with pytest.raises(StrategyAdapterError, match="unknown key 'sync_thawed_grads'"):
        StrategyAdapter(sync_thawed_grads=True)
    # each adapter gets its own dict of options
    first, second = StrategyAdapter(), StrategyAdapter()
    first.cfg["phase_size"] = 7
    assert second.cfg["phase_size"] == 2


def test_single_device_names_and_default_schedule(llama):
    adapter = StrategyAdapter()
    names = [n for n, _ in llama.named_parameters()]
    assert adapter.schedule_param_names(llama) == names
    assert [p for _, p in adapter.named_parameters(llama)] == list(llama.parameters())
    schedule = adapter.gen_default_schedule(llama)
    assert len(schedule) == math.ceil(len(names) / 2)
    assert schedule[0] == {"params": ["lm_head.weight", "model.norm.weight"]}
    assert [n for phase in schedule.values() for n in phase["params"]] == names[::-1]
    assert all(len(phase["params"]) == 2 for phase in list(schedule.values())[:-1])
    three = StrategyAdapter(phase_size=3).gen_default_schedule(llama)
    assert len(three) == math.ceil(len(names) / 3)


def test_unknown_name_suggests_close_match(llama):
    adapter = StrategyAdapter()
    with pytest.raises(StrategyAdapterError, match=r"'model\.norm\.weigth'.*'model\.norm\.weight'"):
        adapter.actual_param_name("model.norm.weigth", llama)
    with pytest.raises(StrategyAdapterError, match=r"'lm_head\.bias'"):
        adapter.params_for_names(["lm_head.weight", "lm_head.bias"], llama)


def test_compiled_model_names(llama):
    compiled = torch.compile(llama)  # lazy: nothing is compiled until the first call
    adapter = StrategyAdapter()
    actual = [n for n, _ in compiled.named_parameters()]
    assert actual[0].startswith("_orig_mod.")
    assert adapter.schedule_param_names(compiled) == [n for n, _ in llama.named_parameters()]
    assert adapter.actual_param_name("model.norm.weight", compiled) == "_orig_mod.model.norm.weight"
    logical = adapter.to_logical_state_dict(compiled.state_dict())
    assert list(logical) == list(llama.state_dict())
    assert list(adapter.from_logical_state_dict(logical, compiled)) == list(compiled.state_dict())
    assert list(adapter.before_restore_model(compiled.state_dict())) == list(llama.state_dict())
    with pytest.raises(StrategyAdapterError, match=r"both restore 'model\.norm\.weight'"):
        adapter.before_restore_model({"_orig_mod.model.norm.weight": 1, "model.norm.weight": 2})


# ------------------------------------------------------------------ DDP
def test_ddp_names_and_state_dict(llama, process_group):
    ddp = torch.nn.parallel.DistributedDataParallel(llama)
    adapter = DDPStrategyAdapter()
    assert all(n.startswith("module.") for n, _ in ddp.named_parameters())
    pairs = adapter.named_parameters(ddp)
    assert [n for n, _ in pairs] == [n for n, _ in llama.named_parameters()]
    assert all(p is q for (_, p), q in zip(pairs, llama.parameters()))
    assert adapter.actual_param_name("model.layers.1.mlp.up_proj.weight", ddp) == (
        "module.model.layers.1.mlp.up_proj.weight"
    )
    logical = adapter.to_logical_state_dict(ddp.state_dict())
    assert list(logical) == list(llama.state_dict())
    restored = adapter.from_logical_state_dict(logical, ddp)
    assert list(restored) == list(ddp.state_dict())
    # one process: there is nothing to average, so no hooks are registered
    adapter.on_params_thawed(ddp, list(llama.parameters())[:2])
    assert adapter.synced_param_count == 0


def test_ddp_over_peft_uses_base_names(peft_llama, process_group):
    base_names, model = peft_llama
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    names = DDPStrategyAdapter().schedule_param_names(ddp)
    assert [n for n in names if not n.endswith(PEFT_ONLY)] == base_names
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in names


# ------------------------------------------------------------------ FSDP
def test_fsdp1_with_checkpointing_names(llama, process_group):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
    )
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    plain = [n for n, _ in llama.named_parameters()]
    llama_keys = list(llama.state_dict())
    apply_activation_checkpointing(llama, check_fn=lambda m: isinstance(m, LlamaDecoderLayer))
    with pytest.warns(UserWarning, match="NO_SHARD"):
        fsdp = FullyShardedDataParallel(
            llama,
            auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
            use_orig_params=True,
            device_id=torch.device("cpu"),
        )
    adapter = FSDPStrategyAdapter()
    actual = "_fsdp_wrapped_module.model.layers.0._checkpoint_wrapped_module._fsdp_wrapped_module"
    assert f"{actual}.self_attn.q_proj.weight" in dict(fsdp.named_parameters())
    assert adapter.schedule_param_names(fsdp) == plain
    assert adapter.actual_param_name("model.layers.0.self_attn.q_proj.weight", fsdp) == (
        f"{actual}.self_attn.q_proj.weight"
    )
    adapter.validate_schedule({0: {"params": plain[:1]}, 1: {"params": plain[1:2]}}, fsdp)
    # FSDP1 state dicts use clean keys both ways
    logical = adapter.to_logical_state_dict(fsdp.state_dict())
    assert set(logical) == set(llama_keys)
    torch.manual_seed(2)
    new = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in logical.items()}
    result = fsdp.load_state_dict(adapter.from_logical_state_dict(new, fsdp))
    assert result.missing_keys == [] and result.unexpected_keys == []
    with FullyShardedDataParallel.summon_full_params(fsdp):
        q = fsdp.module.model.layers[0].self_attn.q_proj.weight
        torch.testing.assert_close(q, new["model.layers.0.self_attn.q_proj.weight"])
    # a checkpoint saved from the wrapped module (wrapper names) restores into the plain model
    wrapped_ckpt = {f"{actual}.mlp.up_proj.weight": torch.ones(128, 64)}
    assert list(adapter.before_restore_model(wrapped_ckpt)) == ["model.layers.0.mlp.up_proj.weight"]


def test_fsdp1_without_orig_params_refuses_phases(llama, process_group):
    from torch.distributed.fsdp import FullyShardedDataParallel

    with pytest.warns(UserWarning, match="NO_SHARD"):
        fsdp = FullyShardedDataParallel(llama, use_orig_params=False, device_id=torch.device("cpu"))
    adapter = FSDPStrategyAdapter()
    adapter.validate_schedule({0: {"params": ["lm_head.weight"]}}, fsdp)
    with pytest.raises(StrategyAdapterError, match="fsdp_use_orig_params: true"):
        adapter.validate_schedule({0: {"params": []}, 1: {"params": []}}, fsdp)


def test_fsdp_connect_checks_accelerate_plugin():
    def accelerator(version, use_orig_params):
        plugin = types.SimpleNamespace(fsdp_version=version, use_orig_params=use_orig_params)
        return types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin))

    adapter = FSDPStrategyAdapter()
    adapter.connect("client", accelerator(2, False))
    adapter.connect("client", accelerator(1, True))
    assert adapter.parent == "client" and adapter.accelerator.state.fsdp_plugin.fsdp_version == 1
    with pytest.raises(StrategyAdapterError, match="fsdp_use_orig_params: true"):
        adapter.connect("client", accelerator(1, False))


def test_fsdp_name_strings():
    adapter = FSDPStrategyAdapter()
    name = "module._fsdp_wrapped_module.model.layers.3._checkpoint_wrapped_module.mlp.module.w"
    # a leading "module." is a wrapper; an inner module named "module" is the model's own
    assert adapter.logical_param_name(name) == "model.layers.3.mlp.module.w"


@pytest.mark.parametrize("param_dtype", [None, torch.bfloat16])
def test_fsdp2_thaw_frozen_group_mid_training(llama, process_group, param_dtype):
    """A fully_shard group that is frozen at lazy init trains once thawed.

    With mixed precision, FSDP2 without the adapter fails here ("attempting to assign a gradient
    with dtype BFloat16 to a tensor with grad_dtype Float").
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in llama.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(llama, mp_policy=mp)
    adapter = FSDPStrategyAdapter()
    params = dict(adapter.named_parameters(llama))
    assert list(params) == [n for n, _ in llama.named_parameters()]
    for name, param in params.items():
        param.requires_grad_(name.startswith("lm_head"))
    ids = torch.randint(4, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    llama(input_ids=ids, labels=ids).loss.backward()
    layer1 = [p for n, p in params.items() if n.startswith("model.layers.1.")]
    assert all(p.grad is None for p in layer1)
    for p in layer1:
        p.requires_grad_(True)
    adapter.on_params_thawed(llama, layer1)
    llama(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in layer1]
    assert all(g is not None and g.full_tensor().abs().sum() > 0 for g in grads)
    assert all(g.dtype == torch.float32 for g in grads)
    assert all(p.grad is None for n, p in params.items() if n.startswith("model.layers.0."))


# ------------------------------------------------------------------ PEFT
def test_peft_logical_name_strings():
    pre = "base_model.model.model.layers.0.self_attn.q_proj"
    assert peft_logical_name(f"{pre}.base_layer.weight") == "model.layers.0.self_attn.q_proj.weight"
    assert peft_logical_name(f"{pre}.lora_A.default.weight") == (
        "model.layers.0.self_attn.q_proj.lora_A.weight"
    )
    assert peft_logical_name(f"{pre}.lora_A.other.weight", "other") == (
        "model.layers.0.self_attn.q_proj.lora_A.weight"
    )
    assert peft_logical_name("base_model.model.lm_head.modules_to_save.default.weight") == (
        "lm_head.weight"
    )
    assert peft_logical_name("base_model.model.lm_head.original_module.weight") == (
        "lm_head.original_module.weight"
    )
    assert peft_logical_name("model.norm.weight") == "model.norm.weight"


def test_peft_base_names_resolve(peft_llama):
    base_names, model = peft_llama
    adapter = PeftStrategyAdapter()
    names = adapter.schedule_param_names(model)
    assert [n for n in names if not n.endswith(PEFT_ONLY)] == (base_names)
    assert adapter.actual_param_name("model.layers.0.self_attn.q_proj.weight", model) == (
        "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    )
    assert adapter.actual_param_name("model.layers.1.self_attn.v_proj.lora_B.weight", model) == (
        "base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight"
    )
    actual = dict(model.named_parameters())
    for name, param in adapter.params_for_names(base_names, model):
        assert param is actual[adapter.actual_param_name(name, model)]
    # the generic adapter detects peft names by their prefix
    assert StrategyAdapter().schedule_param_names(model) == names
    assert StrategyAdapter(peft=False).schedule_param_names(model) == list(actual)


def test_peft_schedule_checks_and_default(peft_llama):
    _, model = peft_llama
    adapter = PeftStrategyAdapter()
    wrapped = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    with pytest.raises(
        StrategyAdapterError,
        match=r"phase 1: .*peft-wrapped name; .*'model\.layers\.0\.self_attn\.q_proj"
        r"\.lora_A\.weight'",
    ):
        adapter.validate_schedule(
            {0: {"params": ["lm_head.weight"]}, 1: {"params": [wrapped]}}, model
        )
    schedule = adapter.gen_default_schedule(model)
    listed = [n for phase in schedule.values() for n in phase["params"]]
    trainable = [n for n, p in adapter.named_parameters(model) if p.requires_grad]
    assert listed == trainable[::-1]
    assert len(listed) == 2 * 2 * 2 + 1  # 2 layers x (q, v) x (A, B) + lm_head copy
    assert listed[0] == "lm_head.weight"
    everything = PeftStrategyAdapter(default_schedule_trainable_only=False)
    assert len(everything.gen_default_schedule(model)) == math.ceil(len(actual_names(model)) / 2)


def actual_names(model):
    return [n for n, _ in model.named_parameters()]


def test_peft_state_dict_round_trip_and_base_checkpoint(peft_llama):
    base_names, model = peft_llama
    adapter = PeftStrategyAdapter()
    state = model.state_dict()
    logical = adapter.to_logical_state_dict(state)
    assert "model.layers.0.self_attn.q_proj.weight" in logical
    assert all(not k.startswith("base_model.") for k in logical)
    back = adapter.from_logical_state_dict(logical, model)
    assert list(back) == list(state)
    assert all(back[k] is state[k] for k in state)
    # a checkpoint of the plain base model loads into the peft model's base weights
    torch.manual_seed(5)
    base_ckpt = {n: torch.randn_like(logical[n]) for n in base_names}
    translated = adapter.from_logical_state_dict(base_ckpt, model)
    missing, unexpected = model.load_state_dict(translated, strict=False)
    assert unexpected == [] and all("lora_" in k or "original_module" in k for k in missing)
    q = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert torch.equal(q, base_ckpt["model.layers.0.self_attn.q_proj.weight"])
    with pytest.raises(StrategyAdapterError, match=r"'model\.nrm\.weight'.*'model\.norm\.weight'"):
        adapter.from_logical_state_dict({"model.nrm.weight": q}, model)
