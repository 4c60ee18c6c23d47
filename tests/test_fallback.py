"""A kernel that fails on the device: backend="auto" falls back with one warning and a correct
result; an explicit backend raises. Failures are injected through the simulators: the kernel body
of one variant gets a line the C++ compiler rejects, as a Metal compiler may reject what the
simulator accepted."""

from __future__ import annotations

import warnings

import mlx.core as mx
import pytest

import mlx_gdn
from mlx_gdn import backends, fallback, launch
from mlx_gdn.reference import delta_rule, gates
from mlx_gdn.sim import simulated_cuda, simulated_metal
from mlx_gdn.testing import assert_matches_reference, fresh_seed, random_inputs

BROKEN = "\nthis line is not C++;\n"


def _break(monkeypatch, *names):
    """Kernel bodies of the launch specs named `names` stop compiling."""
    real = launch.LaunchSpec.source

    def source(self):
        return real(self) + (BROKEN if self.name in names else "")

    monkeypatch.setattr(launch.LaunchSpec, "source", source)
    backends.clear_plans()


def _rule(x, **kw):
    return mlx_gdn.gated_delta_rule(x.q, x.k, x.v, x.g, x.beta, x.state, x.mask, **kw)


def _calls(n, call, x, ref, dtype, context):
    """n calls, each checked against the reference; the warnings they raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(n):
            y, s = call()
            assert_matches_reference(y, s, *ref, dtype, f"{context} call {i}")
    return [w for w in caught if issubclass(w.category, RuntimeWarning)]


def test_auto_falls_back_to_the_other_algorithm_with_one_warning(monkeypatch):
    seed = fresh_seed()
    x = random_inputs(1, 3, 1, 2, 32, 32, seed=seed)
    ref = delta_rule(x.q, x.k, x.v, x.g, x.beta, x.state)
    _break(monkeypatch, "gdn_recurrent_decode_rule")
    with simulated_metal():
        caught = _calls(3, lambda: _rule(x), x, ref, mx.float32, f"seed={seed}")
        assert len(caught) == 1, [str(w.message) for w in caught]
        msg = str(caught[0].message)
        assert "gdn_recurrent_decode_rule<" in msg and "SimCompileError" in msg and "metal chunked" in msg, msg
        # Later calls are planned already; a new signature of the same variant stays silent too.
        x2 = random_inputs(2, 2, 1, 2, 32, 32, seed=seed + 1)
        ref2 = delta_rule(x2.q, x2.k, x2.v, x2.g, x2.beta, x2.state)
        assert not _calls(2, lambda: _rule(x2), x2, ref2, mx.float32, f"seed={seed + 1}")
        # An explicit backend does not fall back: it names the failed variant.
        with pytest.raises(fallback.KernelFailure, match="gdn_recurrent_decode_rule<.*algorithm 'recurrent'"):
            _rule(x, backend="metal")
        # The variants of other problems are unaffected (the fused form's kernel runs).
        y, s = mlx_gdn.gated_delta_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state, backend="metal")
        g, beta = gates(x.a, x.b, x.A_log, x.dt_bias)
        assert_matches_reference(y, s, *delta_rule(x.q, x.k, x.v, g, beta, x.state), mx.float32, f"seed={seed}")


def test_auto_falls_back_to_ops_when_both_algorithms_fail(monkeypatch):
    seed = fresh_seed()
    x = random_inputs(1, 6, 1, 2, 32, 32, seed=seed, dtype=mx.bfloat16, mask=True)
    g, beta = gates(x.a, x.b, x.A_log, x.dt_bias, -3.0, True)
    ref = delta_rule(x.q, x.k, x.v, g, beta, x.state, x.mask)
    _break(monkeypatch, "gdn_recurrent_prefill_update_masked", "gdn_chunked_kkt_solve_wy_update_masked")

    def call():
        return mlx_gdn.gated_delta_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state, x.mask,
                                          lower_bound=-3.0, allow_neg_eigval=True)

    with simulated_metal():
        caught = _calls(2, call, x, ref, mx.bfloat16, f"seed={seed}")
        names = sorted(str(w.message).split("<")[0].split()[-1] for w in caught)
        assert names == ["gdn_chunked_kkt_solve_wy_update_masked", "gdn_recurrent_prefill_update_masked"], names
        assert "ops recurrent" in str(caught[-1].message)


def test_wrong_results_count_as_failures(monkeypatch):
    """A kernel that compiles but writes nothing (its outputs stay NaN-poisoned) is skipped too."""
    seed = fresh_seed()
    x = random_inputs(1, 2, 1, 2, 32, 32, seed=seed)
    ref = delta_rule(x.q, x.k, x.v, x.g, x.beta, x.state)
    real = launch.LaunchSpec.source
    monkeypatch.setattr(launch.LaunchSpec, "source",
                        lambda self: "return;\n" + real(self) if self.name == "gdn_recurrent_decode_rule" else real(self))
    backends.clear_plans()
    with simulated_metal():
        caught = _calls(2, lambda: _rule(x), x, ref, mx.float32, f"seed={seed}")
    assert len(caught) == 1 and "non-finite output" in str(caught[0].message), [str(w.message) for w in caught]


def test_verdicts_are_forgotten_with_the_plans(monkeypatch):
    x = random_inputs(1, 1, 1, 2, 32, 32, seed=fresh_seed())
    _break(monkeypatch, "gdn_recurrent_decode_rule")
    with simulated_metal():
        with pytest.warns(RuntimeWarning, match="gdn_recurrent_decode_rule"):
            mx.eval(*_rule(x))
        assert any(v is not None for v in fallback._VERDICTS.values())
        backends.clear_plans()
        assert not fallback._VERDICTS
        with pytest.warns(RuntimeWarning, match="gdn_recurrent_decode_rule"):  # tried again, warned again
            mx.eval(*_rule(x))


def test_fused_decode_step_falls_back_to_the_unfused_step(monkeypatch):
    from mlx_gdn.models import decode_step

    B, K, Hk, Hv, Dk, Dv = 1, 4, 1, 2, 32, 32
    ins = decode_step.random_step_inputs(B, K, Hk, Hv, Dk, Dv, mx.float32, False, seed=fresh_seed())
    args = (ins[0], ins[1], ins[2], ins[3], ins[4], ins[7], ins[8], Hk, Hv, Dk, Dv)
    with simulated_metal():
        assert decode_step.fused_backend("auto", *args) == "metal"
        backends.clear_plans()
        _break(monkeypatch, "gdn_decode_layer")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert decode_step.fused_backend("auto", *args) is None
            assert decode_step.fused_backend("auto", *args) is None
        assert len(caught) == 1 and "gdn_decode_layer<" in str(caught[0].message), [str(w.message) for w in caught]
        assert "unfused layer step" in str(caught[0].message)
        # An explicit backend keeps the fused step (it is not tried first).
        assert decode_step.fused_backend("metal", *args) == "metal"


def test_fused_norm_step_falls_back_to_the_plain_fused_step(monkeypatch):
    """A failing norm variant under "auto": the layer's T=1 step runs the plain fused step and the
    norm module instead (one warning naming the variant), and its output is still right."""
    from types import SimpleNamespace

    from mlx_lm.models import qwen3_5
    from mlx_lm.models.cache import ArraysCache

    from mlx_gdn.models import decode_step
    from mlx_gdn.reference import rel_error

    seed = fresh_seed()
    mx.random.seed(seed)
    args = SimpleNamespace(hidden_size=32, linear_num_value_heads=2, linear_num_key_heads=1, linear_key_head_dim=32,
                           linear_value_head_dim=32, linear_conv_kernel_dim=4, rms_norm_eps=1e-6)
    ref = qwen3_5.GatedDeltaNet(args)
    mx.eval(ref.parameters())
    ref.eval()
    layer = mlx_gdn.GatedDeltaNet.from_layer(ref, backend="auto")
    x = mx.random.normal((1, 1, 32))
    calls = []
    real = decode_step.decode_step
    monkeypatch.setattr(decode_step, "decode_step",
                        lambda *a, **k: calls.append(k.get("norm") is not None) or real(*a, **k))
    with simulated_metal():
        _break(monkeypatch, "gdn_decode_layer_norm")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = layer(x, None, ArraysCache(2))
            y2 = layer(x, None, ArraysCache(2))
            mx.eval(y, y2)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "gdn_decode_layer_norm<" in msgs[0] and "without the norm" in msgs[0], msgs
    # The trials of the norm variant and of the plain one, then the layer's two steps on the plain one.
    assert calls == [True, False, False, False], calls
    err = rel_error(y, ref(x, None, ArraysCache(2)))
    assert err < 1e-4, f"rel error {err:.3g} (seed={seed})"


def test_cuda_chunked_failure_falls_back(monkeypatch):
    """Under the CUDA simulator a broken chunked state kernel sends the call to the next path."""
    from mlx_gdn.cuda import chunked as cuda_chunked

    seed = fresh_seed()
    x = random_inputs(1, 200, 1, 1, 64, 64, seed=seed, dtype=mx.bfloat16)
    ref = delta_rule(x.q, x.k, x.v, x.g, x.beta, x.state)
    real = cuda_chunked.source_text
    monkeypatch.setattr(cuda_chunked, "source_text",
                        lambda name: real(name) + (BROKEN if name.startswith("chunked/state_output") else ""))
    backends.clear_plans()
    with simulated_cuda():
        caught = _calls(2, lambda: _rule(x), x, ref, mx.bfloat16, f"seed={seed}")
    msgs = [str(w.message) for w in caught]
    assert any("gdn_cuda_chunked_state_output" in m and "algorithm 'chunked'" in m for m in msgs), msgs
    assert len(msgs) == len(set(msgs)) <= 2, msgs  # each failed variant set warns once


def _cuda_device() -> bool:
    from mlx_gdn.cuda.kernel import _device

    return _device() and mx.default_device().type == mx.gpu


@pytest.mark.cuda
@pytest.mark.skipif(not _cuda_device(), reason="needs MLX with a CUDA device")
@pytest.mark.parametrize("fused", [False, True])
def test_kernel_rejected_by_nvrtc_falls_back_on_the_gpu(monkeypatch, fused):
    """On a real GPU the compiler's error surfaces only when MLX evaluates the launch (it compiles
    lazily): the trial catches it, "auto" warns once and returns the right answer, an explicit
    backend raises KernelFailure afterwards."""
    seed = fresh_seed()
    x = random_inputs(2, 3, 2, 4, 128, 128, seed=seed, dtype=mx.bfloat16, mask=True)
    name = "gdn_recurrent_decode_update_masked_v4" if fused else "gdn_recurrent_decode_rule_masked_v4"
    _break(monkeypatch, name)
    if fused:
        g, beta = gates(x.a, x.b, x.A_log, x.dt_bias)
        fn, args = mlx_gdn.gated_delta_update, (x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state, x.mask)
    else:
        g, beta = x.g, x.beta
        fn, args = mlx_gdn.gated_delta_rule, (x.q, x.k, x.v, x.g, x.beta, x.state, x.mask)
    call = lambda **kw: fn(*args, **kw)  # noqa: E731
    ref = delta_rule(x.q, x.k, x.v, g, beta, x.state, x.mask)
    assert mlx_gdn.explain(fn, *args).kernels[0].name == name, "the broken kernel is not the one this call launches"
    caught = _calls(3, call, x, ref, mx.bfloat16, f"seed={seed}")
    assert len(caught) == 1 and name + "<" in str(caught[0].message), [str(w.message) for w in caught]
    with pytest.raises(fallback.KernelFailure, match=name):
        call(backend="cuda", algorithm="recurrent")
