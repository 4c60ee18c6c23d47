"""The mlx-lm drop-in for the Qwen families: mlx_gdn.GatedDeltaNet / Qwen3NextGatedDeltaNet and
mlx_gdn.patch (every family: tests/test_families.py).

Every test builds tiny random mlx-lm models (real mlx-lm classes) from a fresh seed, reported in
the assertion messages, and compares the patched model with the unpatched one.
"""

from __future__ import annotations

import copy
import io
import json
import re
import warnings
from collections import Counter

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

mlx_lm = pytest.importorskip("mlx_lm", reason="mlx-lm is an optional dependency")
from mlx_lm.generate import batch_generate, generate_step  # noqa: E402
from mlx_lm.models import qwen3_5, qwen3_5_moe, qwen3_next  # noqa: E402
from mlx_lm.models.cache import ArraysCache, BatchKVCache, make_prompt_cache  # noqa: E402

import mlx_gdn  # noqa: E402
from mlx_gdn.models.layers import Qwen3NextGatedDeltaNet  # noqa: E402
from mlx_gdn.testing import fresh_seed, tolerance  # noqa: E402

VOCAB = 97
F32_TOL, BF16_TOL = tolerance(mx.float32), tolerance(mx.bfloat16)

_COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,  # layers 0-2 linear, layer 3 full attention
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=VOCAB,
    linear_num_value_heads=4,
    linear_num_key_heads=2,
    linear_key_head_dim=32,
    linear_value_head_dim=16,
    linear_conv_kernel_dim=4,
    full_attention_interval=4,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    max_position_embeddings=512,
)
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)


def config(model_type: str) -> dict:
    """config.json contents of a tiny random model of this type."""
    if model_type == "qwen3_5":
        return dict(model_type="qwen3_5", text_config=dict(_COMMON, model_type="qwen3_5_text"))
    if model_type == "qwen3_5_moe":
        return dict(model_type="qwen3_5_moe", text_config=dict(**_COMMON, **_MOE, model_type="qwen3_5_moe_text"))
    if model_type == "qwen3_next":
        return dict(
            **_COMMON, **_MOE, model_type="qwen3_next", decoder_sparse_step=1, mlp_only_layers=[1],
            rope_theta=10000.0, partial_rotary_factor=0.25,
        )
    raise ValueError(model_type)


_CLASSES = {"qwen3_5": qwen3_5, "qwen3_5_moe": qwen3_5_moe, "qwen3_next": qwen3_next}


def tiny_model(model_type: str, seed: int, dtype=mx.float32) -> nn.Module:
    """A tiny random mlx-lm model in eval mode; weights drawn from `seed` (A_log, dt_bias varied)."""
    mx.random.seed(seed)
    mod = _CLASSES[model_type]
    model = mod.Model(mod.ModelArgs.from_dict(config(model_type)))
    # Spread dt_bias and the norm weights away from their constant initial values.
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if layer.is_linear:
            la = layer.linear_attn
            la.dt_bias = mx.array(rng.standard_normal(la.dt_bias.shape).astype(np.float32))
            la.norm.weight = mx.array(rng.uniform(0.5, 1.5, la.norm.weight.shape).astype(np.float32))
    if dtype != mx.float32:
        # As mlx-lm's loader does: everything in the model dtype except A_log.
        params = [(k, v if k.endswith("A_log") else v.astype(dtype)) for k, v in tree_flatten(model.parameters())]
        model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    model.eval()
    return model


