"""Patched vs unpatched tiny models, trained 5 steps: losses and final weights must agree."""

from __future__ import annotations

import copy
import importlib
import os
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from fms_acceleration.compat import at_least
from fms_acceleration.testing import build_framework, tiny_model_config
from fms_acceleration_foak import kernels as K
from fms_acceleration_foak.models import ARCHITECTURES

ARCHS = list(ARCHITECTURES)
# With CUDA (and no interpreter) the Triton path needs CUDA tensors: the GPU suite runs there.
ON_CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
NO_MIXED_PRECISION = SimpleNamespace(fp16=False, bf16=False)


def _tiny_model(arch: str) -> torch.nn.Module:
    # the router's auxiliary loss too, except GraniteMoe's on transformers 4.x, which reads the
    # device index (None on CPU)
    moe_aux = arch == "mixtral" or (arch == "granitemoe" and at_least("transformers", "5"))
    overrides = {"output_router_logits": True} if moe_aux else {}
    if arch == "granite":
        overrides["logits_scaling"] = 4.0  # exercises the scaling applied to lm_head's output
    torch.manual_seed(1234)
    return AutoModelForCausalLM.from_config(tiny_model_config(arch, **overrides))


def _stanza(fast_loss, rms=True, rope=True) -> dict:
    body = {"fast_loss": fast_loss, "fast_rms_layernorm": rms, "fast_rope_embeddings": rope}
    return {"plugins": {"training": {"fused_ops_and_kernels": body}}}


def _grad_fn_names(tensor: torch.Tensor) -> set[str]:
    seen, stack, names = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(fn for fn, _ in node.next_functions)
    return names


def _compare(arch, fast_loss, foak_classes, tiny_batches, train, steps=5, micro=2):
    reference = _tiny_model(arch)
    patched = copy.deepcopy(reference)
    batches = tiny_batches(steps, micro=micro)
    expected = train(reference, batches)

    framework = build_framework(_stanza(fast_loss), foak_classes)
    patched, _ = framework.augmentation(patched, NO_MIXED_PRECISION, ())
    try:
        got = train(patched, batches)
        counts = framework.model_patcher.counts()
    finally:
        framework.undo_patches()
    assert len(got) == steps and all(loss > 0.5 for loss in got)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-4, rtol=1e-4)
    # AdamW divides by sqrt(v): near-zero gradients amplify rounding differences, hence 5e-4
    # (one step moves a weight by up to lr = 3e-3, so a wrong gradient still shows).
    for (name, p_ref), (_, p_got) in zip(reference.named_parameters(), patched.named_parameters()):
        torch.testing.assert_close(
            p_got, p_ref, atol=5e-4, rtol=1e-3, msg=lambda m, n=name: f"{arch} {n}: {m}"
        )
    return counts, patched


MATRIX = [(arch, fast_loss) for arch in ARCHS for fast_loss in (True, "fused_ce_liger")]


@pytest.mark.parametrize(
    "arch, fast_loss", MATRIX, ids=[f"{a}-{'ce' if f is True else 'fused_ce'}" for a, f in MATRIX]
)
def test_patched_model_trains_like_unpatched(arch, fast_loss, foak_classes, tiny_batches, train):
    spec = ARCHITECTURES[arch]
    # gradient accumulation (2 micro-batches per step) matters where the loss is ours
    micro = 2 if fast_loss == "fused_ce_liger" else 1
    with K.backend("torch"):
        counts, model = _compare(arch, fast_loss, foak_classes, tiny_batches, train, micro=micro)
    if spec.rms_norm:
        n_norms = sum(type(m).__name__ == spec.rms_norm for m in model.modules())
        assert n_norms >= 5 and counts[f"foak.rms_norm.{spec.rms_norm}"] == n_norms
    assert counts.get(f"foak.rope.{spec.causal_lm}") == (1 if spec.rope else None)
    if spec.mlp:
        n_mlps = sum(type(m).__name__ == spec.mlp for m in model.modules())
        assert n_mlps == 2 and counts[f"foak.swiglu.{spec.mlp}"] == n_mlps
    if spec.experts_class() is not None:  # transformers 5: one packed experts gate
        assert counts[f"foak.swiglu.{spec.experts}"] == 1
    elif spec.expert_mlp_class() is not None:  # transformers 4.x: one MLP per expert
        name = spec.expert_mlp[0]
        n_experts = sum(type(m).__name__ == name for m in model.modules())
        assert n_experts >= 4 and counts[f"foak.swiglu.{name}"] == n_experts
    if fast_loss == "fused_ce_liger":
        assert counts["foak.loss.fused_linear_ce.forward"] == 1
        assert counts["foak.loss.fused_linear_ce.lm_head"] == 1
    else:
        assert counts["foak.loss.cross_entropy"] == 1
        assert counts["foak.loss.loss_function"] == 1
    # undone: our instance forwards removed (transformers 4.x sets its own output-recording
    # forwards on MoE blocks), module attributes restored
    ours = [
        name
        for name, m in model.named_modules()
        if "forward" in vars(m) and vars(m)["forward"].__module__.startswith("fms_acceleration")
    ]
    assert ours == []
    if spec.rope:
        assert spec.modeling_module().apply_rotary_pos_emb is not K.rope
    if spec.experts_class() is not None:
        assert spec.experts_class()._apply_gate.__module__.startswith("transformers")


