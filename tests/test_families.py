"""`mlx_gdn.patch` on every mlx-lm family that runs the gated delta rule.

For each family a tiny random model of the real mlx-lm Model class (a few layers, some of them
linear attention, tiny vocab) is patched and compared with the unpatched model under what mlx-lm
does with it: prompt logits, token-by-token decoding with a prompt cache, save and reload, a
quantized model, left-padded batches, batch_generate and continuous batching (BatchGenerator).
Weights come from a fresh seed printed in every failure message. The patched layers must also be
pad-proof where mlx-lm's are not (OLMo Hybrid's convolution): a sequence padded into a batch gives
the logits and final states it gives alone.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

mlx_lm = pytest.importorskip("mlx_lm", reason="mlx-lm is an optional dependency")
from mlx_lm.generate import BatchGenerator, batch_generate, generate_step  # noqa: E402
from mlx_lm.models.cache import ArraysCache, BatchKVCache, KVCache, make_prompt_cache  # noqa: E402

import mlx_gdn  # noqa: E402
from family_models import (  # noqa: E402
    BF16_TOL, CONFIGS, F32_TOL, FAMILIES, MLX_LM_PAD_PROOF, VOCAB, gdn_layers, n_linear, prompt_and_decode, rel, tiny_model,
    tokens,
)
from mlx_gdn.models.layers import DropInLayer  # noqa: E402
from mlx_gdn.models.patch import DROP_INS  # noqa: E402
from mlx_gdn.testing import fresh_seed, tolerance  # noqa: E402

# --------------------------------------------------------------------------------------------
# One model at a time


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_and_decode_match_unpatched(family):
    seed = fresh_seed()
    model = tiny_model(family, seed)
    toks = tokens(seed, (2, 10))
    ref_full, ref_steps = prompt_and_decode(model, toks, 6)
    theirs = gdn_layers(model)
    report = mlx_gdn.patch(model)
    msg = f"seed={seed} {family}"
    assert report == n_linear(family) and report.total == n_linear(family), f"{msg}: {report!r}"
    assert dict(report.items()) == {family: n_linear(family)}, f"{msg}: {report!r}"
    ours = gdn_layers(model)
    assert len(ours) == len(theirs) and all(isinstance(l, DropInLayer) for l in ours), msg
    for a, b in zip(ours, theirs):  # the same arrays, not copies
        pa, pb = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
        assert pa.keys() == pb.keys() and all(pa[k] is pb[k] for k in pa), msg
    full, steps = prompt_and_decode(model, toks, 6)
    assert rel(full, ref_full) < F32_TOL, msg
    assert rel(steps, ref_steps) < F32_TOL, msg
    assert rel(steps, full) < F32_TOL, msg


@pytest.mark.parametrize("family", ["qwen3_5", "kimi_linear", "olmo_hybrid"])
def test_patch_twice_replaces_nothing_and_unpatch_restores(family):
    seed = fresh_seed()
    model = tiny_model(family, seed)
    toks = tokens(seed, (1, 7))
    ref = model(toks)
    classes = [type(l) for l in gdn_layers(model)]
    assert mlx_gdn.patch(model) == n_linear(family)
    patched = gdn_layers(model)
    again = mlx_gdn.patch(model, backend="ops")
    assert again == 0 and dict(again.items()) == {}, repr(again)
    assert [id(l) for l in gdn_layers(model)] == [id(l) for l in patched]
    assert all(l.backend == "ops" for l in patched)
    back = mlx_gdn.unpatch(model)
    assert back == n_linear(family), repr(back)
    assert [type(l) for l in gdn_layers(model)] == classes
    assert rel(model(toks), ref) < F32_TOL, f"seed={seed} {family}"


def test_patch_keeps_training_mode_and_frozen_parameters():
    seed = fresh_seed()
    model = tiny_model("bailing_moe_v3", seed)
    model.train()
    model.freeze()
    model.model.layers[0].attention.unfreeze(keys=["o_proj"], recurse=True)
    trainable = sorted(k for k, _ in tree_flatten(model.trainable_parameters()))
    assert mlx_gdn.patch(model) == 3
    assert all(l.training for l in gdn_layers(model))
    assert sorted(k for k, _ in tree_flatten(model.trainable_parameters())) == trainable


_CONSTRUCTED = {
    "kimi_linear": (mlx_gdn.models.KimiDeltaAttention, lambda m: (m.args, 0)),
    "kimi_k3": (mlx_gdn.models.KimiK3DeltaAttention, lambda m: (m.args.text_config, 0)),
    "bailing_moe_v3": (mlx_gdn.models.BailingKDA, lambda m: (m.args,)),
    "olmo_hybrid": (mlx_gdn.models.OlmoHybridGatedDeltaNet, lambda m: (m.args,)),
}


@pytest.mark.parametrize("family", list(_CONSTRUCTED))
def test_drop_in_built_from_config_has_mlx_lm_parameters(family):
    """Built from the model's arguments like mlx-lm's layer: same parameter names and shapes, and
    mlx-lm's layer's weights load into it (strict) and give its outputs."""
    seed = fresh_seed()
    model = tiny_model(family, seed)
    theirs = gdn_layers(model)[0]
    cls, ctor_args = _CONSTRUCTED[family]
    ours = cls(*ctor_args(model), backend="ops")
    want = {k: v.shape for k, v in tree_flatten(theirs.parameters())}
    assert {k: v.shape for k, v in tree_flatten(ours.parameters())} == want
    ours.load_weights(list(tree_flatten(theirs.parameters())), strict=True)
    ours.eval()
    mx.random.seed(seed)
    x = mx.random.normal((2, 6, 64))
    assert rel(ours(x), theirs(x)) < F32_TOL, f"seed={seed} {family}"


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_model_reloads_and_patches(family, tmp_path):
    from mlx_lm.utils import load_model, save_model

    seed = fresh_seed()
    src = tiny_model(family, seed)
    save_model(tmp_path, src)
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS[family]))
    toks = tokens(seed, (1, 9))
    ref = src(toks)
    model, _ = load_model(tmp_path)
    assert mlx_gdn.patch(model) == n_linear(family)
    assert rel(model(toks), ref) < F32_TOL, f"seed={seed} {family}"


@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_model_keeps_quantized_projections(family):
    seed = fresh_seed()
    model = tiny_model(family, seed)
    # Every layer whose input size the group size divides (the MLA heads' 16 it does not) but
    # Kimi K3's residual-mix vectors, which it reads as arrays.
    nn.quantize(model, group_size=32, bits=4,
                class_predicate=lambda path, m: (hasattr(m, "to_quantized") and m.weight.shape[-1] % 32 == 0
                                                 and not path.endswith("res_proj")))
    before = [dict(l.children()) for l in gdn_layers(model)]
    assert any(isinstance(m, nn.QuantizedLinear) for subs in before for m in subs.values())
    toks = tokens(seed, (2, 8))
    ref_full, ref_steps = prompt_and_decode(model, toks, 5)
    assert mlx_gdn.patch(model) == n_linear(family)
    for layer, subs in zip(gdn_layers(model), before):
        assert all(getattr(layer, k) is v for k, v in subs.items()), f"seed={seed} {family}"
    full, steps = prompt_and_decode(model, toks, 5)
    assert rel(full, ref_full) < F32_TOL, f"seed={seed} {family}"
    assert rel(steps, ref_steps) < F32_TOL, f"seed={seed} {family}"


@pytest.mark.parametrize("family", ["kimi_linear", "kimi_k3", "bailing_moe_v3", "olmo_hybrid"])
def test_bf16_layer_matches_mlx_lm(family):
    """bf16 weights and activations (A_log kept float32, as mlx-lm's loader does): one layer
    against mlx-lm's on the same input, prompt then decode, outputs and final recurrent state."""
    seed = fresh_seed()
    model = tiny_model(family, seed)
    ref = gdn_layers(model)[0]  # layer 0 in every family
    ref.update(tree_unflatten([(k, v if k.endswith("A_log") else v.astype(mx.bfloat16))
                               for k, v in tree_flatten(ref.parameters())]))
    mine = next(cls for cls in DROP_INS if cls.mlx_lm_class() is type(ref)).from_layer(ref)
    mx.random.seed(seed)
    x = mx.random.normal((2, 9, 64)).astype(mx.bfloat16)
    outs = []
    for layer in (ref, mine):
        cache = make_prompt_cache(model)[0]
        y = [layer(x[:, :5], None, cache)] + [layer(x[:, t : t + 1], None, cache) for t in range(5, 9)]
        outs.append((mx.concatenate(y, axis=1), cache[len(cache.cache) - 1]))
    (y_ref, s_ref), (y, s) = outs
    assert y.dtype == mx.bfloat16, y.dtype
    assert rel(y, y_ref) < BF16_TOL, f"seed={seed} {family}"
    assert rel(s, s_ref) < BF16_TOL, f"seed={seed} {family}"


@pytest.mark.parametrize("family", ["kimi_linear", "kimi_k3", "bailing_moe_v3", "olmo_hybrid"])
def test_training_gradients_match_unpatched(family):
    seed = fresh_seed()
    model = tiny_model(family, seed)
    model.train()
    patched = copy.deepcopy(model)
    assert mlx_gdn.patch(patched) == n_linear(family)
    assert all(l.training for l in gdn_layers(patched))
    toks = tokens(seed, (2, 7))

    def loss(m):
        return nn.losses.cross_entropy(m(toks[:, :-1]), toks[:, 1:]).mean()

    l_ref, g_ref = nn.value_and_grad(model, loss)(model)
    l_new, g_new = nn.value_and_grad(patched, loss)(patched)
    assert rel(l_new, l_ref) < F32_TOL, f"seed={seed} {family}"
    ref_flat, new_flat = dict(tree_flatten(g_ref)), dict(tree_flatten(g_new))
    assert ref_flat.keys() == new_flat.keys()
    gdn = [k for k in ref_flat if k.endswith(("A_log", "dt_bias"))]
    assert gdn and all(float(mx.abs(ref_flat[k]).max()) > 0 for k in gdn), f"seed={seed}: no gate gradient"
    for k in ref_flat:
        assert rel(new_flat[k], ref_flat[k]) < F32_TOL, f"seed={seed} {family} {k}"


# --------------------------------------------------------------------------------------------
# Padding and batching


def _batch_caches(model, left_padding):
    """The model's prompt cache with each layer's cache made batched and left-padded."""
    out = []
    for c in make_prompt_cache(model):
        if isinstance(c, ArraysCache):
            out.append(ArraysCache(len(c.cache), left_padding=left_padding))
        elif isinstance(c, KVCache):
            out.append(BatchKVCache(left_padding))
        else:
            raise AssertionError(f"unexpected cache {type(c).__name__}")
    return out


def _greedy(model, prompt, cache, n):
    """Prefill `prompt` [B, L], then n greedy steps; (logits [B, 1 + n, V], caches)."""
    logits = [model(prompt, cache=cache)[:, -1:]]
    for _ in range(n):
        logits.append(model(mx.argmax(logits[-1], axis=-1), cache=cache))
    return mx.concatenate(logits, axis=1), cache


def _linear_states(cache, row: int) -> list:
    return [c[i][row] for c in cache if isinstance(c, ArraysCache) for i in range(len(c.cache))]


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_never_reaches_the_states(family):
    """The short sequence padded on the left beside a long one gives, row for row, the logits and
    final conv and recurrent states it gives alone."""
    seed = fresh_seed()
    model = tiny_model(family, seed)
    rng = np.random.default_rng(seed)
    long, short = rng.integers(1, VOCAB, 9).tolist(), rng.integers(1, VOCAB, 4).tolist()
    pad = [0, len(long) - len(short)]
    batch = mx.array([long, [0] * pad[1] + short])
    ref_batch, _ = _greedy(model, batch, _batch_caches(model, pad), 3)
    assert mlx_gdn.patch(model) == n_linear(family)
    logits, cache = _greedy(model, batch, _batch_caches(model, pad), 3)
    msg = f"seed={seed} {family}"
    if family in MLX_LM_PAD_PROOF:
        assert rel(logits, ref_batch) < F32_TOL, msg
    for row, seq in enumerate((long, short)):
        alone, alone_cache = _greedy(model, mx.array([seq]), make_prompt_cache(model), 3)
        assert rel(logits[row], alone[0]) < F32_TOL, f"{msg} row {row}"
        for got, want in zip(_linear_states(cache, row), _linear_states(alone_cache, 0)):
            assert rel(got, want) < F32_TOL, f"{msg} row {row} state"


class _IdTokenizer:
    """What batch_generate needs from a tokenizer: no end token, token ids as text."""

    eos_token_ids: list = []

    def decode(self, ids):
        return " ".join(map(str, ids))


def _alone(model, prompt, n):
    """Greedy tokens and log-probabilities of `prompt` generated alone (generate_step)."""
    out = list(zip(range(n), generate_step(mx.array(prompt), model, max_tokens=n)))
    return [int(t) for _, (t, _) in out], [lp for _, (_, lp) in out]


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_generate_matches_each_prompt_alone(family):
    seed = fresh_seed()
    model = tiny_model(family, seed)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, VOCAB, n).tolist() for n in (6, 2, 9)]

    def gen(m):
        r = batch_generate(m, _IdTokenizer(), prompts, max_tokens=4, return_token_ids=True, prefill_step_size=4)
        return [list(map(int, t)) for t in r.token_ids]

    ref = gen(model)
    assert mlx_gdn.patch(model) == n_linear(family)
    got = gen(model)
    msg = f"seed={seed} {family}"
    if family in MLX_LM_PAD_PROOF:
        assert got == ref, msg
    assert got == [_alone(model, p, 4)[0] for p in prompts], msg


