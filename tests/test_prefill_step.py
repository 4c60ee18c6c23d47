"""The fused prefill pieces of the drop-in layer (mlx_gdn.models.prefill_step): the prep launch
(kernels/prefill_prep.metal: conv, SiLU, split, q/k norms) and the gated norm launch
(kernels/gated_norm.metal), under the Metal simulator and on a CUDA device.

Each launch is checked against the float64 reference on seeded random inputs; a drop-in layer's
prefill on the fused pieces against the same layer on the unfused path, the ops layer and mlx-lm's
layer, with and without a cache and left padding. Each case draws a fresh seed, reported in the
messages.
"""

from __future__ import annotations

import contextlib
import copy

import mlx.core as mx
import numpy as np
import pytest

mlx_lm = pytest.importorskip("mlx_lm", reason="mlx-lm is an optional dependency")
from mlx_lm.models import qwen3_5  # noqa: E402
from mlx_lm.models.cache import ArraysCache  # noqa: E402

import mlx_gdn  # noqa: E402
from mlx_gdn.models import layers as layers_mod  # noqa: E402
from mlx_gdn.models import prefill_step  # noqa: E402
from mlx_gdn.reference import rel_error  # noqa: E402
from mlx_gdn.sim import simulated_metal  # noqa: E402
from mlx_gdn.testing import TOLERANCE, fresh_seed  # noqa: E402


