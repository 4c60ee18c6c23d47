"""The CUDA chunked backward's pieces: the state pass's saved chunk states (SAVE_EVERY), in the CUDA
simulator, against the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx

from mlx_gdn.cuda import chunked
from mlx_gdn.reference import delta_rule_steps, rel_error, to_numpy
from mlx_gdn.sim import simulated_cuda
from mlx_gdn.testing import TOLERANCE, fresh_seed, random_inputs
from mlx_gdn.validate import check_rule

DT = {"f32": mx.float32, "bf16": mx.bfloat16}


@pytest.fixture
def in_simulator():
    with simulated_cuda():
        yield


# (T, save_every, dtype, gate, masked, state pass): "smem" the shared-memory pass, "regs" the
# register pass (bf16), per-key gates always the shared-memory one.
SAVE_CASES = [
    (200, 1, "f32", "scalar", False, "smem"),
    (192, 2, "f32", "scalar", True, "smem"),
    (140, 1, "bf16", "scalar", True, "regs"),
    (200, 1, "bf16", "scalar", False, "smem"),
    (130, 1, "f32", "key", True, "smem"),
]


@pytest.mark.parametrize("T,E,dtype,gate,masked,pass_", SAVE_CASES)
def test_saved_chunk_states(in_simulator, monkeypatch, T, E, dtype, gate, masked, pass_):
    """run_chunked(save_every=E) returns the state after tokens 64E, 128E, ... (full chunks only)
    next to y and the final state, for every state-pass variant."""
    monkeypatch.setattr(chunked, "STATE_REGS", pass_ == "regs")
    if pass_ == "regs":
        monkeypatch.setattr(chunked, "STATE_REGS_NW", 2)
    seed = fresh_seed()
    x = random_inputs(1, T, 1, 2, 64, 64, dtype=DT[dtype], seed=seed, gate=gate, mask=masked)
    p = check_rule(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask)
    assert (chunked._regs_config(p) is not None) == (pass_ == "regs")
    y, s, saved = chunked.run_chunked(p, x.q, x.k, x.v, x.state, x.mask, g=x.g, beta=x.beta, save_every=E)
    y0, s0 = chunked.run_chunked(p, x.q, x.k, x.v, x.state, x.mask, g=x.g, beta=x.beta)
    n = T // (64 * E)
    assert saved.shape == (1, n, 2, 64, 64) and saved.dtype == mx.float32
    # The option changes nothing else.
    assert np.array_equal(to_numpy(y), to_numpy(y0)) and np.array_equal(to_numpy(s), to_numpy(s0))
    _, _, states = delta_rule_steps(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask)
    ref = states[:, [64 * E * (i + 1) - 1 for i in range(n)]]
    err = rel_error(to_numpy(saved), ref)
    tol = TOLERANCE[DT[dtype]]
    assert err < tol, f"saved states err {err:.2e} (tol {tol}), T={T} E={E} {dtype} {gate}, seed={seed}"


# --- the kernel backward (cuda.chunked_backward) --------------------------------------------------

from mlx_gdn import autodiff  # noqa: E402
from mlx_gdn.cuda import chunked_backward  # noqa: E402
from mlx_gdn.ops import chunked_backward as ops_backward  # noqa: E402
from mlx_gdn.validate import check_update  # noqa: E402

from test_gradients import _call, _grads, _names, _weights, check_directional  # noqa: E402

OPS_VJP = ops_backward.chunked_vjp


def _kernel_only(monkeypatch):
    """Any use of the ops backward fails the test: gradients come from the kernels or not at all."""
    def refuse(*a, **k):
        pytest.fail("the ops backward ran in place of the CUDA kernel backward")

    monkeypatch.setattr(autodiff, "chunked_vjp", refuse)
    monkeypatch.setattr(ops_backward, "chunked_vjp", refuse)


def _problem(x, fused):
    if fused:
        return check_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state, x.mask, None, False)
    return check_rule(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask)


def _kernel_grads(x, fused, W, V, monkeypatch):
    p = _problem(x, fused)
    assert chunked_backward.supports(p), f"{p} not taken by the kernel backward"
    _kernel_only(monkeypatch)
    return _grads(_call(x, fused, "cuda", "chunked"), x, fused, W, V)


def _ops_grads(x, W, V):
    """The ops backward's VJP at the same inputs (as float32), for the rule's inputs."""
    f32 = mx.float32
    out = OPS_VJP(*(getattr(x, n).astype(f32) for n in ("q", "k", "v", "g", "beta")), x.state, x.mask, W, V)
    return dict(zip(("q", "k", "v", "g", "beta", "state"), out))


# (fused, B, T, Hk, Hv, Dk, Dv, masked): chunks and a partial last chunk crossed, GQA.
GRAD_CASES = [
    (False, 1, 150, 1, 2, 64, 64, True),
    (True, 2, 70, 2, 4, 64, 64, True),
    (False, 1, 128, 1, 3, 64, 64, False),
    (True, 1, 40, 1, 2, 64, 64, False),
    (False, 1, 100, 1, 2, 128, 64, True),
]


@pytest.mark.parametrize("fused,B,T,Hk,Hv,Dk,Dv,masked", GRAD_CASES)
def test_kernel_backward_float32(in_simulator, monkeypatch, fused, B, T, Hk, Hv, Dk, Dv, masked):
    """Every input's gradient from the kernels (q, k, v, g, beta, state; a, b, A_log, dt_bias
    through fused gating) against central differences of the float64 reference, and the rule's
    against the ops backward's VJP."""
    seed = fresh_seed()
    x = random_inputs(B, T, Hk, Hv, Dk, Dv, seed=seed, mask=masked)
    W, V = _weights(x, seed)
    what = f"kernel backward {'update' if fused else 'rule'} B={B} T={T} Hk={Hk} Hv={Hv} Dk={Dk} Dv={Dv}"
    grads = _kernel_grads(x, fused, W, V, monkeypatch)
    for n, gr in grads.items():
        assert gr.dtype == getattr(x, n).dtype and float(mx.abs(gr).max()) > 0, f"{what}, seed={seed}: d{n}"
    check_directional(grads, x, fused, W, V, seed, what)
    if not fused:
        want = _ops_grads(x, W, V)
        for n in _names(False):
            err = rel_error(to_numpy(grads[n]), to_numpy(want[n]))
            assert err < 1e-4, f"{what}, seed={seed}: d{n} against the ops backward, relative error {err:.2e}"


