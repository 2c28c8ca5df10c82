"""Checkpoints cross between our GPTQ and gptqmodel with the same outputs, and our quantizer's
model is as close to the float model as gptqmodel's (on the same calibration text)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gptqmodel")

# both compute in bf16: logits (max ~0.74) differ by a few bf16 roundings
LOGIT_ATOL = 1e-2


@pytest.fixture(scope="module")
def calibration_ids(tiny_llama_dir, calibration_path) -> torch.Tensor:
    from transformers import AutoTokenizer

    from fms_acceleration_peft.calibration import read_calibration_file, tokenize_calibration

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    samples = tokenize_calibration(read_calibration_file(calibration_path), tokenizer, 256)
    return torch.tensor([s["input_ids"] for s in samples])


def _evaluate(model, ids) -> tuple[float, torch.Tensor]:
    with torch.no_grad(), torch._dynamo.config.patch(disable=True):
        out = model(input_ids=ids, labels=ids)
    return out.loss.item(), out.logits.float()


def _ours(directory):
    from fms_acceleration_peft.gptq_loading import load_gptq_model

    return load_gptq_model(directory, "torch", torch.bfloat16, "cpu")


def _gptqmodels(directory):
    from gptqmodel import GPTQModel

    from fms_acceleration_peft.gptq_loading import ensure_gptqmodel_cpu_workers

    ensure_gptqmodel_cpu_workers()
    with torch._dynamo.config.patch(disable=True):
        return GPTQModel.load(directory, backend="gptq_torch", device="cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("writer", ["gptqmodel_dir", "gptq_dir", "gptq_desc_act_dir"])
def test_both_loaders_compute_the_same_model(writer, calibration_ids, request):
    directory = request.getfixturevalue(writer)
    loss_ours, logits_ours = _evaluate(_ours(directory), calibration_ids)
    loss_theirs, logits_theirs = _evaluate(_gptqmodels(directory).model, calibration_ids)
    torch.testing.assert_close(logits_ours, logits_theirs, atol=LOGIT_ATOL, rtol=0)
    assert loss_ours == pytest.approx(loss_theirs, abs=2e-3)


def test_our_quantizer_is_as_close_to_the_float_model(
    gptq_dir, gptqmodel_dir, tiny_llama_dir, calibration_ids
):
    from transformers import AutoModelForCausalLM

    from fms_acceleration import compat

    plain = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, **compat.dtype_kwargs(torch.bfloat16)
    )
    loss_fp, logits_fp = _evaluate(plain, calibration_ids)
    loss_ours, logits_ours = _evaluate(_ours(gptq_dir), calibration_ids)
    loss_theirs, logits_theirs = _evaluate(_ours(gptqmodel_dir), calibration_ids)
    error_ours = ((logits_ours - logits_fp) ** 2).mean().item()
    error_theirs = ((logits_theirs - logits_fp) ** 2).mean().item()
    # measured: ours 1.11e-4, gptqmodel 1.25e-4 (mean squared logit error vs the bf16 model)
    assert error_ours < 1.25 * error_theirs, (error_ours, error_theirs)
    assert abs(loss_ours - loss_fp) < 5e-3 and abs(loss_theirs - loss_fp) < 5e-3
    assert error_ours > 0  # the checkpoints are really quantized


@pytest.mark.parametrize("writer", ["gptq_dir", "gptq_desc_act_dir"])
def test_transformers_reads_our_checkpoints(writer, calibration_ids, request):
    pytest.importorskip("optimum")
    from transformers import AutoModelForCausalLM

    from fms_acceleration import compat
    from fms_acceleration_peft.gptq_loading import ensure_gptqmodel_cpu_workers

    directory = request.getfixturevalue(writer)
    ensure_gptqmodel_cpu_workers()
    with torch._dynamo.config.patch(disable=True):
        theirs = AutoModelForCausalLM.from_pretrained(
            directory, device_map="cpu", **compat.dtype_kwargs(torch.bfloat16)
        )
    assert "gptqmodel" in type(theirs.model.layers[0].self_attn.q_proj).__module__
    loss_ours, logits_ours = _evaluate(_ours(directory), calibration_ids)
    loss_theirs, logits_theirs = _evaluate(theirs, calibration_ids)
    torch.testing.assert_close(logits_ours, logits_theirs, atol=LOGIT_ATOL, rtol=0)
    assert loss_ours == pytest.approx(loss_theirs, abs=2e-3)
