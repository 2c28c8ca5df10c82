"""The main job keeps third-party start-up noise off the screen, from before the first import of
transformers (which imports peft, bitsandbytes and torchao)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

NOISY = (
    "bitsandbytes.backends.cpu.ops",
    "kernels._internals.hf_hub",
    "torchao",
    "torch.utils._pytree",
)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )


def test_the_start_up_loggers_are_silenced_and_errors_still_pass():
    done = _run(
        f"""
        import logging
        from fms_acceleration_train.quiet import quiet_third_party_start
        quiet_third_party_start()
        for name in {NOISY!r}:
            logging.getLogger(name).warning("noise from %s", name)
        logging.getLogger("torchao").error("an error still shows")
        logging.getLogger("fms_acceleration").warning("ours still shows")
        """
    )
    assert done.returncode == 0, done.stderr
    assert "noise from" not in done.stderr
    assert "an error still shows" in done.stderr and "ours still shows" in done.stderr


def test_train_is_quiet_before_it_imports_transformers(tmp_path):
    """The job fails on a missing dataset after loading its modules; by the time transformers was
    first imported, the noisy loggers were already silenced."""
    done = _run(
        f"""
        import builtins, logging, sys
        real = builtins.__import__
        levels = []

        def spy(name, globals=None, locals=None, fromlist=(), level=0):
            if level == 0 and name.split(".")[0] == "transformers" and not levels:
                levels.append(logging.getLogger("torchao").getEffectiveLevel())
            return real(name, globals, locals, fromlist, level)

        builtins.__import__ = spy
        from fms_acceleration.cli import main
        code = main(["train", "--dataset", {str(tmp_path / "missing.jsonl")!r},
                     "--output-dir", {str(tmp_path / "out")!r}])
        print(code, levels)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-2:] == ["2", "[40]"]  # exit code 2; logging.ERROR