def rel(a: mx.array, b: mx.array) -> float:
    a = np.asarray(a.astype(mx.float32), dtype=np.float64)
    b = np.asarray(b.astype(mx.float32), dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def tokens(seed: int, shape) -> mx.array:
    return mx.array(np.random.default_rng(seed + 1).integers(0, VOCAB, shape).astype(np.int32))


def gdn_layers(model):
    return [l.linear_attn for l in model.layers if l.is_linear]


MODEL_TYPES = ["qwen3_5", "qwen3_5_moe", "qwen3_next"]


# --------------------------------------------------------------------------------------------
# The layer classes


@pytest.mark.parametrize(
    "model_type,ours,theirs",
    [("qwen3_5", mlx_gdn.GatedDeltaNet, qwen3_5.GatedDeltaNet),
     ("qwen3_next", Qwen3NextGatedDeltaNet, qwen3_next.Qwen3NextGatedDeltaNet)],
)
def test_layer_has_mlx_lm_parameters_and_loads_its_weights(model_type, ours, theirs):
    seed = fresh_seed()
    mx.random.seed(seed)
    cfg = config(model_type)
    args = (qwen3_5.TextModelArgs.from_dict(cfg["text_config"]) if model_type == "qwen3_5"
            else qwen3_next.ModelArgs.from_dict(cfg))
    ref, mine = theirs(args), ours(args)
    ref_shapes = {k: v.shape for k, v in tree_flatten(ref.parameters())}
    mine_shapes = {k: v.shape for k, v in tree_flatten(mine.parameters())}
    assert mine_shapes == ref_shapes, f"seed={seed}"
    mine.load_weights(tree_flatten(ref.parameters()), strict=True)
    ref.eval(), mine.eval()
    x = mx.random.normal((2, 5, 64))
    assert rel(mine(x), ref(x)) < F32_TOL, f"seed={seed}"


def test_layer_decode_step_with_mask_matches_mlx_lm():
    """T=1 with a batch mask (the fused decode path): valid rows equal mlx-lm's layer, masked rows
    keep their recurrent state and shift a zero input into the conv state."""
    seed = fresh_seed()
    mx.random.seed(seed)
    args = qwen3_5.TextModelArgs.from_dict(config("qwen3_5")["text_config"])
    ref = qwen3_5.GatedDeltaNet(args)
    ref.eval()
    mine = mlx_gdn.GatedDeltaNet.from_layer(ref)
    B = 3
    x = mx.random.normal((B, 1, 64))
    mask = mx.array([[True], [False], [True]])
    conv0 = mx.random.normal((B, 3, ref.conv_dim))
    state0 = mx.random.normal((B, 4, 16, 32)) * 0.1
    caches = []
    for _ in range(2):
        c = ArraysCache(2)
        c[0], c[1] = conv0, state0
        caches.append(c)
    y_ref = ref(x, mask, caches[0])
    y = mine(x, mask, caches[1])
    valid = mx.array([0, 2])
    assert rel(y[valid], y_ref[valid]) < F32_TOL, f"seed={seed}"
    assert rel(caches[1][1][valid], caches[0][1][valid]) < F32_TOL, f"seed={seed}"
    assert np.array_equal(np.asarray(caches[1][1][1]), np.asarray(state0[1])), f"seed={seed}"
    assert np.array_equal(np.asarray(caches[1][0]), np.asarray(caches[0][0])), f"seed={seed}"
    assert float(mx.abs(caches[1][0][1, -1]).max()) == 0.0, f"seed={seed}"


# --------------------------------------------------------------------------------------------
# patch on whole models


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_patched_logits_match_prompt_and_decode(model_type):
    seed = fresh_seed()
    dtype, tol = mx.float32, F32_TOL
    model = tiny_model(model_type, seed, dtype)
    toks = tokens(seed, (2, 11))
    P = 6

    def run(m):
        full = m(toks)
        cache = make_prompt_cache(m)
        steps = [m(toks[:, :P], cache=cache)]
        steps += [m(toks[:, t : t + 1], cache=cache) for t in range(P, toks.shape[1])]
        return full, mx.concatenate(steps, axis=1)

    ref_full, ref_steps = run(model)
    n = mlx_gdn.patch(model)
    assert n == 3 and dict(n.items()) == {model_type: 3}, f"seed={seed}: replaced {n!r}"
    assert all(isinstance(l, mlx_gdn.models.layers._GatedDeltaBase) for l in gdn_layers(model))
    full, steps = run(model)
    msg = f"seed={seed} {model_type} {dtype}"
    assert rel(full, ref_full) < tol, msg
    assert rel(steps, ref_steps) < tol, msg
    # State carried across calls (prefill, then one token at a time) equals one long call.
    assert rel(steps, full) < tol, msg


def test_bf16_layer_matches_mlx_lm_prompt_and_decode():
    """bf16 activations: one layer against mlx-lm's on the same inputs (prompt, then decode)."""
    seed = fresh_seed()
    mx.random.seed(seed)
    args = qwen3_5.TextModelArgs.from_dict(config("qwen3_5")["text_config"])
    ref = qwen3_5.GatedDeltaNet(args)
    ref.update(tree_unflatten([(k, v if k.endswith("A_log") else v.astype(mx.bfloat16))
                               for k, v in tree_flatten(ref.parameters())]))
    ref.eval()
    mine = mlx_gdn.GatedDeltaNet.from_layer(ref)
    x = mx.random.normal((2, 9, 64)).astype(mx.bfloat16)
    outs = []
    for layer in (ref, mine):
        cache = ArraysCache(2)
        outs.append(mx.concatenate([layer(x[:, :5], None, cache)] + [layer(x[:, t : t + 1], None, cache) for t in range(5, 9)], 1))
        outs.append(cache[1])
    assert outs[2].dtype == mx.bfloat16 and outs[3].dtype == mx.float32
    assert rel(outs[2], outs[0]) < BF16_TOL, f"seed={seed}"
    assert rel(outs[3], outs[1]) < BF16_TOL, f"seed={seed}"


def test_bf16_model_as_close_to_float32_as_mlx_lm():
    """A whole bf16 model drifts from its float32 computation by a few percent through the layers
    mlx-gdn does not touch, so the patched bf16 model is held to mlx-lm's own bf16 drift (same
    weights, float32 computation as the reference) rather than to a fixed bound.

    The bound holds for the median over nine weight draws. Fed the same bf16 input, each patched
    layer is as close to float32 as mlx-lm's (within a few percent of each other). But two bf16
    computations that round at different places diverge through the rest of the model by an
    amount that varies from draw to draw: one draw's ratio centres on 1.0, exceeded 1.25 in about
    1 draw in 15 and reached 1.76. A patched model that is worse in general still moves the
    median."""
    seed = fresh_seed()
    seeds = [(seed + i) % 2**32 for i in range(9)]
    ratios = []
    for s in seeds:
        bf = tiny_model("qwen3_5", s, mx.bfloat16)
        f32 = tiny_model("qwen3_5", s)
        f32.update(tree_unflatten([(k, v.astype(mx.float32)) for k, v in tree_flatten(bf.parameters())]))
        toks = tokens(s, (2, 11))
        truth, ref = f32(toks), bf(toks)
        mlx_gdn.patch(bf)
        out = bf(toks)
        assert out.dtype == mx.bfloat16
        ratios.append(rel(out, truth) / rel(ref, truth))
    assert float(np.median(ratios)) < 1.25, f"seeds={seeds}: patched / mlx-lm error ratios {ratios}"


def _greedy(model, prompt, cache, n_decode):
    """Run `prompt` [B, L] through `model` with `cache`, then greedy-decode n_decode tokens;
    returns (tokens [B, n], logits [B, n, vocab])."""
    logits = model(prompt, cache=cache)[:, -1]
    out_tok, out_logits = [], []
    for _ in range(n_decode):
        tok = mx.argmax(logits, axis=-1)
        out_tok.append(tok)
        logits = model(tok[:, None], cache=cache)[:, -1]
        out_logits.append(logits)
    return mx.stack(out_tok, 1), mx.stack(out_logits, 1)


def _left_padded_run(model, seqs, n_decode):
    """`seqs` left-padded into one batch, prefilled and greedy-decoded together."""
    L = max(len(s) for s in seqs)
    pad = [L - len(s) for s in seqs]
    batch = mx.array([[0] * p + s for p, s in zip(pad, seqs)])
    cache = [ArraysCache(2, left_padding=pad) if l.is_linear else BatchKVCache(pad) for l in model.layers]
    return _greedy(model, batch, cache, n_decode)


def _single_run(model, seq, n_decode):
    return _greedy(model, mx.array([seq]), make_prompt_cache(model), n_decode)


@pytest.mark.parametrize("model_type", ["qwen3_5", "qwen3_next"])
def test_left_padded_batch_matches_one_sequence_at_a_time(model_type):
    seed = fresh_seed()
    model = tiny_model(model_type, seed)
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(1, VOCAB, n).tolist() for n in (7, 3, 5)]
    ref_tok, ref_logits = _left_padded_run(model, seqs, 4)
    assert mlx_gdn.patch(model) == 3
    tok, logits = _left_padded_run(model, seqs, 4)
    msg = f"seed={seed} {model_type}"
    assert rel(logits, ref_logits) < F32_TOL, msg
    for i, s in enumerate(seqs):
        st, sl = _single_run(model, s, 4)
        assert rel(logits[i : i + 1], sl) < F32_TOL, f"{msg} sequence {i}"
        assert np.array_equal(np.asarray(tok[i : i + 1]), np.asarray(st)), f"{msg} sequence {i}"


