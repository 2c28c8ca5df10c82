"""Discovery, reference resolution and selection of strategy adapters."""

from __future__ import annotations

import types
import warnings

import pytest

from fms_acceleration_adapters import (
    BUILTIN_ADAPTERS,
    DDPStrategyAdapter,
    FSDPStrategyAdapter,
    PeftStrategyAdapter,
    StrategyAdapter,
    StrategyAdapterError,
    StrategyAdapterWarning,
    check_custom_strategy_adapters,
    discover_strategy_adapters,
    distributed_type_of,
    resolve_strategy_adapter,
    select_strategy_adapter,
    strategy_names,
)

GOOD_MODULE = """
from fms_acceleration_adapters import StrategyAdapter

class GoodAdapter(StrategyAdapter):
    strategy_name = "good"

class OtherAdapter(StrategyAdapter):
    strategy_name = "other"

NOT_AN_ADAPTER = 42
"""


def test_builtins_are_discovered_without_entry_points():
    found = discover_strategy_adapters()
    assert set(BUILTIN_ADAPTERS) <= set(found)
    assert found["single_device"] is StrategyAdapter
    assert found["ddp"] is DDPStrategyAdapter
    assert found["fsdp"] is FSDPStrategyAdapter
    assert found["peft"] is PeftStrategyAdapter


def test_discovery_good_broken_and_duplicate(fake_dists):
    fake_dists(
        "fake-good",
        {"Good_Adapter": "fake_adapter_good:GoodAdapter"},
        {"fake_adapter_good": GOOD_MODULE},
    )
    fake_dists("fake-broken", {"broken": "fake_adapter_missing:Nope"})
    fake_dists("fake-other", {"good_adapter": "fake_adapter_good:OtherAdapter"})
    fake_dists("fake-notclass", {"notclass": "fake_adapter_good:NOT_AN_ADAPTER"})
    fake_dists("fake-shadow", {"DDP": "fake_adapter_good:OtherAdapter"})
    with pytest.warns(StrategyAdapterWarning) as record:
        found = discover_strategy_adapters()
    messages = [str(w.message) for w in record]
    # names are lowercased; the first distribution (sorted by name) wins a duplicate
    assert found["good_adapter"].__name__ == "GoodAdapter"
    assert "broken" not in found and "notclass" not in found
    assert found["ddp"] is DDPStrategyAdapter
    assert any(
        "'broken'" in m and "fake-broken" in m and "ModuleNotFoundError" in m for m in messages
    )
    assert any("'notclass'" in m and "not a subclass" in m for m in messages)
    assert any("declared twice" in m and "fake-good" in m and "fake-other" in m for m in messages)
    assert any("shadows the built-in" in m and "fake-shadow" in m for m in messages)
    assert len(messages) == 4


def test_entry_points_load_lazily(fake_dists):
    fake_dists(
        "fake-good", {"good": "fake_adapter_good:GoodAdapter"}, {"fake_adapter_good": GOOD_MODULE}
    )
    fake_dists("fake-broken", {"broken": "fake_adapter_missing:Nope"})
    # resolving one name loads only that entry point: the broken one costs nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_strategy_adapter("GOOD").__name__ == "GoodAdapter"
    with pytest.raises(
        StrategyAdapterError, match=r"'broken'.*failed to import: ModuleNotFoundError"
    ):
        resolve_strategy_adapter("broken")