def _grads_close(
    reference: torch.nn.Module, patched: torch.nn.Module, rel: float, per_tensor: bool
) -> None:
    """Relative gradient error per parameter, or over all parameters at once (MoE: a bf16
    rounding difference may route a token to another expert, moving that expert's gradient)."""
    wants, gots = [], []
    for (name, p_ref), (_, p_got) in zip(reference.named_parameters(), patched.named_parameters()):
        assert (p_ref.grad is None) == (p_got.grad is None), name
        if p_ref.grad is None:
            continue
        want, got = p_ref.grad.float().flatten(), p_got.grad.float().flatten()
        wants.append(want)
        gots.append(got)
        err = (got - want).norm().item() / max(want.norm().item(), 1e-12)
        assert not per_tensor or err <= rel, f"{name}: relative gradient error {err:.3g} > {rel}"
    want, got = torch.cat(wants), torch.cat(gots)
    assert (got - want).norm().item() <= rel * want.norm().item()


@pytest.mark.skipif(not ON_CUDA, reason="needs CUDA (scripts/gpu/suite.sh)")
@pytest.mark.parametrize("mode", ["bf16_weights", "autocast"])
@pytest.mark.parametrize(
    "arch, fast_loss", MATRIX, ids=[f"{a}-{'ce' if f is True else 'fused_ce'}" for a, f in MATRIX]
)
def test_patched_model_matches_unpatched_on_cuda_bf16(arch, fast_loss, mode, foak_classes):
    # The compiled kernels on the GPU, in bf16 weights or fp32 weights under bf16 autocast (the
    # Trainer's bf16=True): loss and every gradient within bf16 tolerance of the unpatched model.
    reference = _tiny_model(arch).cuda()
    if mode == "bf16_weights":
        reference = reference.to(torch.bfloat16)
    patched = copy.deepcopy(reference)
    batch = {k: v.cuda() for k, v in tiny_batches_one()[0].items()}
    framework = build_framework(_stanza(fast_loss), foak_classes)
    patched, _ = framework.augmentation(patched, SimpleNamespace(fp16=False, bf16=True), ())
    losses = []
    try:
        for model in (reference, patched):
            model.train()
            torch.manual_seed(0)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode == "autocast"):
                loss = model(**batch).loss
            loss.backward()
            losses.append(loss.detach().float())
    finally:
        framework.undo_patches()
    torch.testing.assert_close(losses[1], losses[0], atol=2e-2, rtol=2e-2)
    _grads_close(reference, patched, rel=6e-2, per_tensor=ARCHITECTURES[arch].experts is None)


def tiny_batches_one() -> list[dict]:
    from fms_acceleration.testing import tiny_dataset

    rows = tiny_dataset(n=4, seq_len=16, vocab=128, seed=0)
    batch = {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}
    batch["labels"][1, -5:] = -100
    return [batch]


