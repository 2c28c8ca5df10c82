"""Repository-wide pytest setup, loaded before any package's tests are collected."""

import os

# Triton decides at decoration time whether a kernel runs in its CPU interpreter, and any
# test (or plugin discovery) may import a kernel module first, so the switch must be set here,
# before collection. CI has no GPU; on a CUDA machine the real kernels run instead.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