def test_dot_form_entry_point_values_load(fake_dists):
    """FTS test_discover_strategy_adapters: 'module.Class' values (which importlib reads as a
    module name) load as well as 'module:Class' ones."""
    fake_dists(
        "fake-dot",
        {"dot_form": "fake_adapter_dot.GoodAdapter", "colon_form": "fake_adapter_dot:GoodAdapter"},
        {"fake_adapter_dot": GOOD_MODULE},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        found = discover_strategy_adapters()
        assert resolve_strategy_adapter("DOT_FORM") is found["colon_form"]
    assert found["dot_form"] is found["colon_form"]
    assert found["dot_form"].__name__ == "GoodAdapter"


def _entry_point(name: str, value: str, load_error: Exception) -> types.SimpleNamespace:
    def load():
        raise load_error

    return types.SimpleNamespace(name=name, value=value, group="g", dist=None, load=load)


def test_failing_entry_point_load_falls_back_to_importing_its_value(monkeypatch):
    """FTS test_discover_strategy_adapters_ep_load_failure / _both_imports_fail /
    _no_value_attribute: ep.load()
    raising is not the end: the value is imported as a reference; only if that fails too is the
    entry point skipped, with both reasons."""
    from fms_acceleration_adapters import registry

    eps = [
        _entry_point("fallback", "fms_acceleration_adapters.ddp:DDPStrategyAdapter",
                     ImportError("simulated ep.load() failure")),
        _entry_point("twice_broken", "nonexistent_mod_xyz:Adapter",
                     ImportError("simulated ep.load() failure")),
        _entry_point("no_value", None, AttributeError("no value attribute")),
    ]  # fmt: skip
    monkeypatch.setattr(registry, "entry_points_of", lambda group: eps)
    with pytest.warns(StrategyAdapterWarning) as record:
        found = discover_strategy_adapters()
    assert found["fallback"] is DDPStrategyAdapter and "twice_broken" not in found
    assert "no_value" not in found
    message, no_value = [str(w.message) for w in record]
    assert no_value == (
        "strategy adapter entry point 'no_value' (None) from package '<unknown>' <unknown> "
        "failed to import: AttributeError: no value attribute; as a 'module.Class' reference: "
        "no reference (value None); it is skipped"
    )
    assert message == (
        "strategy adapter entry point 'twice_broken' (nonexistent_mod_xyz:Adapter) from package "
        "'<unknown>' <unknown> failed to import: ImportError: simulated ep.load() failure; as a "
        "'module.Class' reference: cannot import module 'nonexistent_mod_xyz': "
        "ModuleNotFoundError: No module named 'nonexistent_mod_xyz'; it is skipped"
    )
    assert resolve_strategy_adapter("fallback") is DDPStrategyAdapter


def test_strategy_names_cover_accelerates_types_and_adapters(fake_dists):
    fake_dists(
        "fake-good", {"good": "fake_adapter_good:GoodAdapter"}, {"fake_adapter_good": GOOD_MODULE}
    )
    names = strategy_names()
    assert {"single_device", "ddp", "fsdp", "peft", "deepspeed", "xla", "megatron_lm"} <= set(names)
    assert "good" in names and names == sorted(names)
    assert not any(
        n.startswith("multi_") or n == "no" for n in names
    )  # they are ddp / single_device
    check_custom_strategy_adapters({"MULTI_GPU": "x", "NO": "y", "deepspeed": "z", "good": "w"})


@pytest.mark.parametrize(
    "key,hint",
    [("fdsp", " (did you mean 'fsdp'?)"), ("single", " (did you mean 'single_device'?)"),
     ("IAmMissing", ""), (" ", "")],
)  # fmt: skip
def test_custom_mapping_with_an_unknown_strategy_is_refused(key, hint):
    """A custom adapter mapped to a strategy no run has would never be used: an error naming
    the key and its value (FTS's test_fts_distributed_compat[csa_not_found] refuses it too)."""
    custom = {"ddp": "ddp", key: "fms_acceleration_adapters:FSDPStrategyAdapter"}
    expected = (
        f"custom_strategy_adapters.{key}: unknown strategy {key!r} (mapped to "
        f"'fms_acceleration_adapters:FSDPStrategyAdapter'){hint}; strategies: "
        f"{', '.join(strategy_names())}, or an accelerate DistributedType value such as NO, "
        "MULTI_GPU or FSDP"
    )
    for call in (check_custom_strategy_adapters, lambda c: select_strategy_adapter("NO", c)):
        with pytest.raises(StrategyAdapterError) as err:
            call(custom)
        assert str(err.value) == expected


@pytest.mark.parametrize(
    "ref, expected",
    [
        ("ddp", DDPStrategyAdapter),
        ("FSDP", FSDPStrategyAdapter),
        ("fms_acceleration_adapters.peft:PeftStrategyAdapter", PeftStrategyAdapter),
        ("fms_acceleration_adapters.peft.PeftStrategyAdapter", PeftStrategyAdapter),
        ("fms_acceleration_adapters:DDPStrategyAdapter", DDPStrategyAdapter),
        (StrategyAdapter, StrategyAdapter),
    ],
)
def test_resolve_reference_formats(ref, expected):
    assert resolve_strategy_adapter(ref) is expected


@pytest.mark.parametrize(
    "ref, message",
    [
        ("nonexistent_pkg_xyz.mod:Adapter", r"'nonexistent_pkg_xyz\.mod:Adapter'.*cannot import"),
        ("fms_acceleration_adapters.base:Missing", r"has no attribute 'Missing'"),
        ("fms_acceleration_adapters.errors.StrategyAdapterError", r"not a subclass"),
        ("collections:OrderedDict", r"'collections:OrderedDict'.*not a subclass"),
        ("torch.nn.Linear", r"'torch\.nn\.Linear'.*not a subclass"),
        ("no_such_adapter", r"'no_such_adapter' is neither a registered adapter name"),
        (":Adapter", r"not of the form"),
        ("", r"expected an adapter name"),
        (3, r"expected an adapter name"),
    ],
)
def test_resolve_reference_errors(ref, message):
    with pytest.raises(StrategyAdapterError, match=message):
        resolve_strategy_adapter(ref)


@pytest.mark.parametrize(
    "distributed_type, expected",
    [
        ("NO", StrategyAdapter),
        ("no", StrategyAdapter),
        ("MULTI_CPU", DDPStrategyAdapter),
        ("MULTI_GPU", DDPStrategyAdapter),
        ("multi_xpu", DDPStrategyAdapter),
        ("FSDP", FSDPStrategyAdapter),
        ("single_device", StrategyAdapter),
        ("peft", PeftStrategyAdapter),
    ],
)
def test_select_by_distributed_type(distributed_type, expected):
    adapter = select_strategy_adapter(distributed_type)
    assert type(adapter) is expected


def test_select_accepts_accelerate_enum():
    from accelerate.utils import DistributedType

    assert type(select_strategy_adapter(DistributedType.FSDP)) is FSDPStrategyAdapter
    assert type(select_strategy_adapter(DistributedType.MULTI_CPU)) is DDPStrategyAdapter


def test_custom_adapters_override_and_share(fake_dists):
    fake_dists(
        "fake-good", {"good": "fake_adapter_good:GoodAdapter"}, {"fake_adapter_good": GOOD_MODULE}
    )
    custom = {"single_device": "good", "DDP": "good", "fsdp": "fake_adapter_good.OtherAdapter"}
    assert type(select_strategy_adapter("NO", custom)).__name__ == "GoodAdapter"
    assert type(select_strategy_adapter("MULTI_CPU", custom)).__name__ == "GoodAdapter"
    assert type(select_strategy_adapter("FSDP", custom)).__name__ == "OtherAdapter"
    # a custom entry for another strategy does not change this one
    assert type(select_strategy_adapter("MULTI_CPU", {"fsdp": "good"})) is DDPStrategyAdapter


def test_select_errors():
    with pytest.raises(StrategyAdapterError, match=r"custom_strategy_adapters\.ddp: .*'x\.y:Z'"):
        select_strategy_adapter("MULTI_GPU", {"ddp": "x.y:Z"})
    with pytest.raises(
        StrategyAdapterError,
        match=r"no strategy adapter for distributed type 'deepspeed'.*custom_strategy_adapters",
    ):
        select_strategy_adapter("DEEPSPEED")
    with pytest.raises(
        StrategyAdapterError, match=r"strategy_adapter_cfg\.phase_sise.*'phase_size'"
    ):
        select_strategy_adapter("NO", phase_sise=3)
    with pytest.raises(StrategyAdapterError, match=r"distributed_type=None"):
        select_strategy_adapter(None)


def test_distributed_type_of():
    assert distributed_type_of(None) == "single_device"
    assert distributed_type_of(types.SimpleNamespace(distributed_type="MULTI_CPU")) == "ddp"
    assert distributed_type_of(types.SimpleNamespace(distributed_type="FSDP")) == "fsdp"
    assert distributed_type_of(types.SimpleNamespace(distributed_type="MEGATRON_LM")) == (
        "megatron_lm"
    )
    with pytest.raises(StrategyAdapterError, match=r"distributed_type_of\(object\)"):
        distributed_type_of(object())


def test_distributed_type_of_real_accelerator():
    from accelerate import Accelerator

    assert distributed_type_of(Accelerator(cpu=True)) == "single_device"


def test_sample_config_is_valid_for_fts():
    """configs/strategy_adapters.yaml passes the FTS schema and selects a working adapter."""
    pytest.importorskip("fms_acceleration_fts")
    from pathlib import Path

    import yaml

    from fms_acceleration.testing import build_framework
    from fms_acceleration_fts.framework_plugin_fts import FinetuningSchedulePlugin

    path = Path(__file__).resolve().parents[1] / "configs" / "strategy_adapters.yaml"
    config = yaml.safe_load(path.read_text())
    framework = build_framework(config, [FinetuningSchedulePlugin])
    stanza = config["plugins"]["training"]["finetuning_schedule"]
    adapter = select_strategy_adapter(
        "MULTI_GPU", stanza["custom_strategy_adapters"], **stanza["strategy_adapter_cfg"]
    )
    assert type(adapter) is DDPStrategyAdapter and adapter.cfg["phase_size"] == 2
    assert "finetuning_schedule" in framework.plugins
