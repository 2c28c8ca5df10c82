"""The main job's screen is for what the user can act on: third-party start-up messages that
nobody running the job can do anything about are kept off it.

- bitsandbytes tries to fetch a CPU kernel from the kernels hub when it is imported (transformers
  imports it with peft) and logs the failure offline, through the `kernels` package too;
- torchao (installed beside gptqmodel; peft imports it to probe its version) logs that its CUDA
  extensions do not load on a CPU machine, and registers enums the way torch now deprecates;
- transformers and peft deprecate their own internals with FutureWarning / DeprecationWarning
  raised from calls inside the libraries;
- transformers draws a progress bar for the few hundred tensors of a small checkpoint.

Our own warnings (fms_acceleration*) and every error still reach the screen.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

_NOISY_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels", "torchao", "torch.utils._pytree")


def quiet_third_party_start() -> None:
    """Silence the third-party start-up noise above in this process (the job's own process)."""
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
        warnings.filterwarnings("default", category=category, module=r"fms_acceleration")
    # transformers reads huggingface_hub's switch when it is imported (the environment variable
    # only counts when huggingface_hub is imported after this); once imported, it is told directly
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
