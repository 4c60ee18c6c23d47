"""The dispatch point: which backend and algorithm `auto` picks, and fallbacks."""

import sys
import types

import mlx.core as mx
import pytest

import mlx_gdn
from mlx_gdn import backends
from mlx_gdn import backends as crossover
from mlx_gdn.testing import random_inputs
from mlx_gdn.validate import Problem


def problem(T=8, gate="scalar", Dk=64):
    return Problem(1, T, 1, 2, Dk, 32, mx.float32, gate, False, False)


def fake_backend(name, *, avail=True, supported=True, algo="recurrent", calls=None):
    mod = types.SimpleNamespace(name=name, variants=lambda *args: ())  # no kernels: nothing to try first
    mod.available = lambda: avail
    mod.unavailable_reason = lambda: "no device in this test"
    mod.supports = lambda p, a: supported
    mod.choose_algorithm = lambda p: algo
    mod.simulated = lambda: False

    def run(p, q, k, v, state, mask, *, algorithm, g=None, beta=None, gating=None):
        calls.append((name, algorithm, gating is not None))
        return backends.module("ops").run(p, q, k, v, state, mask, algorithm="recurrent", g=g, beta=beta, gating=gating)

    mod.run = run
    return mod


@pytest.fixture
def fakes(monkeypatch):
    calls = []
    real = backends.module
    table = {}

    def module(name):
        return table[name] if name in table else real(name)

    monkeypatch.setattr(backends, "module", module)
    return table, calls


def test_auto_on_cpu_is_ops():
    if mx.default_device().type == mx.cpu and not mlx_gdn.backends.is_available("metal"):
        mod, algo = backends.resolve("auto", "auto", problem())
        assert mod.name == "ops" and algo in ("recurrent", "chunked")


def test_auto_prefers_available_gpu_backend(fakes, monkeypatch):
    table, calls = fakes
    table["cuda"] = fake_backend("cuda", calls=calls)
    table["metal"] = fake_backend("metal", avail=False, calls=calls)
    monkeypatch.setattr(backends, "_default_is_gpu", lambda: True)
    x = random_inputs(1, 3, 1, 2, 16, 8, seed=3)
    mlx_gdn.gated_delta_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias)
    assert calls == [("cuda", "recurrent", True)]


def test_auto_stays_on_ops_when_default_device_is_cpu(fakes, monkeypatch):
    table, calls = fakes
    table["cuda"] = fake_backend("cuda", calls=calls)
    monkeypatch.setattr(backends, "_default_is_gpu", lambda: False)
    mod, _ = backends.resolve("auto", "recurrent", problem())
    assert mod.name == "ops"


def test_unsupported_shape_falls_back_to_ops(fakes):
    table, calls = fakes
    table["metal"] = fake_backend("metal", supported=False, calls=calls)
    mod, algo = backends.resolve("metal", "recurrent", problem(Dk=16))
    assert mod.name == "ops" and algo == "recurrent"


def test_backend_algorithm_choice_is_used(fakes):
    table, calls = fakes
    table["metal"] = fake_backend("metal", algo="chunked", calls=calls)
    mod, algo = backends.resolve("metal", "auto", problem(T=4096))
    assert algo == "chunked"
    mod, algo = backends.resolve("metal", "recurrent", problem(T=4096))
    assert algo == "recurrent"


def test_unavailable_explicit_backend_names_reason(fakes):
    table, calls = fakes
    table["cuda"] = fake_backend("cuda", avail=False, calls=calls)
    with pytest.raises(ValueError, match=r"backend 'cuda' is not available on this machine \(no device in this test\)"):
        backends.resolve("cuda", "auto", problem())


def test_crossover_table(monkeypatch):
    monkeypatch.setitem(crossover.CHUNKED_FROM_T, "ops", 256)
    assert crossover.prefers_chunked("ops", problem(T=256))
    assert not crossover.prefers_chunked("ops", problem(T=255))
    monkeypatch.setitem(crossover.CHUNKED_FROM_T, "ops", None)
    assert not crossover.prefers_chunked("ops", problem(T=10**6))


def test_available_backends_always_has_ops():
    assert "ops" in mlx_gdn.available_backends()