@pytest.mark.parametrize("fused,dtype", [(False, mx.bfloat16), (True, mx.bfloat16), (False, mx.float16)])
def test_kernel_backward_half(in_simulator, monkeypatch, fused, dtype):
    """bfloat16 and float16 inputs (bf16 operands, float32 accumulation): gradients within 2e-2 of
    the ops backward's float32 VJP at the same values and of the float64 reference's central
    differences."""
    seed = fresh_seed()
    x = random_inputs(1, 140, 1, 2, 64, 64, dtype=dtype, seed=seed, mask=True)
    W, V = _weights(x, seed)
    what = f"kernel backward {dtype} {'update' if fused else 'rule'}"
    grads = _kernel_grads(x, fused, W, V, monkeypatch)
    for n, gr in grads.items():
        assert gr.dtype == getattr(x, n).dtype, f"{what}: d{n} dtype {gr.dtype}"
    check_directional(grads, x, fused, W, V, seed, what, tol=2e-2)
    if not fused:
        want = _ops_grads(x, W, V)
        for n in _names(False):
            err = rel_error(to_numpy(grads[n]), to_numpy(want[n]))
            assert err < 2e-2, f"{what}, seed={seed}: d{n} against the ops backward, relative error {err:.2e}"


@pytest.mark.parametrize("bv,dtype", [(64, mx.float32), (32, mx.bfloat16), (16, mx.float32)])
def test_kernel_backward_state_slice_widths(in_simulator, monkeypatch, bv, dtype):
    """Stage state_backward in value slices of 16, 32 and 64 rows (the GPU shapes take the wider
    ones): the same gradients as the ops backward."""
    monkeypatch.setattr(chunked_backward, "BWD_BV", bv)
    seed = fresh_seed()
    x = random_inputs(1, 130, 1, 2, 64, 128, dtype=dtype, seed=seed, mask=True)
    assert chunked_backward._choose_bv(_problem(x, False)) == bv
    W, V = _weights(x, seed)
    grads = _kernel_grads(x, False, W, V, monkeypatch)
    want = _ops_grads(x, W, V)
    tol = TOLERANCE[dtype]
    for n in _names(False):
        err = rel_error(to_numpy(grads[n]), to_numpy(want[n]))
        assert err < tol, f"BV={bv} {dtype}, seed={seed}: d{n} against the ops backward, relative error {err:.2e}"


