"""mlx_gdn.explain: the route of a call (backend, algorithm, kernel variants, why) without
running it, validated like the call, on ops and under both simulators."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

import mlx_gdn
from mlx_gdn import backends, fallback, launch
from mlx_gdn.sim import STATS, simulated_cuda, simulated_metal
from mlx_gdn.testing import fresh_seed, random_inputs

rule, update = mlx_gdn.gated_delta_rule, mlx_gdn.gated_delta_update


def _rule_args(x):
    return (x.q, x.k, x.v, x.g, x.beta, x.state, x.mask)


def _update_args(x):
    return (x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state, x.mask)


def _recording(monkeypatch, factory_name):
    """Wrap mx.fast.<factory_name> so every launch logs (kernel name, template)."""
    log = []
    real = getattr(mx.fast, factory_name)

    def factory(**spec):
        kern = real(**spec)

        def call(**kw):
            log.append((spec["name"], tuple(tuple(t) for t in kw.get("template", ()))))
            return kern(**kw)

        return call

    monkeypatch.setattr(mx.fast, factory_name, factory)
    backends.clear_plans()
    return log


def test_ops_routes_and_crossover():
    x = random_inputs(1, 3, 1, 2, 32, 32, seed=fresh_seed())
    if backends.pick_backend("auto") != "ops":
        pytest.skip("a GPU backend answers 'auto' here")
    e = mlx_gdn.explain(rule, *_rule_args(x))
    assert (e.backend, e.algorithm, e.kernels) == ("ops", "recurrent", ())
    assert any("crossover" in r and "T=3" in r for r in e.reasons), e.reasons
    long = random_inputs(1, backends.builtin_chunked_from("ops", "float32"), 1, 2, 32, 32, seed=fresh_seed())
    e = mlx_gdn.explain(update, *_update_args(long), lower_bound=-1.0)
    assert (e.backend, e.algorithm) == ("ops", "chunked"), str(e)
    key = random_inputs(1, 64, 1, 2, 32, 32, seed=fresh_seed(), gate="key")
    e = mlx_gdn.explain(rule, *_rule_args(key), algorithm="auto")
    assert e.algorithm == "recurrent" and any("per-key" in r for r in e.reasons), str(e)
    d = e.as_dict()
    assert json.loads(json.dumps(d)) == d and d["problem"]["gate"] == "key"


@pytest.mark.parametrize("bad", [
    dict(v=mx.zeros((1, 3, 3, 32))),  # Hv not a multiple of Hk
    dict(beta=mx.zeros((1, 3, 5))),
    dict(state=mx.zeros((1, 2, 32, 32), dtype=mx.float16)),
    dict(backend="tpu"),
    dict(algorithm="fast"),
    dict(mask=mx.zeros((1, 3), dtype=mx.float32)),
])
def test_bad_input_raises_what_the_call_raises(bad):
    x = random_inputs(1, 3, 2, 4, 32, 32, seed=fresh_seed())
    args = dict(q=x.q, k=x.k, v=x.v, g=x.g, beta=x.beta, state=x.state, mask=None)
    args.update(bad)
    with pytest.raises((ValueError, TypeError)) as want:
        rule(**args)
    with pytest.raises(want.type) as got:
        mlx_gdn.explain(rule, **args)
    assert str(got.value) == str(want.value)


def test_update_options_are_validated_and_fn_checked():
    x = random_inputs(1, 2, 1, 2, 32, 32, seed=fresh_seed())
    for opt, exc in ((dict(lower_bound=1.0), ValueError), (dict(allow_neg_eigval=1), TypeError)):
        with pytest.raises(exc) as want:
            update(*_update_args(x), **opt)
        with pytest.raises(exc) as got:
            mlx_gdn.explain(update, *_update_args(x), **opt)
        assert str(got.value) == str(want.value)
    with pytest.raises(TypeError, match="fn must be"):
        mlx_gdn.explain(print, x.q)
    with pytest.raises(TypeError):
        mlx_gdn.explain(rule, x.q, x.k, x.v, x.g, x.beta, x.state, x.mask, None)  # one argument too many


@pytest.mark.parametrize("T,fused,masked", [(1, False, False), (6, True, True), (40, True, False)])
def test_metal_names_the_kernels_that_run(monkeypatch, T, fused, masked):
    seed = fresh_seed()
    x = random_inputs(1, T, 1, 2, 32, 32, seed=seed, mask=masked)
    algorithm = "chunked" if T == 40 else "auto"
    call, args = (update, _update_args(x)) if fused else (rule, _rule_args(x))
    with simulated_metal():
        log = _recording(monkeypatch, "metal_kernel")
        before, verdicts = STATS["launches"], dict(fallback._VERDICTS)
        e = mlx_gdn.explain(call, *args, lower_bound=-2.0, algorithm=algorithm) if fused else \
            mlx_gdn.explain(call, *args, algorithm=algorithm)
        assert STATS["launches"] == before and fallback._VERDICTS == verdicts and not log  # launches nothing
        assert e.backend == "metal" and e.algorithm == ("chunked" if T == 40 else "recurrent"), str(e)
        assert any("not yet tried" in r for r in e.reasons), str(e)
        mx.eval(*(call(*args, lower_bound=-2.0, algorithm=algorithm) if fused else call(*args, algorithm=algorithm)))
    ran = {(n, tuple((k, v) for k, v in t)) for n, t in log}
    assert ran == {(v.name, v.template) for v in e.kernels}, (ran, str(e), seed)
    assert "_masked" in e.kernels[0].name if masked else "_masked" not in e.kernels[0].name


def test_metal_unsupported_shape_goes_to_ops():
    x = random_inputs(1, 2, 1, 2, 48, 32, seed=fresh_seed())  # Dk=48: not a multiple of 32
    with simulated_metal():
        e = mlx_gdn.explain(rule, *_rule_args(x))
    assert e.backend == "ops" and e.kernels == () and any("unsupported shape" in r for r in e.reasons), str(e)


def test_metal_fallback_is_explained(monkeypatch):
    x = random_inputs(1, 2, 1, 2, 32, 32, seed=fresh_seed())
    real = launch.LaunchSpec.source
    monkeypatch.setattr(launch.LaunchSpec, "source",
                        lambda s: real(s) + ("\nnot C++;\n" if s.name == "gdn_recurrent_decode_rule" else ""))
    with simulated_metal():
        with pytest.warns(RuntimeWarning):
            mx.eval(*rule(*_rule_args(x)))
        e = mlx_gdn.explain(rule, *_rule_args(x))
        assert (e.backend, e.algorithm) == ("metal", "chunked"), str(e)
        assert any(r.startswith("fallback: kernel gdn_recurrent_decode_rule<") for r in e.reasons), str(e)
        with pytest.raises(fallback.KernelFailure, match="gdn_recurrent_decode_rule"):
            mlx_gdn.explain(rule, *_rule_args(x), backend="metal")


def test_cuda_chunked_names_the_kernels_that_run(monkeypatch):
    seed = fresh_seed()
    T = backends.CHUNKED_FROM_T["cuda"]
    x = random_inputs(1, T, 1, 1, 64, 64, seed=seed, dtype=mx.bfloat16)
    with simulated_cuda():
        log = _recording(monkeypatch, "cuda_kernel")
        e = mlx_gdn.explain(rule, *_rule_args(x))
        assert not log
        assert (e.backend, e.algorithm) == ("cuda", "chunked") and any("crossover" in r for r in e.reasons), str(e)
        mx.eval(*rule(*_rule_args(x)))
    ran = {(n, tuple((k, v) for k, v in t)) for n, t in log}
    assert ran == {(v.name, v.template) for v in e.kernels}, (ran, str(e), seed)
    assert [v.name for v in e.kernels][0] == "gdn_cuda_chunked_kkt_solve_wy"
