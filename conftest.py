"""Repository-wide pytest setup, loaded before any package's tests are collected."""

import os

# Triton decides at decoration time whether a kernel runs in its CPU interpreter, and any
# test (or plugin discovery) may import a kernel module first, so the switch must be set here,
# before collection. CI has no GPU; on a CUDA machine the real kernels run instead.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import fcntl
import tempfile

import pytest

_MULTIPROCESS_LOCK = os.path.join(tempfile.gettempdir(), "fms-acceleration-multiprocess.lock")


@pytest.fixture(autouse=True)
def _run_in_a_fresh_directory(tmp_path_factory, monkeypatch):
    """Every test starts in an empty folder of its own: nothing may depend on (or write into)
    the folder pytest was started from, e.g. outputs/ left by the README's training command."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(autouse=True)
def _environment_variables_stay_in_the_test():
    """A test leaves the environment as it found it: transformers 4.55's TrainingArguments(bf16=
    True) sets ACCELERATE_MIXED_PRECISION in os.environ, and every later Accelerator of that
    worker would then train in bf16."""
    before = dict(os.environ)
    yield
    for key in set(os.environ) - set(before):
        del os.environ[key]
    for key, value in before.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def _one_multiprocess_test_at_a_time(request):
    """Serialize the multi-process (torchrun, gloo) tests across xdist workers: two such jobs
    at once on a 2-core machine starve each other into collective timeouts."""
    if request.node.get_closest_marker("multiprocess") is None:
        yield
        return
    with open(_MULTIPROCESS_LOCK, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