def _serve(model, schedule, max_tokens, prefill_step_size=3):
    """Run mlx-lm's BatchGenerator as its server does: requests join (schedule: step -> prompts)
    and leave (a prompt given as (prompt, leave_after) is removed after that many tokens) while
    others decode; prompts of different lengths are right-padded and prefilled in chunks of
    `prefill_step_size` through the caches' lengths. Returns {prompt index: (tokens, logprobs)}."""
    gen = BatchGenerator(model, max_tokens=max_tokens, prefill_batch_size=2, completion_batch_size=4,
                         prefill_step_size=prefill_step_size)
    results, uid_of, leave, step, pending = {}, {}, {}, 0, dict(schedule)
    index = 0
    while True:
        for item in pending.pop(step, []):
            prompt, after = item if isinstance(item, tuple) else (item, None)
            (uid,) = gen.insert([prompt])
            uid_of[uid] = index
            results[index] = ([], [])
            if after is not None:
                leave[uid] = after
            index += 1
        responses = gen.next_generated()
        step += 1
        if not responses and not pending:
            break
        gone = []
        for r in responses:
            toks, lps = results[uid_of[r.uid]]
            toks.append(int(r.token))
            lps.append(r.logprobs)
            if leave.get(r.uid) == len(toks) and r.finish_reason is None:
                gone.append(r.uid)
        if gone:
            gen.remove(gone)
    gen.close()
    return results


