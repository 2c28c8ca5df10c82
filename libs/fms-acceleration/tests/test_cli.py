"""The CLI: listing, install, plugin subcommands; the testing helpers."""

from __future__ import annotations

import argparse
import sys
import types
from importlib import metadata
from pathlib import Path

import pytest
import torch

from fms_acceleration import cli as cli_module
from fms_acceleration.cli import main
from fms_acceleration.testing import TINY_ARCHS, save_tiny_model, tiny_dataset, tiny_model_config


def test_plugins_lists_installed_plugins(installed_fakes, capsys):
    assert main(["plugins"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].split() == ["plugin", "package", "version", "stanzas", "declared", "slots"]
    rows = {line.split()[0]: line for line in lines[2:] if not line.startswith("broken: ")}
    # the fakes, plus any plugin that registered itself when imported (e.g. through its CLI
    # subcommand's entry point)
    fakes = {"and_plugin", "fake_kernels", "fake_loader", "needs_missing", "other_loader"}
    assert fakes | {"other_loss", "restricted"} <= set(rows)
    assert "training.fake_kernels (or); peft.quantization.fake_kernels (or)" in rows["fake_kernels"]
    assert rows["fake_kernels"].rstrip().endswith("loss")
    assert "training.part_a (and); training.part_b (and)" in rows["and_plugin"]
    assert "broken: plugin 'broken' (no_such_module_xyz)" in captured.out


def test_configs_lists_contents(tmp_path, capsys):
    (tmp_path / "CONTENTS.yaml").write_text(
        "framework_configs:\n"
        "  - shortname: accelerated-peft-bnb\n"
        "    plugins: [accelerated-peft]\n"
        "    filename: accelerated-peft-bnb-sample-configuration.yaml\n"
    )
    assert main(["configs", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2].split()[:2] == ["accelerated-peft-bnb", "accelerated-peft"]
    assert out[2].endswith(str(tmp_path / "accelerated-peft-bnb-sample-configuration.yaml"))


def test_configs_without_contents_is_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli_module, "find_sample_configurations", lambda explicit: None)
    assert main(["configs"]) == 1
    assert "no sample-configurations/CONTENTS.yaml found" in capsys.readouterr().err


def test_plugin_subcommands_from_entry_points(monkeypatch, capsys):
    module = types.ModuleType("fms_fake_cli_plugin")

    def register(subparsers: argparse._SubParsersAction) -> None:
        parser = subparsers.add_parser("hello", help="say hello")
        parser.add_argument("name")
        parser.set_defaults(func=lambda args: print(f"hello {args.name}") or 3)

    module.register = register
    monkeypatch.setitem(sys.modules, module.__name__, module)
    group = cli_module.CLI_GROUP
    fake_eps = [
        metadata.EntryPoint("hello", "fms_fake_cli_plugin:register", group),
        metadata.EntryPoint("broken-cmd", "no_such_cli_module:register", group),
        metadata.EntryPoint("check", "fms_fake_cli_plugin:register", group),
    ]
    monkeypatch.setattr(cli_module, "entry_points_of", lambda group: fake_eps)
    assert main(["hello", "world"]) == 3
    captured = capsys.readouterr()
    assert captured.out == "hello world\n"
    assert (
        "CLI plugin 'broken-cmd' (no_such_cli_module:register) from package '<unknown>' "
        "<unknown> failed to import: ModuleNotFoundError" in captured.err
    )
    assert "CLI plugin 'check' (fms_fake_cli_plugin:register) would shadow" in captured.err


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_tiny_model_configs_build_every_arch(arch):
    from transformers import AutoModelForCausalLM

    config = tiny_model_config(arch)
    model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    assert 10_000 < n_params < 2_000_000
    ids = torch.randint(0, 128, (2, 9))
    assert model(input_ids=ids).logits.shape == (2, 9, 128)


def test_save_tiny_model_roundtrip_and_dataset(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = save_tiny_model(tmp_path / "m", arch="mistral", seed=5)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == "MistralForCausalLM"
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (1, 3)
    assert (model.config.pad_token_id, model.config.eos_token_id) == (1, 3)
    assert tokenizer("tok1 tok2 tok9")["input_ids"] == [5, 6, 13]
    rows = tiny_dataset(n=5, seq_len=6, seed=1)
    assert len(rows) == 5 and all(len(r["input_ids"]) == 6 for r in rows)
    assert rows == tiny_dataset(n=5, seq_len=6, seed=1)
    assert all(min(r["input_ids"]) >= 4 and max(r["input_ids"]) < 128 for r in rows)
    with pytest.raises(ValueError, match="unknown tiny arch 'gpt9'"):
        tiny_model_config("gpt9")


def test_install_by_short_name_inside_and_outside_a_checkout(tmp_path):
    repo = Path(__file__).resolve().parents[3]
    inside = cli_module.install_command("peft", ["-q"], repo / "plugins")
    assert inside[:5] == [sys.executable, "-m", "pip", "install", "-q"]
    assert inside[5:] == [
        "-c",
        str(repo / "constraints.txt"),
        str(repo / "plugins" / "accelerated-peft"),
    ]
    assert cli_module.install_command("fms_acceleration_foak", [], tmp_path)[-1] == (
        "fms-acceleration-foak"
    )
    assert cli_module.install_command(str(tmp_path), [], tmp_path)[-1] == str(tmp_path)
    with pytest.raises(Exception, match="unknown plugin 'nope'; known: aadp, foak, "):
        cli_module.install_command("nope", [], tmp_path)
    with pytest.raises(Exception, match="unknown plugin 'pfet' \\(did you mean 'peft'\\?\\)"):
        cli_module.install_command("pfet", [], tmp_path)


def test_install_keeps_the_installed_torch_transformers_and_peft(tmp_path, monkeypatch, capsys):
    """A plugin installed into a client's venv must not upgrade its stack: pip gets the
    installed releases as constraints, and a failure says nothing of them changed."""
    seen = {}

    def pip(command):
        seen["command"] = command
        seen["pins"] = Path(command[command.index("-c") + 1]).read_text()
        return 1  # pip: ResolutionImpossible

    monkeypatch.setattr(cli_module.subprocess, "call", pip)
    monkeypatch.chdir(tmp_path)
    assert cli_module.main(["install", "foak"]) == 1
    held = cli_module.held_versions()
    assert set(held) >= {"torch", "transformers", "peft"}
    assert seen["pins"].splitlines() == [f"{n}=={v}" for n, v in held.items()]
    assert seen["command"][-1] == "fms-acceleration-foak"
    err = capsys.readouterr().err
    assert (
        f"against the installed torch {held['torch']}, transformers {held['transformers']}" in err
    )
    assert "nothing of those was changed" in err


def test_python_dash_m_cli_lists_plugins():
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "fms_acceleration.cli", "plugins"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].split()[:3] == ["plugin", "package", "version"]
    assert "fms-acceleration-peft" in done.stdout