@pytest.mark.parametrize("fused", [False, True])
def test_kernel_backward_masked_steps_get_no_gradient(in_simulator, monkeypatch, fused):
    """A masked step's q, k, v, g, beta (a, b) get exactly zero gradient."""
    seed = fresh_seed()
    x = random_inputs(2, 90, 1, 2, 64, 64, seed=seed, mask=True)
    m = np.asarray(to_numpy(x.mask)) != 0
    assert (~m).any() and m.any()
    W, V = _weights(x, seed)
    grads = _kernel_grads(x, fused, W, V, monkeypatch)
    for n in _names(fused):
        if n in ("A_log", "dt_bias", "state"):
            continue
        gr = to_numpy(grads[n])
        assert np.all(gr[~m] == 0), f"seed={seed}: d{n} nonzero at a masked step"
        assert np.abs(gr[m]).max() > 0, f"seed={seed}: d{n} all zero at live steps"


def test_kernel_backward_extreme_gates(in_simulator, monkeypatch):
    """Gates of exactly 0, 1e-30 and 1 among a trained layer's: finite gradients equal to the ops
    backward's (the same floor for g near 0: dg = dl / max(g, 1e-30))."""
    seed = fresh_seed()
    x = random_inputs(1, 130, 1, 2, 64, 64, seed=seed)
    g = np.array(x.g)
    g[0, 3::9], g[0, 5::9], g[0, 7::9] = 0.0, 1e-30, 1.0
    x.g = mx.array(g)
    W, V = _weights(x, seed)
    grads = _kernel_grads(x, False, W, V, monkeypatch)
    want = _ops_grads(x, W, V)
    for n in _names(False):
        gr = to_numpy(grads[n])
        assert np.isfinite(gr).all(), f"seed={seed}: d{n} not finite"
        err = rel_error(gr, to_numpy(want[n]))
        assert err < 1e-4, f"seed={seed}: d{n} against the ops backward, relative error {err:.2e}"


def test_compile_failure_falls_back_to_the_ops_backward(in_simulator, monkeypatch):
    """A backward kernel that does not compile sends the call to the ops backward with one
    RuntimeWarning; the gradients are the ops backward's."""
    seed = fresh_seed()
    x = random_inputs(1, 80, 1, 2, 64, 64, seed=seed)
    W, V = _weights(x, seed)
    monkeypatch.setattr(chunked_backward, "header", lambda: "#error broken backward header\n")
    monkeypatch.setattr(chunked_backward, "_VERDICTS", {})
    with pytest.warns(RuntimeWarning, match="CUDA chunked backward failed"):
        grads = _grads(_call(x, False, "cuda", "chunked"), x, False, W, V)
    assert not chunked_backward.supports(_problem(x, False))
    want = _ops_grads(x, W, V)
    for n in _names(False):
        err = rel_error(to_numpy(grads[n]), to_numpy(want[n]))
        assert err < 1e-5, f"seed={seed}: d{n} relative error {err:.2e}"


# --- on a CUDA device ------------------------------------------------------------------------------