@pytest.mark.parametrize("family", FAMILIES)
def test_continuous_batching_matches_each_prompt_alone(family):
    seed = fresh_seed()
    model = tiny_model(family, seed)
    rng = np.random.default_rng(seed)
    p = [rng.integers(1, VOCAB, n).tolist() for n in (7, 2, 5, 4)]
    # Two requests prefilled together, one leaving early, two joining while others decode.
    schedule = {0: [p[0], (p[1], 2)], 2: [p[2]], 3: [p[3]]}
    ref = _serve(model, schedule, 5)
    assert mlx_gdn.patch(model) == n_linear(family)
    got = _serve(model, schedule, 5)
    msg = f"seed={seed} {family}"
    assert [len(got[i][0]) for i in range(4)] == [5, 2, 5, 5], msg
    for i, prompt in enumerate(p):
        toks, lps = got[i]
        want_toks, want_lps = _alone(model, prompt, len(toks))
        assert toks == want_toks, f"{msg} request {i}"
        assert rel(mx.stack(lps), mx.stack(want_lps)) < F32_TOL, f"{msg} request {i}"
        if family in MLX_LM_PAD_PROOF:
            assert toks == ref[i][0], f"{msg} request {i}"
            assert rel(mx.stack(lps), mx.stack(ref[i][1])) < F32_TOL, f"{msg} request {i}"