class _IdTokenizer:
    """What batch_generate needs from a tokenizer: no end token, token ids as text."""

    eos_token_ids: list = []

    def decode(self, ids):
        return " ".join(map(str, ids))


def test_batch_generate_matches_unpatched_and_single_sequences():
    """mlx-lm's BatchGenerator (right padding with per-sequence lengths, merged caches)."""
    seed = fresh_seed()
    model = tiny_model("qwen3_5", seed)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, VOCAB, n).tolist() for n in (6, 2, 9)]

    def gen(m, ps):
        r = batch_generate(m, _IdTokenizer(), ps, max_tokens=5, return_token_ids=True)
        return [list(map(int, t)) for t in r.token_ids]

    ref = gen(model, prompts)
    mlx_gdn.patch(model)
    got = gen(model, prompts)
    assert got == ref, f"seed={seed}"
    singles = [gen(model, [p])[0] for p in prompts]
    assert got == singles, f"seed={seed}"


def test_model_saved_to_disk_loads_patches_and_generates_same_tokens(tmp_path):
    from mlx_lm.utils import load_model

    seed = fresh_seed()
    src = tiny_model("qwen3_5", seed)
    (tmp_path / "config.json").write_text(json.dumps(config("qwen3_5")))
    mx.save_safetensors(str(tmp_path / "model.safetensors"), dict(tree_flatten(src.parameters())))

    def greedy(m, n=8):
        prompt = tokens(seed, (7,))
        return [int(t) for t, _ in zip((t for t, _ in generate_step(prompt, m, max_tokens=n)), range(n))]

    model, _ = load_model(tmp_path)
    ref = greedy(model)
    assert mlx_gdn.patch(model) == 3, f"seed={seed}"
    assert greedy(model) == ref, f"seed={seed}"


