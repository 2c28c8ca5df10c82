"""The quantized LoRA bases the fused-LoRA tests run on, and what each needs installed.

A uniquely named module, not conftest: every plugin's tests have a conftest, and importing
`conftest` by name gets whichever one was imported first in a whole-repository run.
"""

from __future__ import annotations

import pytest

# quantized LoRA base -> the package that provides it ("auto_gptq" is accelerated-peft's own layer)
QUANTIZED_BASE_PACKAGES = {
    "bitsandbytes": "bitsandbytes",
    "auto_gptq": "fms_acceleration_peft",
    "auto_gptq:gptqmodel": "gptqmodel",
}


def skip_without_quantized_base(base: str) -> None:
    """Skip the test unless what a quantized base needs is installed ("plain" needs nothing):
    its package, and accelerated-peft, which registers how to read its weights."""
    if base != "plain":
        pytest.importorskip(QUANTIZED_BASE_PACKAGES[base])
        pytest.importorskip("fms_acceleration_peft")