# --------------------------------------------------------------------------------------------
# Families mlx-gdn has no drop-in for: the binding swap


def _load_as_new_family(source: str, name: str):
    """mlx-lm's `source` model module loaded again under another name: a family this mlx-gdn
    does not know, whose module imported mlx-lm's gated_delta_update by name."""
    full = f"mlx_lm.models.{name}"
    spec = importlib.util.spec_from_file_location(full, importlib.import_module(f"mlx_lm.models.{source}").__file__)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[full] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("source", ["olmo_hybrid", "kimi_linear"])
def test_unknown_family_gets_its_binding_swapped(source, monkeypatch):
    from mlx_lm.models import gated_delta

    name = f"gdn_future_{source}"
    mod = _load_as_new_family(source, name)
    try:
        seed = fresh_seed()
        mx.random.seed(seed)
        model = mod.Model(mod.ModelArgs.from_dict(CONFIGS[source]))
        model.eval()
        toks = tokens(seed, (2, 8))
        ref_full, ref_steps = prompt_and_decode(model, toks, 5)
        calls = []
        real = mlx_gdn.api.gated_delta_update
        monkeypatch.setattr(mlx_gdn.api, "gated_delta_update", lambda *a, **k: calls.append(k["backend"]) or real(*a, **k))
        report = mlx_gdn.patch(model)
        key = f"module:mlx_lm.models.{name}"
        assert dict(report.items()) == {key: n_linear(source)}, repr(report)
        assert mod.gated_delta_update is not gated_delta.gated_delta_update
        assert mlx_gdn.patch(model) == 0
        full, steps = prompt_and_decode(model, toks, 5)
        assert len(calls) == n_linear(source) * (1 + 1 + 3), calls
        assert rel(full, ref_full) < F32_TOL, f"seed={seed}"
        assert rel(steps, ref_steps) < F32_TOL, f"seed={seed}"
        model.train()
        model(toks)
        assert calls[-1] == "ops"  # use_kernel=False in training
        assert dict(mlx_gdn.unpatch(model).items()) == {key: n_linear(source)}
        assert mod.gated_delta_update is gated_delta.gated_delta_update
    finally:
        del sys.modules[f"mlx_lm.models.{name}"]