@pytest.mark.skipif(ON_CUDA, reason="interpreter test (CPU tensors); CUDA runs the bf16 test")
def test_llama_with_triton_kernels_in_interpreter(foak_classes, tiny_batches, train):
    # The interpreter runs each Triton program in Python: 2 steps, 1 micro-batch keep this short.
    with K.backend("triton"):
        _compare("llama", "fused_ce_liger", foak_classes, tiny_batches, train, steps=2, micro=1)
    fused = _triton_graph_and_loss("fused_ce_liger", foak_classes, tiny_batches)
    assert "FusedLinearCrossEntropyFunctionBackward" in fused[0]
    plain = _triton_graph_and_loss(True, foak_classes, tiny_batches)
    assert "CrossEntropyFunctionBackward" in plain[0]
    for names, _ in (fused, plain):
        assert {
            "RMSNormFunctionBackward",
            "RoPEFunctionBackward",
            "SwiGLUFunctionBackward",
        } <= names
    reference = _tiny_model("llama").train()(**tiny_batches(1, micro=1)[0][0]).loss
    for _, loss in (fused, plain):
        torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)


def _triton_graph_and_loss(fast_loss, foak_classes, tiny_batches) -> tuple[set[str], torch.Tensor]:
    """The autograd node names of one patched training forward (kernels really ran) and its loss."""
    model = _tiny_model("llama")
    framework = build_framework(_stanza(fast_loss), foak_classes)
    model, _ = framework.augmentation(model, NO_MIXED_PRECISION, ())
    model.train()
    try:
        with K.backend("triton"):
            loss = model(**tiny_batches(1, micro=1)[0][0]).loss
    finally:
        framework.undo_patches()
    return _grad_fn_names(loss), loss.detach()


def test_fused_ce_leaves_evaluation_untouched(foak_classes, tiny_batches):
    model = _tiny_model("qwen2")
    framework = build_framework(_stanza("fused_ce_liger"), foak_classes)
    model, _ = framework.augmentation(model, NO_MIXED_PRECISION, ())
    batch = tiny_batches(1, micro=1)[0][0]
    try:
        model.train()
        train_out = model(**batch)
        model.eval()
        with torch.no_grad():
            eval_out = model(**batch)
            as_tuple = model(**batch, return_dict=False)
    finally:
        framework.undo_patches()
    assert train_out.logits is None and train_out.loss.requires_grad
    assert eval_out.logits.shape == (4, 16, 128)
    torch.testing.assert_close(eval_out.loss, train_out.loss.detach(), atol=1e-5, rtol=1e-5)
    assert torch.equal(as_tuple[0], eval_out.loss) and torch.equal(as_tuple[1], eval_out.logits)


def test_fast_loss_patch_keeps_loss_mapping_for_the_trainer(foak_classes):
    # Trainer compares LOSS_MAPPING[loss_type] with ForCausalLMLoss to count shifted labels; the
    # fast loss is what this model resolves inside its own forward, and nowhere else.
    from transformers.modeling_utils import PreTrainedModel

    from fms_acceleration_foak.models.loss import fast_causal_lm_loss

    loss_utils = importlib.import_module("transformers.loss.loss_utils")
    original = PreTrainedModel.__dict__["loss_function"]
    fixed_ce = loss_utils.fixed_cross_entropy
    patched, other = _tiny_model("llama").to(DEVICE), _tiny_model("llama")
    framework = build_framework(_stanza(True, rms=False, rope=False), foak_classes)
    framework.augmentation(patched, NO_MIXED_PRECISION, ())
    seen = {}
    # read the resolution from inside the patched model's forward (its decoder runs in it)
    hook = patched.model.register_forward_hook(
        lambda *_: seen.update(inside=patched.loss_function, other=other.loss_function)
    )
    try:
        assert PreTrainedModel.__dict__["loss_function"] is not original
        assert loss_utils.LOSS_MAPPING["ForCausalLM"] is loss_utils.ForCausalLMLoss
        assert loss_utils.fixed_cross_entropy is fixed_ce
        # outside a forward, and for another model, nothing changes
        assert patched.loss_function is loss_utils.ForCausalLMLoss
        assert other.loss_function is loss_utils.ForCausalLMLoss
        ids = torch.tensor([[5, 6, 7]], device=DEVICE)
        batch = {"input_ids": ids, "labels": ids}
        with K.backend("triton"):
            loss = patched(**batch).loss
        assert seen == {"inside": fast_causal_lm_loss, "other": loss_utils.ForCausalLMLoss}
        assert "CrossEntropyFunctionBackward" in _grad_fn_names(loss)
        other.loss_function = fixed_ce  # a loss set by the user wins
        assert other.loss_function is fixed_ce
    finally:
        hook.remove()
        framework.undo_patches()
    assert PreTrainedModel.__dict__["loss_function"] is original


