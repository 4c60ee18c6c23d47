"""Tiny random mlx-lm models of every family that runs the gated delta rule, and helpers to
compare them (shared by tests/test_families.py and tests/distributed_worker.py)."""

from __future__ import annotations

import importlib

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from mlx_gdn.models.layers import DropInLayer
from mlx_gdn.models.patch import DROP_INS

VOCAB = 96  # even, so a 2-way shard splits the vocabulary
F32_TOL, BF16_TOL = 1e-4, 2e-2

_QWEN = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=VOCAB, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=32,
    linear_value_head_dim=16, linear_conv_kernel_dim=4, full_attention_interval=4, rms_norm_eps=1e-6,
    tie_word_embeddings=False, max_position_embeddings=512,
)
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
_KDA = dict(num_heads=4, head_dim=32, short_conv_kernel_size=4, kda_layers=[1, 2])
_MLA = dict(kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)

CONFIGS = {
    "qwen3_5": dict(model_type="qwen3_5", text_config=dict(_QWEN, model_type="qwen3_5_text")),
    "qwen3_5_moe": dict(model_type="qwen3_5_moe", text_config=dict(**_QWEN, **_MOE, model_type="qwen3_5_moe_text")),
    "qwen3_next": dict(**_QWEN, **_MOE, model_type="qwen3_next", decoder_sparse_step=1, mlp_only_layers=[1],
                       rope_theta=10000.0, partial_rotary_factor=0.25),
    "kimi_linear": dict(
        model_type="kimi_linear", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=96, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5,
        linear_attn_config=_KDA, model_max_length=512, num_experts=4, moe_intermediate_size=32,
        mla_use_nope=True, num_experts_per_token=2, num_shared_experts=1, first_k_dense_replace=1, **_MLA,
    ),
    "kimi_k3": dict(model_type="kimi_k3", text_config=dict(
        model_type="kimi_linear", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=96, rms_norm_eps=1e-5,
        linear_attn_config=dict(_KDA, gate_lower_bound=-5.0), q_lora_rank=32, num_experts=4,
        num_experts_per_token=2, moe_intermediate_size=32, num_shared_experts=1, first_k_dense_replace=1,
        attn_res_block_size=2, **_MLA,
    )),
    "bailing_moe_v3": dict(
        model_type="bailing_moe_v3", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
        moe_intermediate_size=32, moe_shared_expert_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_experts=4, num_experts_per_tok=2, num_shared_experts=1,
        first_k_dense_replace=1, n_group=2, topk_group=1, layer_group_size=4, head_dim=32, q_lora_rank=32,
        max_position_embeddings=512, **_MLA,
    ),
    "olmo_hybrid": dict(
        model_type="olmo_hybrid", hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=VOCAB, max_position_embeddings=512,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=16,
        linear_conv_kernel_dim=4, linear_allow_neg_eigval=True, tie_word_embeddings=False, attention_bias=False,
    ),
}
FAMILIES = list(CONFIGS)
# Families whose mlx-lm layer keeps padding out of its states (OLMo Hybrid's does not).
MLX_LM_PAD_PROOF = [f for f in FAMILIES if f != "olmo_hybrid"]
N_LINEAR = {"kimi_linear": 2, "kimi_k3": 2}  # others: 3 of 4 layers


def mlx_lm_layer_classes() -> tuple:
    return tuple(cls.mlx_lm_class() for cls in DROP_INS)


def gdn_layers(model) -> list:
    """The model's gated delta layers (mlx-lm's or drop-ins), in order."""
    theirs = mlx_lm_layer_classes()
    return [m for _, m in model.named_modules()[::-1] if isinstance(m, theirs + (DropInLayer,))]


def tiny_model(family: str, seed: int) -> nn.Module:
    """A tiny random mlx-lm model in eval mode; weights from `seed`, decay rates and biases spread
    like a trained layer's (mlx-lm initialises some of them to constants)."""
    mx.random.seed(seed)
    mod = importlib.import_module(f"mlx_lm.models.{family}")
    model = mod.Model(mod.ModelArgs.from_dict(CONFIGS[family]))
    rng = np.random.default_rng(seed)
    for layer in gdn_layers(model):
        layer.A_log = mx.array(np.log(rng.uniform(1.0, 16.0, layer.A_log.shape)).astype(np.float32))
        layer.dt_bias = mx.array(rng.standard_normal(layer.dt_bias.shape).astype(np.float32))
    mx.eval(model.parameters())
    model.eval()
    return model


def rel(a, b) -> float:
    a = np.asarray(mx.array(a).astype(mx.float32), dtype=np.float64)
    b = np.asarray(mx.array(b).astype(mx.float32), dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def tokens(seed: int, shape) -> mx.array:
    return mx.array(np.random.default_rng(seed + 1).integers(0, VOCAB, shape).astype(np.int32))


def n_linear(family: str) -> int:
    return N_LINEAR.get(family, 3)


def prompt_and_decode(model, toks, P: int):
    """(logits of one call over toks, logits of a prefill of P tokens then one token at a time)."""
    full = model(toks)
    cache = make_prompt_cache(model)
    steps = [model(toks[:, :P], cache=cache)]
    steps += [model(toks[:, t : t + 1], cache=cache) for t in range(P, toks.shape[1])]
    return full, mx.concatenate(steps, axis=1)
