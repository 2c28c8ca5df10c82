"""Model folders are published whole: staged beside the target, renamed when complete."""

from __future__ import annotations

import pytest

from fms_acceleration_train.model_source import publishing


def _staging_left(parent, name):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(name + "."))


def test_a_completed_folder_is_renamed_into_place(tmp_path):
    target = tmp_path / "models" / "smollm2"
    with publishing(target) as staging:
        assert staging.parent == target.parent and not target.exists()
        (staging / "config.json").write_text("{}")
        (staging / "model.safetensors").write_bytes(b"\x00" * 11)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert (target / "model.safetensors").stat().st_size == 11
    assert _staging_left(target.parent, "smollm2") == []


def test_a_failed_build_leaves_no_target_and_no_staging(tmp_path):
    target = tmp_path / "smollm2"
    with pytest.raises(RuntimeError, match="conversion failed"), publishing(target) as staging:
        (staging / "config.json").write_text("{}")
        raise RuntimeError("conversion failed")
    assert not target.exists()
    assert _staging_left(tmp_path, "smollm2") == []


def test_a_concurrent_writer_that_published_first_keeps_its_folder(tmp_path):
    target = tmp_path / "smollm2"
    with publishing(target) as staging:
        (staging / "config.json").write_text('{"writer": "late"}')
        target.mkdir()  # another process publishes first
        (target / "config.json").write_text('{"writer": "first"}')
    assert (target / "config.json").read_text() == '{"writer": "first"}'
    assert _staging_left(tmp_path, "smollm2") == []


def test_a_rename_that_fails_for_another_reason_is_raised(tmp_path):
    target = tmp_path / "smollm2"
    with pytest.raises(OSError), publishing(target) as staging:
        (staging / "config.json").write_text("{}")
        target.mkdir()  # occupied, but not by a published model
        (target / "notes.txt").write_text("not a model")
    assert _staging_left(tmp_path, "smollm2") == []