def _first_non_view(node):
    """The first autograd node below `node` that is not a reshape/view of its input."""
    while node is not None and type(node).__name__.rstrip("0123456789") in (
        "ViewBackward",
        "ReshapeAliasBackward",
        "UnsafeViewBackward",
        "TransposeBackward",
    ):
        node = node.next_functions[0][0]
    return node


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fast_loss_takes_low_precision_logits_without_fp32_copy(seed, dtype):
    device = DEVICE
    # Fix 1: ForCausalLMLoss upcasts logits to fp32 and saves that copy (and then makes an fp32
    # gradient); the fast loss feeds the logits to the kernel as they are.
    from transformers.loss.loss_utils import ForCausalLMLoss

    from fms_acceleration_foak.models.loss import fast_causal_lm_loss

    batch, seq, vocab = 3, 37, 1000
    logits = (torch.randn(batch, seq, vocab, device=device) * 3).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq), device=device)
    labels[0, :5] = -100
    saved: list[torch.Tensor] = []

    def run(loss_fn, **kwargs):
        leaf = logits.clone().requires_grad_(True)
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            loss = loss_fn(leaf, labels, vocab, **kwargs)
        loss.backward()
        return loss, leaf.grad, sum(t.numel() * t.element_size() for t in saved), loss.grad_fn

    with K.backend("triton"):
        fast, fast_grad, fast_saved, fast_fn = run(fast_causal_lm_loss, num_items_in_batch=90)
    ref, ref_grad, ref_saved, _ = run(ForCausalLMLoss, num_items_in_batch=90)
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)
    assert fast_grad.dtype == dtype
    torch.testing.assert_close(fast_grad.float(), ref_grad.float(), atol=2e-3, rtol=2e-2)
    logits_bytes = logits.numel() * logits.element_size()
    # the kernel keeps the logits themselves (plus per-row lse and the labels); HF an fp32 copy
    assert fast_saved < 1.1 * logits_bytes and ref_saved >= 2 * logits_bytes
    names = set()
    node = fast_fn
    while node is not None:
        names.add(type(node).__name__)
        if type(node).__name__ == "CrossEntropyFunctionBackward":
            below = _first_non_view(node.next_functions[0][0])
            assert type(below).__name__ == "AccumulateGrad"  # no ToCopyBackward (no .float())
            break
        node = node.next_functions[0][0] if node.next_functions else None
    assert "CrossEntropyFunctionBackward" in names


def _trainer_run(model, tmp_path, framework=None):
    from transformers import Trainer, TrainingArguments, default_data_collator

    from fms_acceleration.testing import tiny_dataset

    rows = tiny_dataset(n=24, seq_len=16, seed=3)
    for i, row in enumerate(rows):  # uneven label counts per micro-batch
        row["labels"] = row["labels"][: 16 - i % 7] + [-100] * (i % 7)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=3,
        max_steps=2,
        learning_rate=3e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=7,
        disable_tqdm=True,
    )
    if framework is not None:
        model, _ = framework.augmentation(model, args, ())
    trainer = Trainer(
        model=model, args=args, train_dataset=rows, data_collator=default_data_collator
    )
    if framework is not None:
        for callback in framework.get_callbacks_and_ready_for_train(model, trainer.accelerator):
            trainer.add_callback(callback)
    trainer.train()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log], model


@pytest.mark.parametrize("fast_loss", [True, "fused_ce_liger"], ids=["ce", "fused_ce"])
def test_trainer_gradient_accumulation_matches(fast_loss, foak_classes, tmp_path):
    # the Trainer passes num_items_in_batch; the patched loss must scale accumulation the same
    reference = _tiny_model("mistral")
    patched = copy.deepcopy(reference)
    expected, reference = _trainer_run(reference, tmp_path / "ref")
    framework = build_framework(_stanza(fast_loss), foak_classes)
    with K.backend("torch"):
        try:
            got, patched = _trainer_run(patched, tmp_path / "foak", framework)
        finally:
            framework.undo_patches()
    assert len(got) == len(expected) == 2
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-4, rtol=1e-4)
    for p_ref, p_got in zip(reference.parameters(), patched.parameters()):
        torch.testing.assert_close(p_got, p_ref, atol=5e-4, rtol=1e-3)