def _has_cuda() -> bool:
    from mlx_gdn.cuda.kernel import _device

    return _device()


gpu = pytest.mark.skipif(not _has_cuda(), reason="needs MLX with a CUDA device")


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("B,T", [(1, 4096), (2, 1000)])
@pytest.mark.parametrize("fused", [False, True])
def test_gpu_kernel_backward_qwen35_shape(monkeypatch, B, T, fused):
    """Qwen3.5's layer shape (Hk=16, Hv=32, Dk=Dv=128), bf16: every gradient within 2e-2 of the
    ops backward's float32 VJP at the same values (whose own error from TF32 matmuls on the GPU,
    under 2e-3, is well inside that)."""
    seed = fresh_seed()
    x = random_inputs(B, T, 16, 32, 128, 128, dtype=mx.bfloat16, seed=seed, mask=(B > 1))
    W, V = _weights(x, seed)
    grads = _kernel_grads(x, fused, W, V, monkeypatch)
    names = _names(fused)
    for n in names:
        assert np.isfinite(to_numpy(grads[n])).all(), f"seed={seed}: d{n} not finite"
    if fused:
        return
    want = _ops_grads(x, W, V)
    for n in names:
        err = rel_error(to_numpy(grads[n]), to_numpy(want[n]))
        assert err < 2e-2, f"B={B} T={T}, seed={seed}: d{n} against the ops backward, relative error {err:.2e}"


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("fused", [False, True])
def test_gpu_kernel_backward_float32_reference(monkeypatch, fused):
    """float32 (3xTF32 products) on the GPU: every gradient against central differences of the
    float64 reference, Dk=Dv=128, GQA, masks, a partial last chunk."""
    seed = fresh_seed()
    x = random_inputs(1, 300, 2, 4, 128, 128, seed=seed, mask=True)
    W, V = _weights(x, seed)
    grads = _kernel_grads(x, fused, W, V, monkeypatch)
    check_directional(grads, x, fused, W, V, seed, f"GPU kernel backward float32 {'update' if fused else 'rule'}")


# --- offline compile with nvcc (no GPU needed) -----------------------------------------------------


