"""GPTQ matmuls (torch and Triton, forward and backward to the input) and GPTQLinear against the
plain-torch reference decoder, on random layers of odd shapes, group sizes and dtypes.

Without CUDA the Triton kernels run in the interpreter (the repository conftest sets
TRITON_INTERPRET=1): small shapes only.
"""

from __future__ import annotations

import os

import pytest
import torch

from fms_acceleration_peft.gptq_linear import GPTQLinear
from fms_acceleration_peft.gptq_matmul import gptq_matmul, resolve_path

ON_CUDA = torch.cuda.is_available()
TRITON_OK = ON_CUDA or os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if ON_CUDA else "cpu"
# relative to the largest reference value: one rounding of the output (and of W for torch)
TOLERANCE = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}

SHAPES = [
    # (rows, bits, in_features, out_features, group_size, desc_act)
    (37, 4, 72, 40, 24, True),
    (1, 4, 72, 40, 24, False),
    (19, 2, 80, 48, -1, False),
    (33, 8, 36, 20, 12, True),
    (70, 4, 256, 192, 128, False),
]


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, bits, in_features, out_features, group_size, desc_act", SHAPES)
def test_matmul_and_input_gradient_match_the_reference(
    path, dtype, rows, bits, in_features, out_features, group_size, desc_act,
    random_gptq_layer, reference_weight,
):  # fmt: skip
    if path == "triton" and not TRITON_OK:
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    seed = rows * 1000 + in_features + bits
    g = torch.Generator().manual_seed(seed)
    tensors = random_gptq_layer(in_features, out_features, bits, group_size, desc_act, g)
    weight = reference_weight(*tensors, bits, 1)
    tensors = [t.to(DEVICE) for t in tensors]
    x = torch.randn(rows, in_features, generator=g).to(DEVICE, dtype).requires_grad_()
    dy = torch.randn(rows, out_features, generator=g).to(DEVICE, dtype)

    y = gptq_matmul(x, *tensors, bits, 1, path)
    (dx,) = torch.autograd.grad(y, x, dy)

    assert y.dtype == dtype and y.shape == (rows, out_features)
    assert dx.dtype == dtype and dx.shape == (rows, in_features)
    expected_y = x.detach().double().cpu() @ weight
    expected_dx = dy.double().cpu() @ weight.t()
    assert _relative_error(y.cpu(), expected_y) < TOLERANCE[dtype]
    assert _relative_error(dx.cpu(), expected_dx) < TOLERANCE[dtype]


@pytest.mark.skipif(not TRITON_OK, reason="Triton needs CUDA or TRITON_INTERPRET=1")
def test_triton_and_torch_paths_agree_on_batched_inputs(random_gptq_layer):
    g = torch.Generator().manual_seed(11)
    tensors = [t.to(DEVICE) for t in random_gptq_layer(64, 48, 4, 16, True, g)]
    x = torch.randn(2, 9, 64, generator=g).to(DEVICE)
    by_path = {p: gptq_matmul(x, *tensors, 4, 1, p) for p in ("torch", "triton")}
    assert by_path["triton"].shape == (2, 9, 48)
    torch.testing.assert_close(by_path["triton"], by_path["torch"], rtol=1e-5, atol=1e-6)


def test_no_gradient_reaches_the_packed_weight(random_gptq_layer):
    g = torch.Generator().manual_seed(12)
    qweight, qzeros, scales, g_idx = random_gptq_layer(32, 16, 4, 16, False, g)
    scales = scales.float().requires_grad_()  # even a float tensor that asks for one
    x = torch.randn(5, 32, generator=g, requires_grad=True)
    gptq_matmul(x, qweight, qzeros, scales, g_idx, 4, 1, "torch").sum().backward()
    assert scales.grad is None and x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("bias", [True, False])
def test_gptq_linear_from_linear_is_close_to_the_float_layer(bias):
    torch.manual_seed(3)
    linear = torch.nn.Linear(96, 40, bias=bias)
    layer = GPTQLinear.from_linear(linear, bits=8, group_size=32, path="torch")
    assert [n for n, _ in layer.named_parameters()] == []  # frozen: buffers only
    assert layer.qweight.shape == (24, 40) and layer.scales.shape == (3, 40)
    x = torch.randn(7, 96)
    # 8-bit round-to-nearest: off by half a step, a little more at the clipped top code of a
    # symmetric grid (127 steps above the zero for a range of 127.5) with the scale in fp16
    step = layer.scales.float().max().item()
    error = (layer.dequantized_weight() - linear.weight.detach()).abs()
    assert 0.4 * step < error.max() < 0.55 * step
    assert error.mean() < 0.3 * step
    expected = x @ layer.dequantized_weight().t() + (linear.bias.detach() if bias else 0)
    torch.testing.assert_close(layer(x), expected, rtol=1e-3, atol=1e-3)
    assert layer.in_features == layer.infeatures == 96 and layer.outfeatures == 40


def test_gptq_linear_follows_autocast():
    torch.manual_seed(4)
    layer = GPTQLinear.from_linear(torch.nn.Linear(64, 32), bits=4, group_size=32, path="torch")
    x = torch.randn(3, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), rtol=2e-2, atol=2e-2)


def test_path_choice():
    assert resolve_path("auto", torch.device("cpu")) == "torch"
    assert resolve_path("auto", torch.device("cuda", 0)) == "triton"
    assert resolve_path("torch", torch.device("cuda", 0)) == "torch"
    with pytest.raises(ValueError, match="GPTQ matmul path 'marlin' is not one of auto, triton"):
        resolve_path("marlin", torch.device("cpu"))
    with pytest.raises(ValueError, match="path='exllama' is not one of auto, triton, torch"):
        GPTQLinear(32, 32, 4, 32, path="exllama")