def _has_cuda() -> bool:
    from mlx_gdn.cuda.backend import available

    return available()


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every kernel output starts as NaN on a GPU (the simulator poisons its outputs itself), so an
    element a launch leaves unwritten fails the comparison."""
    from mlx_gdn import launch

    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)


def _context(backend):
    return simulated_metal() if backend == "metal" else contextlib.nullcontext()


PREP_CASES = [  # B, S, K, Hk, Hv, Dk, Dv, dtype, masked
    (2, 5, 4, 2, 4, 32, 64, mx.float32, False),
    (2, 3, 4, 1, 2, 64, 32, mx.bfloat16, True),  # the whole call inside the conv window, a left pad
    (1, 2, 4, 1, 1, 32, 32, mx.float32, False),  # fewer tokens than the conv state keeps
    (3, 4, 2, 2, 2, 48, 16, mx.float16, True),  # K = 2; Dk not a multiple of 32
    (1, 6, 4, 1, 3, 256, 96, mx.bfloat16, False),  # the widest head: one channel per thread
]


def _check_prep(backend, B, S, K, Hk, Hv, Dk, Dv, dtype, masked):
    seed = fresh_seed()
    with _context(backend):
        errs = prefill_step.check_prep(backend, B, S, K, Hk, Hv, Dk, Dv, dtype, masked, seed=seed)
    tol = TOLERANCE[dtype]
    assert all(e < tol for e in errs), f"relative errors q, k, v, conv state {errs} >= {tol} (seed={seed})"


@pytest.mark.parametrize("B,S,K,Hk,Hv,Dk,Dv,dtype,masked", PREP_CASES)
def test_prep_matches_reference(B, S, K, Hk, Hv, Dk, Dv, dtype, masked):
    _check_prep("metal", B, S, K, Hk, Hv, Dk, Dv, dtype, masked)


NORM_CASES = [  # N, Dv, y dtype, z dtype, weight dtype, eps
    (7, 64, mx.float32, mx.float32, mx.float32, 1e-6),
    (9, 128, mx.bfloat16, mx.bfloat16, mx.bfloat16, 1e-6),
    (5, 48, mx.bfloat16, mx.float32, mx.float32, 1e-5),  # rms_norm rounds to float32, the output to bf16
    (3, 200, mx.float16, mx.float16, mx.float32, 0.0),  # Dv not a multiple of 32; rows < a threadgroup
]


@pytest.mark.parametrize("N,Dv,dtype,z_dtype,w_dtype,eps", NORM_CASES)
def test_gated_norm_matches_reference(N, Dv, dtype, z_dtype, w_dtype, eps):
    seed = fresh_seed()
    with simulated_metal():
        err = prefill_step.check_norm("metal", N, Dv, dtype, z_dtype, w_dtype, eps, seed=seed)
    assert err < TOLERANCE[dtype], f"relative error {err:.3g} (seed={seed})"


def _layer_trio(seed, dtype, Hk, Hv, Dk, Dv, backend):
    """(mlx-lm Qwen3.5 layer with random weights, the ops drop-in, the `backend` drop-in)."""
    from types import SimpleNamespace

    mx.random.seed(seed)
    rng = np.random.default_rng(seed)
    args = SimpleNamespace(hidden_size=48, linear_num_value_heads=Hv, linear_num_key_heads=Hk,
                           linear_key_head_dim=Dk, linear_value_head_dim=Dv, linear_conv_kernel_dim=4,
                           rms_norm_eps=1e-6)
    ref = qwen3_5.GatedDeltaNet(args)
    ref.dt_bias = mx.array(rng.standard_normal(Hv).astype(np.float32))
    ref.A_log = mx.array(np.log(rng.permutation(np.geomspace(0.02, 16, Hv))).astype(np.float32))
    ref.conv1d.weight = mx.array(rng.standard_normal(ref.conv1d.weight.shape).astype(np.float32) * 0.5)
    ref.norm.weight = mx.array((1.0 + 0.3 * rng.standard_normal(Dv)).astype(np.float32))
    if dtype != mx.float32:
        ref.set_dtype(dtype)
        ref.A_log = ref.A_log.astype(mx.float32)
    mx.eval(ref.parameters())
    ref.eval()
    return ref, mlx_gdn.GatedDeltaNet.from_layer(ref, backend="ops"), mlx_gdn.GatedDeltaNet.from_layer(ref, backend=backend)


def _check_layer(backend, dtype, B, Hk, Hv, Dk, Dv, masked, monkeypatch):
    """Two prefill chunks (the second continuing the cache) through the fused pieces, against the same
    layer unfused, the ops layer and mlx-lm's layer; the fused pieces must have run."""
    seed = fresh_seed()
    ref, ops, fused = _layer_trio(seed, dtype, Hk, Hv, Dk, Dv, backend)
    x = mx.random.normal((B, 11, 48)).astype(dtype)
    mask = None
    if masked:  # left padding of the last row, as mlx-lm's batched generation makes it
        m = np.ones((B, 11), bool)
        m[-1, :4] = False
        mask = mx.array(m)
    ran = []
    for name in ("prep", "gated_norm"):
        real = getattr(prefill_step, name)
        monkeypatch.setattr(prefill_step, name, lambda *a, _real=real, _name=name, **k: ran.append(_name) or _real(*a, **k))
    caches = {n: ArraysCache(2) for n in ("ref", "ops", "fused", "unfused")}
    tol = TOLERANCE[dtype]
    for sl in (slice(0, 7), slice(7, 11)):
        xs, ms = x[:, sl], None if mask is None else mask[:, sl]
        want_ref = ref(xs, ms, caches["ref"])
        want_ops = ops(xs, ms, caches["ops"])
        with _context(backend):
            got = fused(xs, ms, caches["fused"])
            mx.eval(got, caches["fused"].state)
            with monkeypatch.context() as mp:
                mp.setattr(prefill_step, "prep_backend", lambda *a, **k: None)
                mp.setattr(prefill_step, "norm_backend", lambda *a, **k: None)
                unf = fused(xs, ms, caches["unfused"])
                mx.eval(unf, caches["unfused"].state)
        where = f"seed={seed} {backend} {dtype} B={B} Hk={Hk} Hv={Hv} Dk={Dk} Dv={Dv} masked={masked} tokens {sl}"
        on = slice(None) if mask is None else mx.array(np.flatnonzero(np.asarray(ms).all(axis=1)))
        for name, out, want in [
            ("y vs unfused layer", got, unf), ("y vs ops layer", got, want_ops),
            ("conv state vs unfused", caches["fused"][0], caches["unfused"][0]),
            ("state vs unfused", caches["fused"][1], caches["unfused"][1]),
            ("conv state vs mlx-lm", caches["fused"][0], caches["ref"][0]),
            ("y vs mlx-lm on unpadded rows", got[on], want_ref[on]),
        ]:
            err = rel_error(out, want)
            # Two bf16 computations, each within the bound of the exact answer, may sit twice it apart.
            bound = tol if dtype == mx.float32 else 2 * tol
            assert err < bound, f"{name}: relative error {err:.3g} >= {bound} ({where})"
    assert ran == ["prep", "gated_norm"] * 2, f"fused pieces that ran: {ran} ({where})"