def _backward_tu() -> str:
    """One translation unit of the SAVE_EVERY state passes and the backward stages, as MLX builds them."""
    from mlx_gdn.cuda import kernel as cuda
    from mlx_gdn.validate import Problem

    from test_cuda_compile import MLX_HEADER

    parts = [MLX_HEADER, chunked_backward.header()]
    for i, (dt, Dk, Dv, masked, B, body) in enumerate([
            (mx.bfloat16, 128, 128, True, 1, "state_output_save"),
            (mx.float32, 128, 128, False, 4, "state_output_save"),
            (mx.bfloat16, 128, 128, False, 4, "state_output_regs_save"),
            (mx.float32, 64, 128, True, 1, "state_output_key_save")]):
        exact = dt == mx.float32
        ot = mx.float32 if exact else mx.bfloat16
        mask = ("mask", mx.bool_ if masked else mx.float32, 2 if masked else 1)
        common = [("W", ot, 4), ("U", ot, 4), ("Aqk", ot, 5), ("G", mx.float32, 3), ("state_in", mx.float32, 4), mask]
        outputs = [("y", dt), ("state_out", mx.float32), ("saved", mx.float32)]
        if body == "state_output_regs_save":
            inputs = [("q", dt, 4), ("k", dt, 4)] + common
            template = [("Dk", Dk), ("Dv", Dv), ("NW", 8), ("MASKED", masked), ("SAVE_EVERY", 1)]
        else:
            key = body == "state_output_key_save"
            p = Problem(B, 256, 16, 32, Dk, Dv, dt, "key" if key else "scalar", masked, False)
            bv, share, _ = chunked._state_config(p)
            inputs = ([("Qg", dt, 4), ("Kd", dt, 4)] if key else [("q", dt, 4), ("k", dt, 4)]) + common
            inputs += [("Gk", mx.float32, 4)] if key else []
            template = [("Dk", Dk), ("Dv", Dv), ("BV", bv), ("EXACT", exact), ("MASKED", masked), ("SHARE_WQ", share),
                        ("NH", chunked.state_nh(bv)), ("SAVE_EVERY", 2 if key else 1)]
        parts.append(cuda.kernel_text(f"custom_kernel_save_{i}", "", cuda.source_text(f"chunked/{body}.cu"), inputs,
                                      outputs, template))
    for i, (dt, Dk, Dv, masked, bv) in enumerate([
            (mx.bfloat16, 128, 128, False, 32), (mx.float32, 128, 128, True, 64), (mx.float16, 64, 128, True, 16),
            (mx.bfloat16, 128, 64, True, 64)]):
        exact = dt == mx.float32
        ot = mx.float32 if exact else mx.bfloat16
        mask = ("mask", mx.bool_ if masked else mx.float32, 2 if masked else 1)
        f32 = mx.float32
        inputs = [("q", dt, 4), ("k", dt, 4), ("W", ot, 4), ("Aqk", ot, 5), ("G", f32, 3), ("dy", dt, 4), mask,
                  ("dstate", f32, 4)]
        template = [("Dk", Dk), ("Dv", Dv), ("BV", bv), ("EXACT", exact), ("MASKED", masked)]
        parts.append(cuda.kernel_text(f"custom_kernel_state_backward_{i}", "", cuda.source_text("chunked/state_backward.cu"),
                                      inputs, [(n, f32) for n in chunked_backward.STATE_BWD_OUTPUTS], template))
        inputs = [("q", dt, 4), ("k", dt, 4), ("v", dt, 4), ("beta", dt, 3), ("W", ot, 4), ("U", ot, 4),
                  ("Aqk", ot, 5), ("G", f32, 3), ("state_in", f32, 4), ("saved", f32, 5), ("dS", f32, 5),
                  ("dU", f32, 4), ("dy", dt, 4), mask]
        template = [("Dk", Dk), ("Dv", Dv), ("EXACT", exact), ("MASKED", masked)]
        parts.append(cuda.kernel_text(f"custom_kernel_chunk_grads_{i}", "", cuda.source_text("chunked/chunk_grads.cu"),
                                      inputs, [(n, f32) for n in chunked_backward.GRADS_OUTPUTS], template))
    return "".join(parts)


def test_backward_kernels_compile():
    """The SAVE_EVERY state passes and the backward stages compile with nvcc for sm_90a."""
    import shutil
    import tempfile
    from pathlib import Path

    from test_cuda_compile import _nvcc

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found")
    with tempfile.TemporaryDirectory() as d:
        r = _nvcc(_backward_tu(), Path(d), "backward")
    assert r.returncode == 0, f"backward translation unit failed to compile:\n{r.stderr[-6000:]}"


@pytest.mark.cuda
@gpu
def test_gpu_kernel_backward_under_compile(monkeypatch):
    """Inside mx.compile (as training steps run) the kernel backward runs, with the same gradients
    as outside it."""
    import warnings

    seed = fresh_seed()
    x = random_inputs(1, 300, 2, 4, 128, 128, dtype=mx.bfloat16, seed=seed, mask=True)
    W, V = _weights(x, seed)
    monkeypatch.setattr(chunked_backward, "_VERDICTS", {})
    _kernel_only(monkeypatch)
    fn = _call(x, True, "cuda", "chunked")

    def loss(*args):
        y, s = fn(*args)
        return (y.astype(mx.float32) * W).sum() + (s * V).sum()

    args = [getattr(x, n) for n in _names(True)]
    grad = mx.grad(loss, argnums=tuple(range(len(args))))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = mx.compile(grad)(*args)
        mx.eval(got)
    want = grad(*args)
    for n, a, b in zip(_names(True), got, want):
        err = rel_error(to_numpy(a), to_numpy(b))
        assert err < 1e-5, f"seed={seed}: d{n} compiled against eager, relative error {err:.2e}"
