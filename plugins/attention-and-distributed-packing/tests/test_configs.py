"""The stanzas: the reference's sample configurations pass `fms-acceleration check` unchanged;
bad values and incomplete combinations are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from fms_acceleration.cli import main
from fms_acceleration.testing import split_owner_note

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# The reference fms-acceleration's sample-configurations/aadp-padding-free-sample-configuration.yaml
# and aadp-padding-free-multipack-sample-configuration.yaml, byte for byte.
REFERENCE_PADDING_FREE = """\
# FMS Acceleration Plugin Configuration. 
#
# Each stanza incorporates various configurations for 
# different fine-tuning / training tasks.
plugins:
  # Configurations to accelerate data packing/padding in training
  training:

    # attention module configurations
    # e.g. padding-free modifications to attention layer
    attention:

      # this controls the confgurations for padding free computation of flash attention
      padding_free:
        method: huggingface
"""  # noqa: W291
REFERENCE_MULTIPACK = (
    REFERENCE_PADDING_FREE
    + """\
    dataloader:

      # multipack dataloader
      multipack:

        # number of processes used to calculate dataset lengths
        num_processes: 16
"""
)


@pytest.mark.parametrize(
    ("text", "plugins"),
    [
        (REFERENCE_PADDING_FREE, ["padding_free (PaddingFreeAccelerationPlugin)"]),
        (
            REFERENCE_MULTIPACK,
            [
                "padding_free (PaddingFreeAccelerationPlugin)",
                "multipack (MultipackDataloaderAccelerationPlugin)",
            ],
        ),
    ],
)
def test_reference_sample_configurations_pass_check(tmp_path, capsys, text, plugins):
    path = tmp_path / "sample.yaml"
    path.write_text(text, encoding="utf-8")
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{path}: OK"
    assert [line.split("; ")[0].split(". ", 1)[1] for line in out[1:]] == plugins


def test_shipped_configs_merge_to_the_reference_sample():
    import yaml

    padding_free = yaml.safe_load((CONFIGS / "padding_free.yaml").read_text())
    multipack = yaml.safe_load((CONFIGS / "multipack.yaml").read_text())
    assert padding_free == yaml.safe_load(REFERENCE_PADDING_FREE)
    assert multipack == {
        "plugins": {"training": {"dataloader": {"multipack": {"num_processes": 16}}}}
    }
    merged = padding_free["plugins"]["training"] | multipack["plugins"]["training"]
    assert {"plugins": {"training": merged}} == yaml.safe_load(REFERENCE_MULTIPACK)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            REFERENCE_PADDING_FREE.replace("method: huggingface", "method: hugginface"),
            "plugins.training.attention.padding_free.method: 'hugginface' is not an allowed value "
            "(did you mean 'huggingface'?); allowed: 'huggingface'.",
        ),
        (
            REFERENCE_MULTIPACK.replace("num_processes: 16", "num_processes: 0"),
            "plugins.training.dataloader.multipack.num_processes: 0 must be greater than or "
            "equal to 1.",
        ),
        (
            "plugins:\n  training:\n    dataloader:\n      multipack:\n        num_processes: 2\n"
            "    fused_ops_and_kernels:\n      fast_loss: true\n",
            "plugins.training.dataloader.multipack: plugin 'multipack' needs "
            "plugins.training.attention.padding_free as well; without it this stanza would be "
            "ignored. Add it, or remove plugins.training.dataloader.multipack.",
        ),
    ],
)
def test_bad_stanzas_are_named(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    assert main(["check", str(path)]) != 0
    err, owner = split_owner_note(capsys.readouterr().err.strip())
    assert err == f"error: {path}: {message}"
    # schema errors also name the plugin class, as the reference did
    assert owner in (None, "PaddingFreeAccelerationPlugin", "MultipackDataloaderAccelerationPlugin")
