"""The scripts around the train job: the sample-configuration generator and the benchmark runner
(loaded from scripts/ by path; they are not part of the installed package)."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

SCRIPTS = Path(__file__).resolve().parents[3] / "scripts"

if not (SCRIPTS / "generate_sample_configurations.py").is_file():
    pytest.skip("scripts/ is not beside this checkout", allow_module_level=True)


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


gen = _load("generate_sample_configurations", SCRIPTS / "generate_sample_configurations.py")
bench = _load("run_benchmarks", SCRIPTS / "benchmarks" / "run_benchmarks.py")

BNB = textwrap.dedent(
    """\
    # file header (replaced by the generator's)
    plugins:
      # PEFT-related acceleration
      peft:
        quantization:
          bitsandbytes:
            # 4-bit type
            quant_type: nf4  # or fp4
            no_peft_model: false
    """
)
FOAK = textwrap.dedent(
    """\
    plugins:
      peft:
        quantization:
          # fused kernels on the quantized base layer
          fused_ops_and_kernels:
            base_layer: auto_gptq
            fused_lora: true
            targets:
              - q_proj  # a list stays verbatim
              - v_proj
            note: |
              kept as written
    """
)


def test_parse_render_round_trip_keeps_comments_lists_and_block_scalars():
    for text in (BNB, FOAK):
        assert gen.render(gen.parse(text, "x.yaml")) == text.splitlines()


def test_merge_keeps_comments_of_both_files_and_matches_the_yaml_merge():
    merged = gen.parse(BNB, "bnb.yaml")
    gen.apply_override(merged, "peft.quantization.bitsandbytes.quant_type", "fp4", "bnb.yaml")
    foak = gen.parse(FOAK, "foak.yaml")
    gen.apply_override(
        foak, "peft.quantization.fused_ops_and_kernels.base_layer", "bitsandbytes", "foak.yaml"
    )
    gen.merge_into(merged, foak, "")
    text = "\n".join(gen.render(merged)) + "\n"
    assert "\n        quant_type: fp4  # or fp4\n" in text
    assert "\n      # fused kernels on the quantized base layer\n" in text
    assert "\n          - q_proj  # a list stays verbatim\n" in text
    quantization = yaml.safe_load(text)["plugins"]["peft"]["quantization"]
    assert quantization == {
        "bitsandbytes": {"quant_type": "fp4", "no_peft_model": False},
        "fused_ops_and_kernels": {
            "base_layer": "bitsandbytes",
            "fused_lora": True,
            "targets": ["q_proj", "v_proj"],
            "note": "kept as written\n",
        },
    }


def test_conflicting_values_name_the_dotted_path():
    other = gen.parse(BNB.replace("quant_type: nf4", "quant_type: fp4"), "b.yaml")
    with pytest.raises(gen.MergeError, match="'plugins.peft.quantization.bitsandbytes.quant_type'"):
        gen.merge_into(gen.parse(BNB, "a.yaml"), other, "")


def test_override_of_a_missing_mapping_and_comment_out():
    tree = gen.parse(BNB, "bnb.yaml")
    with pytest.raises(gen.MergeError, match=r"bnb.yaml: override 'peft.quantisation.x'"):
        gen.apply_override(tree, "peft.quantisation.x", 1, "bnb.yaml")
    gen.apply_override(tree, "peft.quantization.bitsandbytes.no_peft_model", gen.COMMENT_OUT, "f")
    text = "\n".join(gen.render(tree))
    assert "\n        # no_peft_model: false" in text
    assert yaml.safe_load(text)["plugins"]["peft"]["quantization"]["bitsandbytes"] == {
        "quant_type": "nf4"
    }
    gen.apply_override(tree, "peft.quantization.bitsandbytes", gen.REMOVE, "f")
    assert gen.render(tree)[1:] == [
        "plugins:",
        "  # PEFT-related acceleration",
        "  peft:",
        "    quantization:",
    ]


def test_verify_reports_stale_files_and_passes_after_generation(tmp_path, capsys):
    out = tmp_path / "samples"
    assert gen.main(["--verify", "--skip-missing", "--output", str(out)]) == 1
    assert "differs from the generator: samples/CONTENTS.yaml" in capsys.readouterr().out
    assert gen.main(["--skip-missing", "--output", str(out)]) == 0
    assert gen.main(["--verify", "--skip-missing", "--output", str(out)]) == 0
    contents = yaml.safe_load((out / "CONTENTS.yaml").read_text())["framework_configs"]
    assert len(contents) >= 3
    for entry in contents:
        assert (out / entry["filename"]).is_file()
    victim = out / contents[0]["filename"]
    victim.write_text(victim.read_text() + "# hand edit\n")
    (out / "stray-sample-configuration.yaml").write_text("plugins: {}\n")
    capsys.readouterr()
    assert gen.main(["--verify", "--skip-missing", "--output", str(out)]) == 1
    printed = capsys.readouterr().out
    assert f"differs from the generator: samples/{victim.name}" in printed
    assert "not made by the generator: samples/stray-sample-configuration.yaml" in printed


def test_scenarios_file_of_the_repo_parses_and_names_known_samples():
    scenarios = bench.load_scenarios(SCRIPTS / "benchmarks" / "scenarios.yaml")
    assert {s.device for s in scenarios} == {"cpu", "cuda"}
    known = set(gen.SAMPLES) | {bench.BASELINE}
    for s in scenarios:
        assert set(s.framework_configs) <= known, s.name
        assert s.baseline in s.framework_configs


def test_bad_scenario_names_the_scenario(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("scenarios:\n  - name: x\n    device: tpu\n")
    with pytest.raises(ValueError, match="scenario x: device must be cpu or cuda"):
        bench.load_scenarios(path)
    path.write_text("scenarios:\n  - name: y\n    device: cpu\n    baseline: b\n")
    with pytest.raises(ValueError, match="scenario y: baseline 'b' is not one of"):
        bench.load_scenarios(path)


def test_cli_arguments_and_markdown_ratios():
    assert bench._cli_arguments({"max_steps": 8, "no_eval": True, "full_finetuning": False}) == [
        "--max-steps",
        "8",
        "--no-eval",
    ]
    scenario = bench.Scenario("s", "cpu", ("none", "fast"), "none", {}, (None,), {}, 60)
    runs = [
        bench.Run("s", "none", "m", "ok", 100.0, 10.0, 9.0, 2000.0, 0.5, 1.0),
        bench.Run("s", "fast", "m", "ok", 150.0, 8.0, 6.0, 1500.0, 0.5, 1.0),
        bench.Run("s", "broken", "m", "failed (exit 1)", error="boom"),
    ]
    env = {"date": "d", "device": "cpu: x", "python": "3", "versions": "v"}
    table = bench.markdown(runs, [scenario], env, "noisy")
    assert "| s | none* | m | ok | 100.0 | 1.00x | 2000 | 1.00x |" in table
    assert "| s | fast | m | ok | 150.0 | 1.50x | 1500 | 0.75x |" in table
    assert "| s | broken | m | failed (exit 1): boom | - | - | - | - |" in table
    assert "- note: noisy" in table