def test_quantized_model_keeps_quantized_projections():
    seed = fresh_seed()
    model = tiny_model("qwen3_5", seed)
    nn.quantize(model, group_size=32, bits=4)
    before = [{k: getattr(l, k) for k in ("in_proj_qkv", "in_proj_z", "out_proj", "conv1d", "norm")}
              for l in gdn_layers(model)]
    toks = tokens(seed, (1, 9))
    ref = model(toks)
    assert mlx_gdn.patch(model) == 3
    for layer, subs in zip(gdn_layers(model), before):
        assert isinstance(layer.in_proj_qkv, nn.QuantizedLinear)
        assert all(getattr(layer, k) is v for k, v in subs.items()), f"seed={seed}"
    assert isinstance(model.layers[3].self_attn.q_proj, nn.QuantizedLinear)
    assert rel(model(toks), ref) < F32_TOL, f"seed={seed}"


@pytest.mark.parametrize("model_type", ["qwen3_5", "qwen3_next"])
def test_training_gradients_match_unpatched(model_type):
    seed = fresh_seed()
    model = tiny_model(model_type, seed)
    model.train()
    patched = copy.deepcopy(model)
    assert mlx_gdn.patch(patched) == 3
    assert all(l.training for l in gdn_layers(patched))
    toks = tokens(seed, (2, 8))

    def loss(m):
        logits = m(toks[:, :-1])
        return nn.losses.cross_entropy(logits, toks[:, 1:]).mean()

    l_ref, g_ref = nn.value_and_grad(model, loss)(model)
    l_new, g_new = nn.value_and_grad(patched, loss)(patched)
    assert rel(l_new, l_ref) < F32_TOL, f"seed={seed}"
    ref_flat, new_flat = dict(tree_flatten(g_ref)), dict(tree_flatten(g_new))
    assert ref_flat.keys() == new_flat.keys()
    gdn_keys = [k for k in ref_flat if "linear_attn" in k]
    assert any(float(mx.abs(ref_flat[k]).max()) > 0 for k in gdn_keys), f"seed={seed}: no gradient"
    for k in ref_flat:
        assert rel(new_flat[k], ref_flat[k]) < F32_TOL, f"seed={seed} {k}"