def test_model_without_gated_delta_layers_warns():
    from mlx_lm.models import llama

    args = llama.ModelArgs(model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                           num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=VOCAB, num_key_value_heads=2)
    with pytest.warns(UserWarning, match="no gated delta layers"):
        report = mlx_gdn.patch(llama.Model(args))
    assert report == 0 and dict(report.items()) == {}


# --------------------------------------------------------------------------------------------
# On the Metal kernels (the simulator runs them on the CPU)


@pytest.mark.parametrize("family", ["qwen3_next", "kimi_linear", "kimi_k3"])
def test_decode_under_simulated_metal(family, monkeypatch):
    """Prefill then token-by-token decode with backend="metal": every recurrence runs a Metal
    kernel (the T=1 steps the fused decode step), none the ops path, and the logits are the
    unpatched model's."""
    from mlx_gdn.metal import backend as metal
    from mlx_gdn.models import decode_step
    from mlx_gdn.sim import simulated_metal

    ran, fused = [], []
    real_run, real_step = metal.run, decode_step.decode_step
    monkeypatch.setattr(metal, "run", lambda p, *a, **k: ran.append(p.T) or real_run(p, *a, **k))
    monkeypatch.setattr(decode_step, "decode_step",
                        lambda *a, **k: fused.append((a[0], k.get("norm") is not None)) or real_step(*a, **k))
    seed = fresh_seed()
    model = tiny_model(family, seed)
    toks = tokens(seed, (2, 6))
    _, ref = prompt_and_decode(model, toks, 4)
    with simulated_metal():
        assert mlx_gdn.patch(model, backend="metal") == n_linear(family)
        _, got = prompt_and_decode(model, toks, 4)
        mx.eval(got)
    n = n_linear(family)
    # Per layer: the whole sequence (T=6), the prefill (T=4) and two single tokens through the
    # fused step with the layer's output norm inside.
    assert sorted(ran) == [4] * n + [6] * n and fused == [("metal", True)] * 2 * n, (ran, fused)
    assert rel(got, ref) < F32_TOL, f"seed={seed} {family}"