LAYER_CASES = [  # dtype, B, Hk, Hv, Dk, Dv, masked
    (mx.float32, 2, 2, 4, 32, 32, False),
    (mx.bfloat16, 3, 1, 2, 64, 32, True),
]


@pytest.mark.parametrize("dtype,B,Hk,Hv,Dk,Dv,masked", LAYER_CASES)
def test_layer_prefill_on_fused_pieces(dtype, B, Hk, Hv, Dk, Dv, masked, monkeypatch):
    _check_layer("metal", dtype, B, Hk, Hv, Dk, Dv, masked, monkeypatch)


def test_training_and_per_sequence_lengths_take_the_unfused_path(monkeypatch):
    """A layer in training mode prefills on the unfused path, as does the ops backend."""
    seed = fresh_seed()
    _, ops, fused = _layer_trio(seed, mx.float32, 1, 2, 32, 32, "metal")
    calls = []
    monkeypatch.setattr(prefill_step, "prep", lambda *a, **k: calls.append("prep"))
    monkeypatch.setattr(prefill_step, "gated_norm", lambda *a, **k: calls.append("norm"))
    x = mx.random.normal((1, 5, 48))
    with simulated_metal():
        fused.train()
        y = fused(x)
        mx.eval(y)
        ops.eval()
        mx.eval(ops(x))
    assert calls == [], f"fused pieces ran in training or on ops (seed={seed})"


def test_fused_pieces_only_where_they_apply():
    B, S, Hk, Hv, Dk, Dv, K = 2, 3, 1, 2, 32, 32, 4
    C = 2 * Hk * Dk + Hv * Dv
    qkv, conv, w = mx.zeros((B, S, C)), mx.zeros((B, K - 1, C)), mx.zeros((C, K, 1))
    y = mx.zeros((B, S, Hv, Dv))
    weight = mx.ones((Dv,))

    def prep(backend="auto", **kw):
        args = dict(qkv=qkv, conv_state=conv, w=w, mask=None)
        args.update(kw)
        return prefill_step.prep_backend(backend, *args.values(), Hk, Hv, Dk, Dv)

    with simulated_metal():
        assert prep() == "metal" and prep("metal") == "metal"
        assert prep(mask=mx.ones((B, S), dtype=mx.bool_)) == "metal"
        assert prep("ops") is None
        assert prep(qkv=mx.zeros((B, 1, C))) is None  # T = 1: the fused decode step's
        assert prep(conv_state=conv.astype(mx.bfloat16)) is None
        assert prep(mask=mx.ones((B, S))) is None  # a float mask
        assert prep(qkv=mx.zeros((B, S, C + 1))) is None
        assert prefill_step.norm_backend("auto", y, y, weight, 1e-6) == "metal"
        assert prefill_step.norm_backend("auto", y, y[..., :16], weight, 1e-6) is None
        assert prefill_step.norm_backend("auto", y, y, weight[:8], 1e-6) is None
        assert prefill_step.norm_backend("ops", y, y, weight, 1e-6) is None
    if not mx.metal.is_available() and not prefill_step.backends.is_available("cuda"):
        assert prep() is None


def test_a_failing_variant_falls_back_with_one_warning(monkeypatch):
    """Under backend "auto", a prep variant whose probe fails warns once, naming the variant, and the
    layer prefills on the unfused path with the same answer."""
    from mlx_gdn import backends, fallback

    seed = fresh_seed()
    _, ops, fused = _layer_trio(seed, mx.float32, 1, 2, 32, 32, "auto")
    backends.clear_plans()
    fallback.clear()
    monkeypatch.setattr(prefill_step, "check_prep", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("nvrtc: boom")))
    x = mx.random.normal((1, 5, 48))
    with simulated_metal():
        with pytest.warns(RuntimeWarning, match="gdn_prefill_prep.*boom") as rec:
            y = fused(x)
            mx.eval(y)
            mx.eval(fused(x))
    assert sum("gdn_prefill_prep" in str(r.message) for r in rec) == 1
    err = rel_error(y, ops(x))
    assert err < TOLERANCE[mx.float32], f"{err:.3g} (seed={seed})"
    backends.clear_plans()
    fallback.clear()


