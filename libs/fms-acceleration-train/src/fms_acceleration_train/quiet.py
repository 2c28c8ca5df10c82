"""The main job's screen is for what the user can act on: third-party start-up messages that
nobody running the job can do anything about are kept off it.

- bitsandbytes tries to fetch a CPU kernel from the kernels hub when it is imported (transformers
  imports it with peft) and logs the failure offline, through the `kernels` package too;
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

_NOISY_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels")


def quiet_third_party_start() -> None:
    """Silence the third-party start-up noise above in this process (the job's own process)."""
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
        warnings.filterwarnings("default", category=category, module=r"fms_acceleration")
    # read by transformers when it is imported; once imported, it is told directly
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
