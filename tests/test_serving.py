"""Serving arguments (cu_seqlens, state_indices, return_states) on the ops path and the Metal
kernels (simulator), against the float64 reference run sequence by sequence; bad input."""

from __future__ import annotations

import contextlib

import mlx.core as mx
import numpy as np
import pytest
from serving_cases import BF16, Case, check_call, make_call, run_call

import mlx_gdn
from mlx_gdn import backends, serving
from mlx_gdn.ops import backend as ops_backend
from mlx_gdn.testing import fresh_seed, random_inputs

sim = pytest.importorskip("mlx_gdn.sim")

# Packed lengths mix empty and one-token sequences with ones crossing the CPU chunk length (32)
# and the prefill body's staged blocks.
CASES = [
    Case(lens=(5, 0, 1, 13), masked=True, every=1),
    Case(lens=(0, 40, 1, 3), Hk=2, Hv=4, dtype=BF16, every=4),
    Case(lens=(7, 9), gate="key", pool=5, every=2),
    Case(lens=(3, 1, 0, 6), pool=9, masked=True),
    Case(lens=(2, 4), Dk=64, Dv=32, with_state=False),
    Case(lens=None, B=3, T=1, pool=7),
    Case(lens=None, B=4, T=3, Hk=2, Hv=4, dtype=BF16, pool=6, masked=True),
    Case(lens=None, B=2, T=6, gate="key", every=1, masked=True),
    Case(lens=None, B=2, T=9, pool=3, every=3, dtype=BF16),
    Case(lens=(4, 1, 6), pool=4, fused=True, every=1),
    Case(lens=None, B=3, T=1, fused=True, pool=5, dtype=BF16),
    Case(lens=(3, 0, 8), gate="key", fused=True, fused_gate="key", pool=4, every=1),
    Case(lens=None, B=2, T=1, gate="key", fused=True, fused_gate="key", pool=3, masked=True),
]
IDS = [c.label() for c in CASES]


@pytest.fixture
def no_ops(monkeypatch):
    """Fail if a call meant for the kernels falls back to the ops backend."""

    def refuse(*args, **kwargs):
        raise AssertionError("the ops backend ran where a Metal kernel should have")

    monkeypatch.setattr(ops_backend, "run_serving", refuse)
    monkeypatch.setattr(ops_backend, "run", refuse)