def test_patch_is_idempotent_and_sets_backend():
    seed = fresh_seed()
    model = tiny_model("qwen3_5", seed)
    assert mlx_gdn.patch(model) == 3
    layers = gdn_layers(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mlx_gdn.patch(model, backend="ops") == 0
    assert [id(l) for l in gdn_layers(model)] == [id(l) for l in layers]
    assert all(l.backend == "ops" for l in layers)


def test_patch_on_model_without_gdn_layers_warns_and_returns_zero():
    from mlx_lm.models import llama

    args = llama.ModelArgs(model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                           num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=VOCAB, num_key_value_heads=2)
    model = llama.Model(args)
    before = tree_flatten(model.parameters())
    with pytest.warns(UserWarning, match="no gated delta layers"):
        assert mlx_gdn.patch(model) == 0
    after = tree_flatten(model.parameters())
    assert [k for k, _ in after] == [k for k, _ in before]
    assert all(a is b for (_, a), (_, b) in zip(after, before))


def test_patch_rejects_unknown_backend():
    model = tiny_model("qwen3_5", fresh_seed())
    with pytest.raises(ValueError, match="backend"):
        mlx_gdn.patch(model, backend="tpu")
    assert not any(isinstance(l, mlx_gdn.models.layers._GatedDeltaBase) for l in gdn_layers(model))


def test_patched_model_under_simulated_metal(monkeypatch):
    try:
        from mlx_gdn.metal import backend as metal
        from mlx_gdn.models import decode_step as decode_layer
        from mlx_gdn.sim import simulated_metal
    except ImportError as e:
        pytest.skip(f"the Metal backend or its simulator is not in this build yet ({e})")
    calls = []
    real_run = metal.run

    def spy(p, *args, **kwargs):
        calls.append((p.T, kwargs.get("algorithm")))
        return real_run(p, *args, **kwargs)

    monkeypatch.setattr(metal, "run", spy)
    fused = []
    real_step = decode_layer.decode_step
    monkeypatch.setattr(decode_layer, "decode_step",
                        lambda *a, **k: fused.append((a[0], k.get("norm") is not None)) or real_step(*a, **k))
    seed = fresh_seed()
    model = tiny_model("qwen3_5", seed)
    toks = tokens(seed, (2, 7))
    cache = make_prompt_cache(model)
    ref = mx.concatenate([model(toks[:, :5], cache=cache)] + [model(toks[:, t : t + 1], cache=cache) for t in (5, 6)], 1)
    with simulated_metal():
        assert mlx_gdn.patch(model, backend="metal") == 3
        cache = make_prompt_cache(model)
        out = mx.concatenate([model(toks[:, :5], cache=cache)] + [model(toks[:, t : t + 1], cache=cache) for t in (5, 6)], 1)
        mx.eval(out)
    # Three layers, each a prompt call through the Metal recurrent launcher and two decode calls
    # through the fused T=1 step with the output norm (tests/test_decode_layer.py), none falling
    # back to ops.
    assert sorted(t for t, _ in calls) == [5] * 3, calls
    assert fused == [("metal", True)] * 6, fused
    assert rel(out, ref) < F32_TOL, f"seed={seed}"


# --------------------------------------------------------------------------------------------
# Work launched per layer at T=1 (method described in bench/NOTES.md, "Layer launches at T=1")

# Primitives that only describe a view of their input and launch nothing on their own.
VIEW_PRIMITIVES = {"Broadcast", "Reshape", "Flatten", "Unflatten", "Squeeze", "ExpandDims", "Slice", "Split", "Transpose",
                   "AsStrided"}


def graph_primitives(*outputs) -> list:
    """Labels of the primitives between the evaluated leaves and `outputs`, from MLX's DOT export."""
    buf = io.StringIO()
    mx.export_to_dot(buf, *outputs)
    return re.findall(r'label ="([^"]+)", shape=rectangle', buf.getvalue())


class _Const(nn.Module):
    def __init__(self, value):
        super().__init__()
        self._value = value

    def __call__(self, x):
        return self._value


class _First(nn.Module):
    def __call__(self, x, *rest):
        return x


def layer_step_primitives(layer, B=1):
    """Primitives of one T=1 step of `layer` between its projections: the projections are replaced
    by their evaluated outputs, the output norm and out_proj by identities."""
    mx.eval(layer.parameters())
    x = mx.random.normal((B, 1, layer.hidden_size))
    for name in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"):
        value = getattr(layer, name)(x)
        mx.eval(value)
        setattr(layer, name, _Const(value))
    layer.norm, layer.out_proj = _First(), _First()
    cache = ArraysCache(2)
    cache[0] = mx.random.normal((B, layer.conv_kernel_size - 1, layer.conv_dim))
    cache[1] = mx.random.normal((B, layer.num_v_heads, layer.head_v_dim, layer.head_k_dim))
    mx.eval(cache.state)
    y = layer(x, None, cache)
    return graph_primitives(y, cache[0], cache[1])


def launches(prims) -> int:
    return sum(1 for p in prims if p not in VIEW_PRIMITIVES)


def _recurrence_primitives(layer, B=1):
    """Primitives of `gated_delta_update` alone (ops backend) on evaluated inputs of the layer's sizes."""
    Hk, Hv, Dk, Dv = layer.num_k_heads, layer.num_v_heads, layer.head_k_dim, layer.head_v_dim
    ins = [mx.random.normal(s) for s in [(B, 1, Hk, Dk), (B, 1, Hk, Dk), (B, 1, Hv, Dv), (B, 1, Hv), (B, 1, Hv)]]
    state = mx.random.normal((B, Hv, Dv, Dk))
    mx.eval(ins, state, layer.A_log, layer.dt_bias)
    q, k, v, a, b = ins
    return graph_primitives(*mlx_gdn.gated_delta_update(q, k, v, a, b, layer.A_log, layer.dt_bias, state, backend="ops"))


@pytest.mark.parametrize("B", [1, 3])
def test_decode_step_launches_fewer_than_mlx_lm(B, capsys):
    args = qwen3_5.TextModelArgs.from_dict(config("qwen3_5")["text_config"])
    ref = qwen3_5.GatedDeltaNet(args)
    ref.eval()
    mine = mlx_gdn.GatedDeltaNet.from_layer(ref, backend="ops")
    p_ref, p_mine = layer_step_primitives(ref, B), layer_step_primitives(mine, B)
    p_rec = _recurrence_primitives(mine, B)
    prep = launches(p_mine) - launches(p_rec)
    with capsys.disabled():
        print(f"\nT=1 B={B} primitives between projections on this build (ops recurrence): "
              f"mlx-lm {launches(p_ref)}, mlx-gdn {launches(p_mine)} of which {prep} before the recurrence")
    # conv+SiLU, the squares, one sum of squares over q and k, the normalisation, the conv-state shift.
    assert prep == 5, dict(Counter(p for p in p_mine if p not in VIEW_PRIMITIVES))
    assert launches(p_mine) < launches(p_ref)


def _one_launch_step(backend, qkv, conv_state, w, a, b, A_log, dt_bias, state, mask, Hk, Hv, Dk, Dv, norm=None):
    """Stand-in for `decode_step.decode_step` that is one graph node (a Concatenate) over the same
    inputs, returning views of it in the kernel's output shapes: the graph then shows the fused
    kernel as the one launch it is (a simulated kernel evaluates its inputs, hiding the graph)."""
    ins = [qkv, conv_state, w, a, b, A_log, dt_bias, state] + ([] if norm is None else [norm.z, norm.weight])
    flat = mx.concatenate([x.reshape(-1) for x in ins])
    B, _, C = qkv.shape
    K = w.shape[1]
    shapes = [(B, 1, Hv, Dv), (B, K - 1, C), (B, Hv, Dv, Dk)]
    outs, at = [], 0
    for s in shapes:
        n = int(np.prod(s))
        outs.append(flat[at : at + n].reshape(s))
        at += n
    return tuple(outs)


def _cache_arrays(cache) -> list:
    """Every array a prompt cache holds (its layers' states, whatever their nesting)."""
    found = []

    def walk(x):
        if isinstance(x, mx.array):
            found.append(x)
        elif isinstance(x, (list, tuple)):
            for y in x:
                walk(y)

    walk([c.state for c in cache])
    return found


def _rms_norm_one_node(x, weight, eps):
    # mx.fast.rms_norm is one kernel on a GPU but several nodes in this CPU build's fallback.
    return x * weight if weight is not None else x * 1.0


def test_model_decode_step_launches_with_fused_norm(monkeypatch, capsys):
    """Launches of one decode step of a tiny patched Qwen3.5 model (3 linear layers, 1 attention
    layer), counted on the graph of its logits and caches (method of bench/NOTES.md "Layer launches
    at T=1"), with the fused kernel and mx.fast.rms_norm each standing as the one node they are on a
    GPU: the fused norm removes the norm's two launches (rms_norm, silu gate) per linear layer, and
    merged input projections (`merge_projections`) three more."""
    from mlx_gdn.models import decode_step as decode_layer
    from mlx_gdn.models import layers as layers_mod
    from mlx_gdn.sim import simulated_metal

    seed = fresh_seed()
    model = tiny_model("qwen3_5", seed)
    toks = tokens(seed, (1, 5))
    n_linear = len(gdn_layers(model))
    counts = {}
    with simulated_metal():
        assert mlx_gdn.patch(model, backend="metal") == n_linear
        for case in ("plain", "fused norm", "merged"):
            if case == "merged":
                assert all(layer.merge_projections() for layer in gdn_layers(model))
            cache = make_prompt_cache(model)
            mx.eval(model(toks[:, :4], cache=cache), _cache_arrays(cache))
            with monkeypatch.context() as m:
                m.setattr(decode_layer, "decode_step", _one_launch_step)
                m.setattr(mx.fast, "rms_norm", _rms_norm_one_node)
                if case == "plain":
                    m.setattr(layers_mod, "_gated_norm", lambda *a: None)
                logits = model(toks[:, 4:5], cache=cache)
                prims = graph_primitives(logits, *_cache_arrays(cache))
            counts[case] = launches(prims)
    with capsys.disabled():
        print(f"\nqwen3_5 tiny decode step, graph nodes (one per launch on a GPU), {n_linear} linear layers: "
              f"plain fused step + norm {counts['plain']}, fused norm {counts['fused norm']}, "
              f"and merged projections {counts['merged']}")
    assert counts["plain"] - counts["fused norm"] == 2 * n_linear, (counts, seed)
    assert counts["fused norm"] - counts["merged"] == 3 * n_linear, (counts, seed)