@pytest.mark.cuda
@pytest.mark.skipif(not _has_cuda(), reason="needs MLX with a CUDA device")
@pytest.mark.parametrize("B,S,K,Hk,Hv,Dk,Dv,dtype,masked", PREP_CASES + [
    (2, 300, 4, 16, 32, 128, 128, mx.bfloat16, True),  # Qwen3.5's layer sizes
])
def test_prep_on_cuda(B, S, K, Hk, Hv, Dk, Dv, dtype, masked):
    _check_prep("cuda", B, S, K, Hk, Hv, Dk, Dv, dtype, masked)


@pytest.mark.cuda
@pytest.mark.skipif(not _has_cuda(), reason="needs MLX with a CUDA device")
@pytest.mark.parametrize("N,Dv,dtype,z_dtype,w_dtype,eps", NORM_CASES + [(4096 * 32 + 3, 128, mx.bfloat16, mx.bfloat16,
                                                                         mx.bfloat16, 1e-6)])
def test_gated_norm_on_cuda(N, Dv, dtype, z_dtype, w_dtype, eps):
    seed = fresh_seed()
    err = prefill_step.check_norm("cuda", N, Dv, dtype, z_dtype, w_dtype, eps, seed=seed)
    assert err < TOLERANCE[dtype], f"relative error {err:.3g} (seed={seed})"


@pytest.mark.cuda
@pytest.mark.skipif(not _has_cuda(), reason="needs MLX with a CUDA device")
@pytest.mark.parametrize("dtype,B,Hk,Hv,Dk,Dv,masked", LAYER_CASES + [(mx.bfloat16, 2, 16, 32, 128, 128, True)])
def test_layer_prefill_on_cuda(dtype, B, Hk, Hv, Dk, Dv, masked, monkeypatch):
    _check_layer("cuda", dtype, B, Hk, Hv, Dk, Dv, masked, monkeypatch)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_gradients_through_the_fused_pieces_in_eval_mode(dtype, monkeypatch):
    """A gradient taken through a layer in eval mode (the fused pieces run forward) equals the
    unfused ops layer's, for the input and every parameter the pieces touch: the pieces' VJP is the
    unfused computation's."""
    from mlx.utils import tree_flatten

    seed = fresh_seed()
    _, ops, fused = _layer_trio(seed, dtype, 1, 2, 32, 32, "metal")
    ran = []
    for name in ("prep", "gated_norm"):
        real = getattr(prefill_step, name)
        monkeypatch.setattr(prefill_step, name, lambda *a, _real=real, _name=name, **k: ran.append(_name) or _real(*a, **k))
    x = mx.random.normal((2, 9, 48)).astype(dtype)

    def grads(layer):
        def loss(params, x):
            layer.update(params)
            return (layer(x).astype(mx.float32) ** 2).sum()

        gp, gx = mx.grad(loss, argnums=(0, 1))(layer.trainable_parameters(), x)
        mx.eval(gp, gx)
        return dict(tree_flatten(gp)), gx

    with simulated_metal():
        got_p, got_x = grads(fused)
    want_p, want_x = grads(ops)
    assert ran == ["prep", "gated_norm"], f"fused pieces that ran: {ran} (seed={seed})"
    tol = TOLERANCE[dtype]
    bound = tol if dtype == mx.float32 else 2 * tol  # two bf16 computations
    err = rel_error(got_x, want_x)
    assert err < bound, f"d input: {err:.3g} (seed={seed})"
    for name in ("conv1d.weight", "norm.weight", "in_proj_qkv.weight", "in_proj_z.weight"):
        err = rel_error(got_p[name], want_p[name])
        assert err < bound, f"d {name}: {err:.3g} (seed={seed})"