@pytest.mark.parametrize("algorithm", ["recurrent", "chunked"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_ops_matches_reference(case, algorithm):
    seed = fresh_seed()
    c = make_call(case, seed)
    check_call(c, run_call(c, "ops", algorithm), f"seed {seed}, {case.label()}, ops {algorithm}")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_metal_matches_reference(case, no_ops):
    seed = fresh_seed()
    c = make_call(case, seed)
    with sim.simulated_metal():
        out = run_call(c, "metal", "recurrent")
    check_call(c, out, f"seed {seed}, {case.label()}, metal")


def test_metal_chunked_request_runs_recurrent_kernel(no_ops):
    """algorithm="chunked" with serving arguments runs the recurrent kernel on Metal (the
    chunked kernels take no pools, packed sequences or per-step states)."""
    seed = fresh_seed()
    c = make_call(Case(lens=(9, 2), pool=3, every=1), seed)
    with sim.simulated_metal():
        out = run_call(c, "metal", "chunked")
    check_call(c, out, f"seed {seed}, metal chunked")


def test_ops_chunk_states_come_from_chunk_ends(monkeypatch):
    """return_states=C, a multiple of the chunk length, takes the chunked form's chunk-end
    states: the recurrent loop must not run."""
    from mlx_gdn.ops import serving as ops_serving

    def refuse(*a, **k):
        raise AssertionError("the recurrent loop ran")

    monkeypatch.setattr(ops_serving, "recurrent_rule_states", refuse)
    seed = fresh_seed()
    c = make_call(Case(lens=(70, 64, 3), every=32, pool=4), seed)
    # A length-3 sequence's chunk is 4 long and 32 is a multiple of it.
    check_call(c, run_call(c, "ops", "chunked"), f"seed {seed}")


def test_every_slot_padding_leaves_pool_alone():
    seed = fresh_seed()
    c = make_call(Case(lens=None, B=3, T=2, pool=5), seed)
    c.idx = mx.array([-1, -1, -2], dtype=mx.int32)
    for backend in ("ops", "metal"):
        with sim.simulated_metal():
            y, pool = run_call(c, backend)
        assert np.array_equal(np.array(pool), np.array(c.state)), f"seed {seed}: {backend}"
        check_call(c, (y, pool), f"seed {seed}, {backend}")


def test_zero_tokens():
    """T = 0: nothing runs; the states come back as they went in."""
    seed = fresh_seed()
    c = make_call(Case(lens=(0, 0), pool=3, every=1), seed)
    y, pool, states = run_call(c, "ops")
    assert y.shape == (1, 0, 2, 16) and states.shape == (1, 0, 2, 16, 32)
    assert np.array_equal(np.array(pool), np.array(c.state))


def test_check_values_false_skips_the_host_read(monkeypatch):
    called = []
    monkeypatch.setattr(serving, "check_serving_values", lambda *a: called.append(1))
    seed = fresh_seed()
    c = make_call(Case(lens=None, B=2, T=1, pool=4), seed)
    run_call(c, "ops", check_values=False)
    assert not called
    run_call(c, "ops", check_values=True)
    assert called


def _has_cuda() -> bool:
    from mlx_gdn.cuda.backend import available

    return available()


def _check_in_place(case: Case, backend: str, padded: bool, bound: float):
    """A pooled step whose caller rebinds the pool's name: evaluating it must allocate less than
    `bound` times the pool's bytes (a copy of the pool shows up as that much more peak memory;
    the write-back's own copy of the N final states, with padding, stays under it), and the
    result must meet the reference."""
    seed = fresh_seed()
    c = make_call(case, seed)
    if not padded:
        c.idx = mx.array(np.random.default_rng(seed).permutation(case.pool)[: case.N].astype(np.int32))
    x = c.x
    before = np.array(c.state)
    pool_bytes = c.state.nbytes
    pool = c.state
    c.state = None  # the pool's only holder is `pool` now
    kw = dict(state_indices=c.idx, backend=backend, algorithm="recurrent", check_values=False)
    with sim.simulated_metal() if backend == "metal" else contextlib.nullcontext():
        if case.fused:
            y, pool = mlx_gdn.gated_delta_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, pool, **kw)
        else:
            y, pool = mlx_gdn.gated_delta_rule(x.q, x.k, x.v, x.g, x.beta, pool, **kw)
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(y, pool)
        extra = mx.get_peak_memory() - base
    assert extra < pool_bytes * bound, f"seed {seed}: {extra} bytes allocated for a {pool_bytes}-byte pool (a copy)"
    c.state = mx.array(before)
    check_call(c, (y, pool), f"seed {seed}, {backend}, padded {padded}")


@pytest.mark.parametrize("backend", ["ops", "metal"])
@pytest.mark.parametrize("padded", [False, True])
def test_pool_update_in_place(backend, padded):
    """The write-back scatters N rows into the pool in place once the caller rebinds the pool's
    name, so its cost does not grow with the pool."""
    _check_in_place(Case(lens=None, B=4, T=1, pool=512), backend, padded, 1 / 8)


@pytest.mark.cuda
@pytest.mark.skipif(not _has_cuda(), reason="needs MLX with a CUDA device")
@pytest.mark.parametrize("padded", [False, True])
def test_cuda_pool_update_in_place(padded):
    """As above on the GPU at the benchmark's decode cell: 64 sequences of a Qwen3.5 layer, a pool
    of 512 slots (1 GiB); 64 final states are 1/8 of it."""
    case = Case(lens=None, B=64, T=1, Hk=16, Hv=32, Dk=128, Dv=128, dtype=BF16, pool=512, fused=True)
    _check_in_place(case, "cuda", padded, 1 / 4)


# ---- bad input -----------------------------------------------------------------------------


def _bad(kind):
    x = random_inputs(1, 6, 1, 2, 32, 16, seed=0)
    cu = mx.array([0, 2, 6], dtype=mx.int32)
    st = mx.zeros((2, 2, 16, 32))
    pool = mx.zeros((4, 2, 16, 32))
    kw = dict(cu_seqlens=cu, state=st)
    if kind == "cu_float":
        kw["cu_seqlens"] = cu.astype(mx.float32)
    elif kind == "cu_2d":
        kw["cu_seqlens"] = cu.reshape(1, 3)
    elif kind == "cu_start":
        kw["cu_seqlens"] = mx.array([1, 2, 6], dtype=mx.int32)
    elif kind == "cu_decreasing":
        kw["cu_seqlens"] = mx.array([0, 4, 3, 6], dtype=mx.int32)
        kw["state"] = mx.zeros((3, 2, 16, 32))
    elif kind == "cu_end":
        kw["cu_seqlens"] = mx.array([0, 2, 5], dtype=mx.int32)
    elif kind == "cu_batch":
        x = random_inputs(2, 6, 1, 2, 32, 16, seed=0)
    elif kind == "cu_list":
        kw["cu_seqlens"] = [0, 2, 6]
    elif kind == "state_rows":
        kw["state"] = mx.zeros((3, 2, 16, 32))
    elif kind == "state_shape":
        kw["state"] = mx.zeros((2, 2, 16, 16))
    elif kind == "state_dtype":
        kw["state"] = st.astype(mx.bfloat16)
    elif kind == "idx_len":
        kw.update(state=pool, state_indices=mx.array([0, 1, 2], dtype=mx.int32))
    elif kind == "idx_dtype":
        kw.update(state=pool, state_indices=mx.array([0, 1], dtype=mx.int64))
    elif kind == "idx_range":
        kw.update(state=pool, state_indices=mx.array([0, 4], dtype=mx.int32))
    elif kind == "idx_repeat":
        kw.update(state=pool, state_indices=mx.array([2, 2], dtype=mx.int32))
    elif kind == "idx_no_pool":
        kw.update(state=None, state_indices=mx.array([0, 1], dtype=mx.int32))
    elif kind == "rs_word":
        kw["return_states"] = "all"
    elif kind == "rs_zero":
        kw["return_states"] = 0
    elif kind == "rs_bool":
        kw["return_states"] = True
    elif kind == "rs_float":
        kw["return_states"] = 2.0
    elif kind == "rs_chunked_metal_unavailable":
        kw.update(return_states=2, backend="metal")
    return x, kw


BAD = {
    "cu_float": (TypeError, "cu_seqlens"), "cu_2d": (ValueError, "cu_seqlens"), "cu_start": (ValueError, "cu_seqlens"),
    "cu_decreasing": (ValueError, "cu_seqlens"), "cu_end": (ValueError, "cu_seqlens"),
    "cu_batch": (ValueError, "cu_seqlens"), "cu_list": (TypeError, "cu_seqlens"),
    "state_rows": (ValueError, "state"), "state_shape": (ValueError, "state"), "state_dtype": (TypeError, "state"),
    "idx_len": (ValueError, "state_indices"), "idx_dtype": (TypeError, "state_indices"),
    "idx_range": (ValueError, "state_indices"), "idx_repeat": (ValueError, "state_indices"),
    "idx_no_pool": (ValueError, "state_indices"), "rs_word": (ValueError, "return_states"),
    "rs_zero": (ValueError, "return_states"), "rs_bool": (TypeError, "return_states"),
    "rs_float": (TypeError, "return_states"), "rs_chunked_metal_unavailable": (ValueError, "backend"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
@pytest.mark.parametrize("fn", ["rule", "update"])
def test_bad_input_raises_before_launch(kind, fn, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("ran before the check")

    for name in ("ops", "metal", "cuda"):
        mod = backends.module(name)
        if mod is not None and hasattr(mod, "run_serving"):
            monkeypatch.setattr(mod, "run_serving", refuse)
    x, kw = _bad(kind)
    err, word = BAD[kind]
    state = kw.pop("state")
    with pytest.raises(err, match=word):
        if fn == "rule":
            mlx_gdn.gated_delta_rule(x.q, x.k, x.v, x.g, x.beta, state, **kw)
        else:
            mlx_gdn.gated_delta_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, state, **kw)


@pytest.mark.parametrize("Dk", [32, 64])
def test_metal_pool_decode_columns_in_fours(Dk, no_ops, monkeypatch):
    """The decode body's grouped-column layout (CUDA's 16-byte state moves) with a pool."""
    from mlx_gdn.metal import backend as metal

    monkeypatch.setattr(metal, "DECODE_VEC4", True)
    seed = fresh_seed()
    c = make_call(Case(lens=None, B=3, T=2, Dk=Dk, Dv=8, pool=6, masked=True), seed)
    with sim.simulated_metal():
        out = run_call(c, "metal", "recurrent")
    check_call(c, out, f"seed {seed}, Dk {Dk}")


@pytest.mark.parametrize("case", [
    Case(lens=(70, 0, 1, 9), pool=6, masked=True),
    Case(lens=(33, 4), Hk=2, Hv=4, fused=True, dtype=BF16),
    Case(lens=(20, 3), gate="key"),
], ids=lambda c: c.label())
def test_metal_packed_chunked_runs_per_sequence(case, no_ops, monkeypatch):
    """Packed sequences without return_states under "chunked" on a backend that cannot pack them
    into one launch pair (no `packs`, as CUDA): one plain call per sequence on the Metal kernels
    (chunked where they take the sequence), the pool's rows gathered and written back."""
    from mlx_gdn.metal import backend as metal

    monkeypatch.delattr(metal, "packs")
    algos = []
    real_run = metal.run
    monkeypatch.setattr(metal, "run", lambda *a, **k: algos.append(k["algorithm"]) or real_run(*a, **k))
    seed = fresh_seed()
    c = make_call(case, seed)
    with sim.simulated_metal():
        out = run_call(c, "metal", "chunked")
    check_call(c, out, f"seed {seed}, {case.label()}")
    # The Metal chunked kernels take scalar and per-key gates alike.
    expected = ["chunked"] * sum(n > 0 for n in case.lens)
    assert algos == expected, algos


def test_boundary_offsets_index_each_sequences_states():
    """return_states=C with cu_seqlens: sequence n's states are slots off[n] .. off[n+1] - 1, equal
    to the states of the same sequence run alone."""
    seed = fresh_seed()
    case = Case(lens=(9, 2, 0, 7), every=3)
    c = make_call(case, seed)
    _, _, states = run_call(c, "ops")
    off = serving.boundary_offsets(c.cu, 3)
    assert off.tolist() == [0, 3, 3, 3, 5], off
    cu = np.array(c.cu)
    x = c.x
    for n in range(case.N):
        a, b = int(cu[n]), int(cu[n + 1])
        _, _, alone = mlx_gdn.gated_delta_rule(x.q[:, a:b], x.k[:, a:b], x.v[:, a:b], x.g[:, a:b], x.beta[:, a:b],
                                               c.state[n : n + 1], return_states=3, backend="ops")
        got = np.array(states[0, int(off[n]) : int(off[n + 1])])
        assert np.allclose(got, np.array(alone[0]), rtol=1e-6, atol=1e-7), f"seed {seed}, sequence {n}"
    assert not np.array(states[0, 5:]).any()


def test_pooled_step_under_compile():
    """Under mx.compile nothing can be evaluated: the write-back stays lazy and the step still
    returns the same pool."""
    seed = fresh_seed()
    c = make_call(Case(lens=None, B=3, T=1, pool=6), seed)
    x = c.x

    def step(q, pool):
        return mlx_gdn.gated_delta_rule(q, x.k, x.v, x.g, x.beta, pool, state_indices=c.idx, check_values=False,
                                        backend="ops")

    y, pool = step(x.q, c.state)
    yc, poolc = mx.compile(step)(x.q, c.state)
    assert np.array_equal(np.array(pool), np.array(poolc)) and np.array_equal(np.array(y), np.array(yc)), f"seed {seed}"
    check_call(c, (yc, poolc), f"seed {seed}, compiled")


def test_plan_cache_tells_return_states_apart():
    """Calls that differ only in return_states (or in the pool's size) are planned apart."""
    x = random_inputs(1, 16, 1, 2, 32, 16, seed=fresh_seed())
    for C in (4, 8, 4, "steps"):
        _, _, states = mlx_gdn.gated_delta_rule(x.q, x.k, x.v, x.g, x.beta, return_states=C, backend="ops")
        assert states.shape[1] == (16 if C == "steps" else 16 // C), (C, states.shape)
    idx = mx.array([1], dtype=mx.int32)
    for S in (2, 5):
        _, pool = mlx_gdn.gated_delta_rule(x.q, x.k, x.v, x.g, x.beta, mx.zeros((S, 2, 16, 32)), state_indices=idx,
                                           backend="ops")
        assert pool.shape[0] == S


# return_states=C, C a multiple of the Metal chunk length (32), under "chunked": the chunked
# kernels save the state after every C // 32-th chunk. T not a multiple of C, C = chunk and
# 2 * chunk, GQA, masks, per-key gates, pools, packed sequences (boundaries within each).
CHUNK_STATES = [
    Case(lens=None, B=2, T=70, every=32, masked=True),
    Case(lens=None, B=1, T=140, Hk=2, Hv=4, every=64, dtype=BF16, pool=3),
    Case(lens=None, B=2, T=64, gate="key", every=32, pool=5, masked=True),
    Case(lens=None, B=1, T=96, gate="key", fused=True, fused_gate="key", every=32, dtype=BF16),
    Case(lens=(70, 0, 5, 40), every=32, pool=6, masked=True),
    Case(lens=(64, 33, 130), Hk=2, Hv=4, every=64, fused=True, dtype=BF16),
]


@pytest.mark.parametrize("case", CHUNK_STATES, ids=[c.label() for c in CHUNK_STATES])
def test_metal_chunk_states_on_chunked_kernels(case, no_ops, monkeypatch):
    """return_states=C on the Metal chunked kernels (sequence by sequence with cu_seqlens),
    against the float64 reference; the recurrent kernels take no sequence the chunked ones can."""
    from mlx_gdn.metal import backend as metal

    monkeypatch.setattr(backends, "chunked_from", lambda *a, **k: None)  # chunked at every length
    ran = []
    real_states, real_serving, real_packed = metal.run_states, metal.run_serving, metal.run_packed
    monkeypatch.setattr(metal, "run_states", lambda *a, **k: ran.append("chunked") or real_states(*a, **k))
    monkeypatch.setattr(metal, "run_serving", lambda *a, **k: ran.append("recurrent") or real_serving(*a, **k))
    monkeypatch.setattr(metal, "run_packed", lambda *a, **k: ran.append("packed") or real_packed(*a, **k))
    seed = fresh_seed()
    c = make_call(case, seed)
    with sim.simulated_metal():
        out = run_call(c, "metal", "chunked")
    check_call(c, out, f"seed {seed}, {case.label()}")
    assert ran == ["chunked" if case.lens is None else "packed"], ran


@pytest.mark.parametrize("case", [c for c in CHUNK_STATES if c.lens is not None], ids=lambda c: c.label())
def test_metal_chunk_states_per_sequence(case, no_ops, monkeypatch):
    """Packed return_states=C one sequence at a time (the route of a backend without `packs`):
    the chunked kernels for each sequence that reaches a boundary."""
    from mlx_gdn.metal import backend as metal

    monkeypatch.delattr(metal, "packs")
    monkeypatch.setattr(backends, "chunked_from", lambda *a, **k: None)
    ran = []
    real_states = metal.run_states
    monkeypatch.setattr(metal, "run_states", lambda *a, **k: ran.append("chunked") or real_states(*a, **k))
    seed = fresh_seed()
    c = make_call(case, seed)
    with sim.simulated_metal():
        out = run_call(c, "metal", "chunked")
    check_call(c, out, f"seed {seed}, {case.label()}")
    assert len(ran) == sum(n >= case.every for n in case.lens), ran


# Packed sequences in one launch pair of the Metal chunked kernels: empty and one-token sequences,
# lengths off the chunk length, pools with padding slots, GQA, masks, per-key and fused gates.
PACKED = [
    Case(lens=(70, 0, 1, 9), pool=6, masked=True),
    Case(lens=(33, 4), Hk=2, Hv=4, fused=True, dtype=BF16),
    Case(lens=(20, 3, 64), gate="key"),
    Case(lens=(5, 40, 0), gate="key", fused=True, fused_gate="key", pool=4, masked=True, dtype=BF16),
    Case(lens=(0, 0, 31), with_state=False),
    Case(lens=(96, 50, 32), every=32, pool=5),
]


@pytest.mark.parametrize("case", PACKED, ids=[c.label() for c in PACKED])
def test_metal_packed_one_launch_pair(case, no_ops, monkeypatch):
    """Packed sequences under "chunked" on Metal: one launch pair of the chunked kernels for all of
    them (no per-sequence calls), each sequence from its own (pool) row, against the reference."""
    from mlx_gdn.metal import backend as metal
    from mlx_gdn.metal import chunked

    launched = []
    real_launch = chunked._launch
    monkeypatch.setattr(chunked, "_launch", lambda spec, arrays: launched.append(spec.name) or real_launch(spec, arrays))
    monkeypatch.setattr(metal, "run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("a per-sequence call")))
    seed = fresh_seed()
    c = make_call(case, seed)
    with sim.simulated_metal():
        out = run_call(c, "metal", "chunked")
    check_call(c, out, f"seed {seed}, {case.label()}")
    assert len(launched) == 2 and all(n.endswith("_varlen") or "_varlen_" in n for n in launched), launched


def test_chunk_table():
    """Chunks start at each sequence's start, hold at most CHUNK tokens, never cross a sequence's
    end, and cover every token once, in order."""
    from mlx_gdn.metal.chunked import CHUNK, chunk_table

    rng = np.random.default_rng(fresh_seed())
    lens = rng.integers(0, 3 * CHUNK, size=7)
    lens[2] = 0
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    chunks, seq_chunks, seq_saved = chunk_table(cu, 2 * CHUNK)
    covered = np.concatenate([np.arange(a, b) for a, b in chunks]) if len(chunks) else np.zeros(0)
    assert np.array_equal(covered, np.arange(cu[-1])), (lens, chunks)
    for n in range(len(lens)):
        mine = chunks[seq_chunks[n] : seq_chunks[n + 1]]
        assert len(mine) == -(-lens[n] // CHUNK)
        if len(mine):
            assert mine[0, 0] == cu[n] and mine[-1, 1] == cu[n + 1] and (mine[:, 1] - mine[:, 0] <= CHUNK).all()
    assert seq_saved.tolist() == serving.boundary_offsets(cu, 2 * CHUNK).tolist()


def test_metal_chunk_states_routing():
    """Which kernels a return_states call runs on Metal: the chunked ones only for C a multiple
    of their chunk length under "chunked" (asked for, or chosen by "auto" from T)."""
    from mlx_gdn.metal import backend as metal
    from mlx_gdn.validate import check_rule, check_serving

    x = random_inputs(1, 64, 1, 2, 32, 16, seed=0)
    p = check_rule(x.q, x.k, x.v, x.g, x.beta, None, None)
    for rs, algo, want in ((32, "chunked", serving.CHUNKED_STATES), (64, "chunked", serving.CHUNKED_STATES),
                           (16, "chunked", "recurrent"), (48, "chunked", "recurrent"), ("steps", "chunked", "recurrent"),
                           (32, "recurrent", "recurrent")):
        s = check_serving(p, None, None, None, rs)
        assert metal.serving_algorithm(p, s, algo) == want, (rs, algo)
    with sim.simulated_metal():
        s = check_serving(p, None, None, None, 32)
        _, algo = backends.resolve_serving("metal", "auto", p, s)
        assert algo == (serving.CHUNKED_STATES if metal.choose_algorithm(p) == "chunked" else "recurrent")


# The same on the CUDA chunked kernels in the CUDA simulator (chunk length 64; Dk in 64..256).
CUDA_CHUNK_STATES = [
    Case(lens=None, B=1, T=140, Dk=64, Dv=64, every=64, masked=True, pool=3),
    Case(lens=None, B=1, T=130, Dk=64, Dv=64, every=128, dtype=BF16, fused=True),
    Case(lens=(70, 0, 130, 9), Dk=64, Dv=64, gate="key", every=64, pool=5),
]


@pytest.mark.parametrize("case", CUDA_CHUNK_STATES, ids=[c.label() for c in CUDA_CHUNK_STATES])
def test_cuda_sim_chunk_states_on_chunked_kernels(case, no_ops, monkeypatch):
    """return_states=C on the CUDA chunked kernels (SAVE_EVERY), in the CUDA simulator."""
    _check_cuda_chunk_states(case, monkeypatch, sim.simulated_cuda())


def _check_cuda_chunk_states(case, monkeypatch, context):
    """return_states=C of `case` through the CUDA chunked kernels (one call per sequence long
    enough for a boundary) against the float64 reference."""
    from mlx_gdn.cuda import backend as cuda

    monkeypatch.setattr(backends, "chunked_from", lambda *a, **k: None)
    ran = []
    real_states = cuda.run_states
    monkeypatch.setattr(cuda, "run_states", lambda *a, **k: ran.append("chunked") or real_states(*a, **k))
    seed = fresh_seed()
    c = make_call(case, seed)
    with context:
        out = run_call(c, "cuda", "chunked")
    check_call(c, out, f"seed {seed}, {case.label()}")
    lens = case.lens if case.lens is not None else (case.T,)
    assert len(ran) == (1 if case.lens is None else sum(n >= case.every for n in lens)), (ran, seed)


CUDA_GPU_CHUNK_STATES = [
    Case(lens=None, B=2, T=300, Hk=2, Hv=4, Dk=128, Dv=128, dtype=BF16, every=64, pool=5, fused=True, masked=True),
    Case(lens=None, B=1, T=260, Hk=2, Hv=4, Dk=128, Dv=128, every=64),
    Case(lens=(200, 0, 1, 140), Hk=2, Hv=4, Dk=128, Dv=128, every=128, gate="key", dtype=BF16),
]


@pytest.mark.cuda
@pytest.mark.skipif(not _has_cuda(), reason="needs MLX with a CUDA device")
@pytest.mark.parametrize("case", CUDA_GPU_CHUNK_STATES, ids=[c.label() for c in CUDA_GPU_CHUNK_STATES])
def test_cuda_chunk_states_on_chunked_kernels(case, no_ops, monkeypatch):
    """return_states=C on the GPU's chunked kernels at a real layer's head size."""
    _check_cuda_chunk_states(case, monkeypatch, contextlib.nullcontext())


def test_auto_tries_a_serving_route_once_and_falls_back_with_one_warning(monkeypatch):
    """Under backend="auto" a kernel serving route is tried once on a small call of the same kind
    against the float64 reference; a route that fails (here: its launch raises, as a compiler's
    rejection would) warns once, naming the kernels, and the ops backend answers instead, right."""
    from mlx_gdn import fallback
    from mlx_gdn.metal import backend as metal

    seed = fresh_seed()
    c = make_call(Case(lens=None, B=2, T=5, Dk=32, Dv=32, pool=4), seed)
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("metal: planted compile failure")

    fallback.clear()
    monkeypatch.setattr(metal, "run_serving", broken)
    with sim.simulated_metal():
        with pytest.warns(RuntimeWarning, match="serving call.*planted compile failure") as rec:
            first = run_call(c, "auto", "auto")
            second = run_call(c, "auto", "auto")
    assert sum("serving call" in str(r.message) for r in rec) == 1, [str(r.message) for r in rec]
    assert len(calls) == 1, f"the failing route was tried {len(calls)} times (seed {seed})"
    for out in (first, second):
        check_call(c, out, f"seed {seed}")
    fallback.clear()