@pytest.mark.parametrize("family", ["kimi_k3", "qwen3_5"])
def test_continuous_batching_under_simulated_metal(family, monkeypatch):
    """mlx-lm's BatchGenerator (requests joining and leaving, right-padded chunked prefill) on the
    Metal kernels, the decode steps on the fused step: each request's tokens and log-probabilities
    equal the same prompt generated alone."""
    from mlx_gdn.models import decode_step
    from mlx_gdn.sim import simulated_metal

    fused = []
    real_step = decode_step.decode_step
    monkeypatch.setattr(decode_step, "decode_step", lambda *a, **k: fused.append(a[0]) or real_step(*a, **k))
    seed = fresh_seed()
    model = tiny_model(family, seed)
    rng = np.random.default_rng(seed)
    p = [rng.integers(1, VOCAB, n).tolist() for n in (7, 2, 5)]
    schedule = {0: [p[0], (p[1], 2)], 2: [p[2]]}
    msg = f"seed={seed} {family}"
    with simulated_metal():
        assert mlx_gdn.patch(model, backend="metal") == n_linear(family)
        got = _serve(model, schedule, 4)
        assert fused and set(fused) == {"metal"}, msg
        for i, prompt in enumerate(p):
            toks, lps = got[i]
            want_toks, want_lps = _alone(model, prompt, len(toks))
            assert toks == want_toks, f"{msg} request {i}"
            assert rel(mx.stack(lps), mx.stack(want_lps)) < F32_TOL, f"{msg} request {i}"


# --------------------------------------------------------------------------------------------
# Tensor parallelism: model.shard(group) over MLX's ring backend, two local processes

