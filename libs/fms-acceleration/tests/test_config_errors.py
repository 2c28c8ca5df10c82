"""Every bad configuration is reported by `fms-acceleration check` by path, without a trace."""

from __future__ import annotations

import textwrap
import types

import pytest

from fms_acceleration import AccelerationFramework, AccelerationPluginConfigError
from fms_acceleration import stanzas as stanzas_module
from fms_acceleration.cli import main

BAD_CONFIGS = {
    "missing plugins body": ("plugins:\n", "'plugins:' has no body"),
    "empty file": ("", "the file is empty; expected a top-level 'plugins:' mapping"),
    "yaml syntax error": (
        "plugins:\n  training: [unclosed\n",
        "YAML syntax error at line 3",
    ),
    "duplicate yaml key": (
        """
        plugins:
          training:
            fake_kernels: {}
          training:
            other_loss: {}
        """,
        "duplicate key 'training' at line 5 (first defined at line 3)",
    ),
    "unknown stanza": (
        """
        plugins:
          training:
            fake_kernel: {}
        """,
        "plugins.training.fake_kernel: unknown stanza 'fake_kernel' (did you mean 'fake_kernels'?)",
    ),
    "unknown key with suggestion": (
        """
        plugins:
          training:
            fake_kernels:
              fast_rsm_layernorm: true
        """,
        "plugins.training.fake_kernels.fast_rsm_layernorm: unknown key 'fast_rsm_layernorm' "
        "(did you mean 'fast_rms_layernorm'?); allowed keys: chunk_size, fast_loss, "
        "fast_rms_layernorm, fused_lora.",
    ),
    "wrong type": (
        """
        plugins:
          training:
            fake_kernels:
              fast_rms_layernorm: "yes please"
        """,
        "plugins.training.fake_kernels.fast_rms_layernorm: expected a boolean (true/false), "
        "got str 'yes please'.",
    ),
    "bool is not an int": (
        """
        plugins:
          training:
            fake_kernels:
              chunk_size: true
        """,
        "plugins.training.fake_kernels.chunk_size: expected an integer, got bool true.",
    ),
    "value outside its set": (
        """
        plugins:
          peft:
            quantization:
              fake_loader:
                quant_type: nf5
        """,
        "plugins.peft.quantization.fake_loader.quant_type: 'nf5' is not an allowed value "
        "(did you mean 'nf4'?); allowed: 'nf4', 'fp4'.",
    ),
    "two model loaders": (
        """
        plugins:
          peft:
            quantization:
              fake_loader: {}
              other_loader: {}
        """,
        "plugins 'fake_loader' and 'other_loader' both load the model (slot 'model_loader')",
    ),
    "two plugins on one slot": (
        """
        plugins:
          training:
            fake_kernels: {}
            other_loss: {}
        """,
        "plugins 'fake_kernels' and 'other_loss' both take (slot 'loss')",
    ),
    "unmet requirement": (
        """
        plugins:
          training:
            fake_kernels:
              fused_lora: true
        """,
        "plugin 'fake_kernels' requires slot 'model_loader' taken by one of fake_loader "
        "(fused_lora), but no active plugin takes the slot 'model_loader'.",
    ),
    "missing package": (
        """
        plugins:
          training:
            needs_missing: {}
        """,
        "plugin 'needs_missing' needs the package 'a_package_that_is_not_installed_anywhere', "
        "which is not installed; install it with: pip install fms-acceleration-fake[extra]",
    ),
    "unknown top-level key": (
        "plugin:\n  training: {}\n",
        "unknown top-level key 'plugin' (did you mean 'plugins'?)",
    ),
    "no stanzas": (
        "plugins: {}\n",
        "No plugins could be configured. Please check the acceleration framework configuration "
        "file",
    ),
    "empty parent of stanzas": (
        "plugins:\n  peft:\n    quantization:\n",
        "plugins.peft.quantization: expected a mapping with one or more of the stanzas "
        "auto_gptq, bitsandbytes, fake_kernels, fake_loader, fused_ops_and_kernels, "
        "other_loader; got nothing.",
    ),
    "stanza body is a list": (
        "plugins:\n  training:\n    fake_kernels: [1, 2]\n",
        "plugins.training.fake_kernels: expected a mapping of options, got list [1, 2].",
    ),
    "not a finite number": (
        "plugins:\n  training:\n    other_loss:\n      scale: .inf\n",
        "plugins.training.other_loss.scale: .inf is not a finite number.",
    ),
    "empty list": (
        "plugins:\n  training:\n    other_loss:\n      labels: []\n",
        "plugins.training.other_loss.labels: [] has 0 entries; at least 1 needed.",
    ),
    "list too long": (
        "plugins:\n  training:\n    other_loss:\n      labels: [a, b, c]\n",
        "plugins.training.other_loss.labels: ['a', 'b', 'c'] has 3 entries; at most 2 allowed.",
    ),
    "empty string": (
        "plugins:\n  training:\n    other_loss:\n      tag: ''\n",
        "plugins.training.other_loss.tag: '' has 0 characters; at least 1 needed.",
    ),
    "number read as a string": (
        "plugins:\n  training:\n    other_loss:\n      scale: 1e-5\n",
        "plugins.training.other_loss.scale: expected a number, got str '1e-5'; YAML read 1e-5 "
        "as a string (write 1.0e-5).",
    ),
    "alias bomb": (
        "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
        + "".join(
            f"{n}: &{n} [{', '.join(['*' + p] * 10)}]\n" for p, n in zip("abcdefgh", "bcdefghi")
        )
        + "plugins: {training: {other_loss: {}}}\n",
        "aliases expand to",
    ),
    "deep nesting": (
        "plugins:\n  training:\n    other_loss:\n      scale: " + "[" * 200 + "]" * 200 + "\n",
        "nesting is",
    ),
    "document is a list": (
        "- plugins\n",
        "expected a mapping with a top-level 'plugins:' key, got list",
    ),
    "plugins is a list": ("plugins: [a, b]\n", "'plugins' must be a mapping of stanzas, got list"),
    "plugins is a string": ("plugins: fast\n", "'plugins' must be a mapping of stanzas, got str"),
    "second top-level key": (
        "plugins:\n  training:\n    other_loss: {}\nplugin_options: {}\n",
        "unknown top-level key 'plugin_options' (did you mean 'plugins'?)",
    ),
    "stanza body is a string": (
        "plugins:\n  training:\n    fake_kernels: fast\n",
        "plugins.training.fake_kernels: expected a mapping of options, got str 'fast'.",
    ),
    "parent of stanzas is a list": (
        "plugins:\n  training: [fake_kernels]\n",
        "plugins.training: expected a mapping with one or more of the stanzas",
    ),
    "unknown stanza at the top": (
        "plugins:\n  trainng:\n    fake_kernels: {}\n",
        "plugins.trainng: unknown stanza 'trainng' (did you mean 'training'?)",
    ),
    "unknown nested option": (
        "plugins:\n  training:\n    fake_kernels:\n      chunk_size: 3\n      chunck: 4\n",
        "plugins.training.fake_kernels.chunck: unknown key 'chunck' (did you mean 'chunk_size'?)",
    ),
    "choice with a typo": (
        "plugins:\n  training:\n    fake_kernels:\n      fast_loss: fused_ce_ligr\n",
        "plugins.training.fake_kernels.fast_loss: 'fused_ce_ligr' is not an allowed value "
        "(did you mean 'fused_ce_liger'?); allowed: true, false, 'fused_ce_liger'.",
    ),
    "one is not true": (
        "plugins:\n  training:\n    fake_kernels:\n      fast_loss: 1\n",
        "plugins.training.fake_kernels.fast_loss: 1 is not an allowed value",
    ),
    "number as a quoted string": (
        "plugins:\n  training:\n    fake_kernels:\n      chunk_size: '12'\n",
        "plugins.training.fake_kernels.chunk_size: expected an integer, got str '12'; YAML read "
        "12 as a string (remove the quotes).",
    ),
    "float where an integer is expected": (
        "plugins:\n  training:\n    fake_kernels:\n      chunk_size: 1.5\n",
        "plugins.training.fake_kernels.chunk_size: expected an integer, got float 1.5.",
    ),
    "not a number": (
        "plugins:\n  training:\n    other_loss:\n      scale: .nan\n",
        "plugins.training.other_loss.scale: .nan is not a finite number.",
    ),
    "null option": (
        "plugins:\n  training:\n    other_loss:\n      scale: null\n",
        "plugins.training.other_loss.scale: expected a number, got NoneType null.",
    ),
    "tab indentation": (
        "plugins:\n\ttraining: {}\n",
        "YAML syntax error at line 2, column 1",
    ),
    "unterminated quote": (
        "plugins:\n  training:\n    other_loss: {scale: '1.0}\n",
        "YAML syntax error at line 4",
    ),
    "self-referencing alias": (
        "plugins: &a\n  training: *a\n",
        "an alias at line 1, column 10 refers to itself.",
    ),
    "AND plugin with one part": (
        "plugins:\n  training:\n    part_a: {}\n",
        "No plugins could be configured. Please check the acceleration framework configuration "
        "file",
    ),
    "list as a key": (
        "plugins:\n  ? [a, b]\n  : 1\n",
        "a mapping key at line 2, column 5 is a sequence",
    ),
}