def test_backend_that_fails_to_import_is_reported_not_fatal(monkeypatch):
    real_import = backends.importlib.import_module

    def import_module(name):
        if name == "mlx_gdn.cuda.backend":
            raise RuntimeError("driver library missing")
        return real_import(name)

    monkeypatch.setattr(backends.importlib, "import_module", import_module)
    monkeypatch.delitem(sys.modules, "mlx_gdn.cuda.backend", raising=False)
    assert not backends.is_available("cuda")
    assert backends.resolve("auto", "recurrent", problem())[0] is not None
    with pytest.raises(ValueError, match=r"backend 'cuda' is not available on this machine \(RuntimeError: driver library missing\)"):
        backends.resolve("cuda", "recurrent", problem())


def _pretend_metal_gpu(monkeypatch):
    """Make this process look like a Mac: a Metal device and a kernel factory that records the
    kernels it runs (returning zeros of the requested shapes)."""
    calls = []

    def factory(**spec):
        def kern(**call):
            calls.append(spec["name"])
            return [mx.zeros(s, dtype=d) for s, d in zip(call["output_shapes"], call["output_dtypes"])]
        return kern

    monkeypatch.setattr(mx.fast, "metal_kernel", factory)
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    return calls


def test_entering_and_leaving_the_simulator_reroutes():
    """Routes remembered for a decode loop follow the simulator: ops outside it, Metal inside,
    ops again after, within one process and for one input signature."""
    from mlx_gdn.sim import STATS, simulated_metal

    x = random_inputs(1, 1, 1, 2, 32, 32, seed=3)

    def launches():
        before = STATS["launches"]
        mx.eval(*mlx_gdn.gated_delta_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state))
        return STATS["launches"] - before

    if mx.metal.is_available():
        pytest.skip("a real Metal device answers outside the simulator")
    assert launches() == 0
    with simulated_metal():
        assert launches() == 2  # the kernel's one trial on small inputs (mlx_gdn.fallback), then the call
        assert launches() == 1
    assert launches() == 0


def test_kernels_made_in_the_simulator_are_not_reused_after_it(monkeypatch):
    """On a machine with a Metal GPU, a process that ran the simulator must launch the GPU's kernel
    objects afterwards, not the simulator's (public call and the fused decode-layer step)."""
    from mlx_gdn.models import decode_step as decode_layer
    from mlx_gdn.sim import simulated_metal

    x = random_inputs(1, 1, 1, 2, 32, 32, seed=4)
    B, K, Hk, Hv, Dk, Dv = 1, 4, 1, 2, 32, 32
    C = 2 * Hk * Dk + Hv * Dv
    layer_args = (mx.zeros((B, 1, C)), mx.zeros((B, K - 1, C)), mx.zeros((C, K, 1)), mx.zeros((B, 1, Hv)),
                  mx.zeros((B, 1, Hv)), mx.zeros((Hv,)), mx.zeros((Hv,)), None, None, Hk, Hv, Dk, Dv)

    def update():
        return mlx_gdn.gated_delta_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state, backend="metal")

    with simulated_metal():
        mx.eval(*update(), *decode_layer.decode_step("metal", *layer_args))
    calls = _pretend_metal_gpu(monkeypatch)
    update()
    decode_layer.decode_step("metal", *layer_args)
    assert calls == ["gdn_recurrent_decode_update", "gdn_decode_layer"]


def test_chunked_state_pass_choice(monkeypatch):
    """The CUDA chunked call takes the register-state pass where its blocks are wide (as timed on
    the H100) and the shared-memory pass elsewhere; STATE_REGS forces either."""
    from mlx_gdn.cuda import chunked as cuda

    def qwen(B, dtype=mx.bfloat16, Dk=128):
        return Problem(B, 4096, 16, 32, Dk, 128, dtype, "scalar", False, True)

    monkeypatch.setattr(cuda, "STATE_REGS", None)
    assert cuda._regs_config(qwen(1)) is None  # 2-warp blocks: the shared-memory pass
    assert cuda._regs_config(qwen(2))[0] == 4
    assert cuda._regs_config(qwen(4))[0] == 8
    assert cuda._regs_config(qwen(4, mx.float32)) is None  # 3xTF32 runs the shared-memory pass
    assert cuda._regs_config(qwen(4, Dk=256)) is None  # S of 256 columns does not fit in registers
    monkeypatch.setattr(cuda, "STATE_REGS", True)
    assert cuda._regs_config(qwen(1))[0] == 2
    monkeypatch.setattr(cuda, "STATE_REGS", False)
    assert cuda._regs_config(qwen(4)) is None