SHARDED = ["qwen3_5", "qwen3_5_moe", "kimi_k3"]  # the families whose mlx-lm Model has shard()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sharded_patched_model_matches_unsharded(tmp_path):
    """Two ranks over the ring backend on 127.0.0.1; each family patched before and after
    `model.shard`; every rank's logits equal the unsharded model's."""
    import os
    import subprocess

    for family in SHARDED:
        assert hasattr(importlib.import_module(f"mlx_lm.models.{family}").Model, "shard"), family
    seed = fresh_seed()
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{_free_port()}"], [f"127.0.0.1:{_free_port()}"]]))
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_worker.py")
    procs = [
        subprocess.Popen(
            [sys.executable, worker, str(seed), str(tmp_path)] + SHARDED,
            env=dict(os.environ, MLX_RANK=str(rank), MLX_HOSTFILE=str(hostfile)),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"seed={seed} rank {rank} exited {p.returncode}:\n{out[-3000:]}"
    for rank in range(2):
        facts = json.loads((tmp_path / f"rank{rank}.json").read_text())
        arrays = np.load(tmp_path / f"rank{rank}.npz")
        assert facts["size"] == 2 and facts["rank"] == rank
        for family in SHARDED:
            for order in ("before", "after"):
                f = facts[f"{family}/{order}"]
                msg = f"seed={seed} rank {rank} {family} patched {order} shard"
                assert f["report"] == {family: n_linear(family)}, f"{msg}: {f}"
                assert f["drop_ins"] == [True] * n_linear(family), f"{msg}: {f}"
                assert f["heads"] == [h // 2 for h in f["unsharded_heads"]], f"{msg}: {f}"
                for what in ("full", "steps"):
                    got, ref = arrays[f"{family}/{order}/{what}"], arrays[f"{family}/ref/{what}"]
                    assert rel(mx.array(got), mx.array(ref)) < F32_TOL, f"{msg} {what}"


# --------------------------------------------------------------------------------------------
# On an NVIDIA GPU (run by hand where MLX has CUDA)


def _has_cuda() -> bool:
    from mlx_gdn.cuda.backend import available

    return available()


@pytest.mark.cuda
@pytest.mark.skipif(not _has_cuda(), reason="needs MLX with a CUDA device")
@pytest.mark.parametrize("family", FAMILIES)
def test_patched_on_cuda(family, monkeypatch):
    """backend="cuda": prompt, decode and continuous batching equal the unpatched model (which runs
    mlx-lm's ops path on CUDA); every recurrence runs a CUDA kernel."""
    from mlx_gdn.cuda import backend as cuda
    from mlx_gdn.models import decode_step

    ran, fused = [], []
    real_run, real_step = cuda.run, decode_step.decode_step
    monkeypatch.setattr(cuda, "run", lambda p, *a, **k: ran.append(p.T) or real_run(p, *a, **k))
    monkeypatch.setattr(decode_step, "decode_step",
                        lambda *a, **k: fused.append((a[0], k.get("norm") is not None)) or real_step(*a, **k))
    seed = fresh_seed()
    model = tiny_model(family, seed)
    toks = tokens(seed, (2, 10))
    ref_full, ref_steps = prompt_and_decode(model, toks, 6)
    rng = np.random.default_rng(seed)
    p = [rng.integers(1, VOCAB, n).tolist() for n in (7, 2, 5)]
    schedule = {0: [p[0], (p[1], 2)], 2: [p[2]]}
    ref_serve = _serve(model, schedule, 4)
    assert mlx_gdn.patch(model, backend="cuda") == n_linear(family)
    full, steps = prompt_and_decode(model, toks, 6)
    msg = f"seed={seed} {family}"
    # Both models' own projections run MLX's CUDA float32 matmuls in TF32 (its default), which
    # turn a rounding difference in one layer into TF32-sized ones downstream: the documented
    # bound for paths with float32 matrix products on CUDA.
    tol = tolerance(mx.float32, matmul=True)
    assert rel(full, ref_full) < tol, msg
    assert rel(steps, ref_steps) < tol, msg
    n = n_linear(family)
    # Kimi K3's fused step is Metal-only for now (KimiK3DeltaAttention.FUSED_STEP_BACKENDS).
    if family.startswith("qwen") or family in ("kimi_linear", "bailing_moe_v3"):
        # T=1 through the fused step with the layer's output norm inside
        assert sorted(ran) == [6] * n + [10] * n and fused == [("cuda", True)] * 4 * n, (ran, fused)
    else:
        assert sorted(ran) == [1] * 4 * n + [6] * n + [10] * n and fused == [], (ran, fused)
    got = _serve(model, schedule, 4)
    for i, prompt in enumerate(p):
        assert got[i][0] == _alone(model, prompt, len(got[i][0]))[0], f"{msg} request {i}"
        if family in MLX_LM_PAD_PROOF:
            assert got[i][0] == ref_serve[i][0], f"{msg} request {i}"