def _write(tmp_path, text: str):
    path = tmp_path / "accel.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_check_reports_bad_config_without_traceback(case, tmp_path, installed_fakes, capsys):
    text, expected = BAD_CONFIGS[case]
    path = _write(tmp_path, text)
    assert main(["check", str(path)]) == 1
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, err
    assert error_lines[0].startswith(f"error: {path}: ")
    assert expected in error_lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_framework_raises_config_error(case, tmp_path, installed_fakes):
    text, expected = BAD_CONFIGS[case]
    with pytest.raises(AccelerationPluginConfigError) as info:
        AccelerationFramework(_write(tmp_path, text))
    assert expected in str(info.value)


BESIDE_A_LOADER = (
    "plugins:\n  peft:\n    quantization:\n      fake_loader: {}\n  training:\n    odd: {}\n"
)


def test_an_unclaimed_stanza_beside_active_plugins_warns_here_and_fails_check(
    tmp_path, installed_fakes, capsys
):
    """The reference ignored it; clients build frameworks from configurations that name
    stanzas of plugins they did not register. Typos are still never silent."""
    path = _write(tmp_path, BESIDE_A_LOADER)
    expected = "plugins.training.odd: unknown stanza 'odd'"
    with pytest.warns(UserWarning, match=f"{expected}.*It is ignored; `fms-acceleration check`"):
        framework = AccelerationFramework(path)
    assert list(framework.plugins) == ["fake_loader"]
    with pytest.raises(AccelerationPluginConfigError, match=expected):
        AccelerationFramework(path, strict_stanzas=True)
    assert main(["check", str(path)]) == 1
    assert expected in capsys.readouterr().err


