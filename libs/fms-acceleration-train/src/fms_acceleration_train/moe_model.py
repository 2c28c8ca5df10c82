"""`--model smollm2-moe`: the embedded SmolLM2-135M-Instruct up-cycled into a Mixtral MoE.

Sparse up-cycling: every decoder layer's dense SwiGLU MLP becomes 8 experts that start as
copies of it, behind a new top-2 router; attention, norms and embeddings are SmolLM2's. With
identical experts and top-k weights that sum to one, the up-cycled model computes what SmolLM2
does, so it starts as a trained model (answers and loss are SmolLM2's) while its MoE blocks run
through whatever MoE acceleration is configured. Built once from the embedded model and cached
beside it (about 2.7 GB in float32: 8 x 30 expert MLPs).
"""

from __future__ import annotations

from pathlib import Path

from .model_source import publishing

MOE_MODEL = "smollm2-moe"
EXPERTS = 8
TOP_K = 2
ROUTER_STD = 0.02
_SEED = 0


def moe_config(dense_config):
    """The Mixtral config of the up-cycled model, from SmolLM2's Llama config."""
    from transformers import MixtralConfig

    keep = (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "hidden_act", "max_position_embeddings",
        "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
    )  # fmt: skip
    # transformers 5 keeps rope settings in rope_parameters, 4.x as rope_theta
    rope = getattr(dense_config, "rope_parameters", None)
    rope = {"rope_parameters": dict(rope)} if rope else {"rope_theta": dense_config.rope_theta}
    config = MixtralConfig(
        **{k: getattr(dense_config, k) for k in keep},
        **rope,
        num_local_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        sliding_window=None,
        router_jitter_noise=0.0,
    )
    config.head_dim = dense_config.hidden_size // dense_config.num_attention_heads
    return config


def upcycle(dense):
    """A MixtralForCausalLM whose experts are copies of `dense`'s MLPs (a LlamaForCausalLM)."""
    import torch
    from transformers import MixtralForCausalLM

    from fms_acceleration import compat

    torch.manual_seed(_SEED)
    moe = MixtralForCausalLM(moe_config(dense.config)).to(dense.dtype)
    dense_state = dense.state_dict()
    own = {k: v for k, v in dense_state.items() if ".mlp." not in k}
    _, unexpected = moe.load_state_dict(own, strict=False)
    if unexpected:
        raise ValueError(f"up-cycling: SmolLM2 weights with no place in the MoE: {unexpected}")
    with torch.no_grad():
        for index, layer in enumerate(moe.model.layers):
            mlp = dense.model.layers[index].mlp
            block = layer.mlp if compat.fused_moe_experts() else layer.block_sparse_moe
            block.gate.weight.normal_(0.0, ROUTER_STD)
            gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
            if compat.fused_moe_experts():
                block.experts.gate_up_proj.copy_(torch.cat([gate, up]).expand(EXPERTS, -1, -1))
                block.experts.down_proj.copy_(down.expand(EXPERTS, -1, -1))
            else:
                for expert in block.experts:
                    expert.w1.weight.copy_(gate)
                    expert.w3.weight.copy_(up)
                    expert.w2.weight.copy_(down)
    moe.tie_weights()
    return moe.eval()


def build_moe_model(dense_dir: Path, target: Path) -> Path:
    """Up-cycle the HF model at `dense_dir` into `target` (written atomically) with its
    tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with publishing(target) as staging:
        dense = AutoModelForCausalLM.from_pretrained(dense_dir)
        upcycle(dense).save_pretrained(staging)
        AutoTokenizer.from_pretrained(dense_dir).save_pretrained(staging)
    return target


def resolve_moe_model(dense_dir: Path) -> Path:
    """The cached up-cycled model (built from `dense_dir` the first time)."""
    from fms_acceleration import compat

    line = "5" if compat.fused_moe_experts() else "4"  # the layout save_pretrained wrote
    target = dense_dir.parent / f"{dense_dir.name}-moe{EXPERTS}x{TOP_K}-tf{line}"
    if not (target / "config.json").is_file():
        print(f"up-cycling {dense_dir.name} into {EXPERTS} experts, top-{TOP_K} in {target} (once)")
        build_moe_model(dense_dir, target)
    return target