def test_known_but_uninstalled_stanza_warns_and_passes_through(
    tmp_path, installed_fakes, capsys, monkeypatch
):
    # whether or not this environment has the odm package, the configuration is read as where
    # it does not
    real = stanzas_module.installed_version
    monkeypatch.setattr(
        stanzas_module,
        "installed_version",
        lambda name: None if name == "fms-acceleration-odm" else real(name),
    )
    path = _write(
        tmp_path,
        """
        plugins:
          training:
            odm:
              odm:
                update_interval: 3
            fake_kernels: {}
        """,
    )
    assert main(["check", str(path)]) == 0
    captured = capsys.readouterr()
    assert (
        "warning: plugins.training.odm.odm: this stanza belongs to the package "
        "'fms-acceleration-odm', which is not installed" in captured.err
    )
    assert "1. fake_kernels (FakeKernels); slots: loss" in captured.out
    with pytest.warns(UserWarning, match="pip install fms-acceleration-odm"):
        framework = AccelerationFramework(path)
    # nothing the user wrote is lost: the uninstalled stanza is kept verbatim
    assert framework.configurations["training"]["odm"]["odm"] == {"update_interval": 3}
    assert framework.passed_through == {"training.odm.odm": "fms-acceleration-odm"}


def test_missing_file_and_missing_env(tmp_path, monkeypatch, installed_fakes):
    monkeypatch.delenv("ACCELERATION_FRAMEWORK_CONFIG_FILE", raising=False)
    with pytest.raises(AccelerationPluginConfigError, match="ACCELERATION_FRAMEWORK_CONFIG_FILE"):
        AccelerationFramework()
    missing = tmp_path / "nope.yaml"
    with pytest.raises(AccelerationPluginConfigError, match="nope.yaml: configuration file does"):
        AccelerationFramework(missing)


def test_check_prints_active_plugins_in_declared_order(tmp_path, installed_fakes, capsys):
    path = _write(
        tmp_path,
        """
        plugins:
          peft:
            quantization:
              fake_kernels: {fused_lora: true}
              fake_loader: {quant_type: fp4}
        """,
    )
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{path}: OK"
    assert out[1] == "  1. fake_loader (FakeLoader); slots: model_loader"
    assert out[2] == "  2. fake_kernels (FakeKernels); slots: loss"


def test_non_utf8_file_is_named(tmp_path, installed_fakes, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("plugins:\n  training:\n    other_loss: {}\n# caf\xe9\n".encode("latin-1"))
    assert main(["check", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"error: {path}: the configuration file is not UTF-8 text (byte 0xe9 at line 4)" in err
    assert "Traceback" not in err


def test_stanza_of_an_installed_but_broken_plugin_is_an_error(tmp_path, monkeypatch, capsys):
    from importlib import metadata

    from fms_acceleration import discovery, stanzas
    from fms_acceleration.errors import PluginImportError

    dist = types.SimpleNamespace(metadata={"Name": "fms-acceleration-aadp"}, version="1.0.0")
    broken = metadata.EntryPoint("aadp", "fms_acceleration_aadp_missing", "x")._for(dist)
    monkeypatch.setattr(discovery, "plugin_entry_points", lambda: [broken])
    monkeypatch.setattr(stanzas, "installed_version", lambda package: "1.0.0")
    path = _write(tmp_path, "plugins:\n  training:\n    attention:\n      padding_free: {}\n")
    with pytest.warns(UserWarning, match="'aadp'"), pytest.raises(PluginImportError) as info:
        AccelerationFramework(path)
    message = str(info.value)
    assert (
        "plugins.training.attention.padding_free: the plugin for this stanza is installed but "
        "failed to import: plugin 'aadp' (fms_acceleration_aadp_missing) from package "
        "'fms-acceleration-aadp' 1.0.0 failed to import: ModuleNotFoundError" in message
    )
    assert main(["check", str(path)]) == 1
    assert "training without it would silently ignore this stanza" in capsys.readouterr().err
