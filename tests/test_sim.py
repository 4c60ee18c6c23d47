"""Tests of the CPU Metal simulator with small kernels whose answers are known."""

import uuid

import mlx.core as mx
import numpy as np
import pytest

from mlx_gdn import sim
from mlx_gdn.testing import fresh_seed
from mlx_gdn.sim import (
    SimCompileError,
    SimKernelError,
    SimOutOfBoundsError,
    metal_kernel,
    simulated_metal,
)

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _fresh_rng():
    # Fresh inputs per test; the seed is reported with a failure (tests/conftest.py).
    global RNG
    RNG = np.random.default_rng(fresh_seed())
    yield


def rand(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def run1(source, inputs, out_shape, grid, tg, *, names=None, out_dtype=mx.float32, header="", **kw):
    if names is None:
        names = ["x"] if len(inputs) == 1 else [f"in{i}" for i in range(len(inputs))]
    k = metal_kernel(name="t", input_names=names, output_names=["out"], source=source, header=header)
    return k(
        inputs=inputs,
        grid=grid,
        threadgroup=tg,
        output_shapes=[out_shape],
        output_dtypes=[out_dtype],
        **kw,
    )[0]


# ---------------------------------------------------------------- basics


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_mlx_docstring_exp_elementwise(dtype):
    # The example from mx.fast.metal_kernel's docstring, through the patched entry point.
    def exp_elementwise(a: mx.array):
        source = """
            uint elem = thread_position_in_grid.x;
            T tmp = inp[elem];
            out[elem] = metal::exp(tmp);
        """
        kernel = mx.fast.metal_kernel(name="myexp", input_names=["inp"], output_names=["out"], source=source)
        return kernel(
            inputs=[a],
            template=[("T", dtype)],
            grid=(a.size, 1, 1),
            threadgroup=(256, 1, 1),
            output_shapes=[a.shape],
            output_dtypes=[a.dtype],
        )[0]

    with simulated_metal():
        a = mx.array(rand(4, 16)).astype(dtype)
        b = exp_elementwise(a)
    assert b.dtype == dtype
    tol = 1e-6 if dtype == mx.float32 else 1e-3
    np.testing.assert_allclose(np.array(b, np.float32), np.exp(np.array(a, np.float32)), rtol=tol * 4, atol=tol)


def test_positions_partial_threadgroups_3d():
    # Grid not a multiple of the threadgroup: edge groups are smaller, as with dispatchThreads.
    src = """
        uint3 g = thread_position_in_grid;
        uint i = (g.z * threads_per_grid.y + g.y) * threads_per_grid.x + g.x;
        out[i * 4 + 0] = threadgroup_position_in_grid.x * 1000 + thread_position_in_threadgroup.x;
        out[i * 4 + 1] = threads_per_threadgroup.x * 100 + threads_per_threadgroup.y * 10 + threads_per_threadgroup.z;
        out[i * 4 + 2] = thread_index_in_threadgroup;
        out[i * 4 + 3] = threadgroups_per_grid.x * 100 + threadgroups_per_grid.y * 10 + threadgroups_per_grid.z;
    """
    grid, tg = (10, 3, 2), (4, 2, 1)
    out = np.array(run1(src, [], (grid[2] * grid[1] * grid[0] * 4,), grid, tg, names=[], out_dtype=mx.int32))
    out = out.reshape(grid[2], grid[1], grid[0], 4)
    for z in range(grid[2]):
        for y in range(grid[1]):
            for x in range(grid[0]):
                sx = min(tg[0], grid[0] - (x // tg[0]) * tg[0])
                sy = min(tg[1], grid[1] - (y // tg[1]) * tg[1])
                assert out[z, y, x, 0] == (x // tg[0]) * 1000 + x % tg[0]
                assert out[z, y, x, 1] == sx * 100 + sy * 10 + 1
                assert out[z, y, x, 2] == (y % tg[1]) * sx + x % tg[0]
                assert out[z, y, x, 3] == 3 * 100 + 2 * 10 + 2


def test_template_int_bool_typename_scalars_and_shape():
    src = """
        uint i = thread_position_in_grid.x;
        if (i >= uint(x_shape[0] * x_shape[1])) return;
        T v = x[i] * T(SCALE);
        if (NEG) v = -v;
        out[i] = float(v) * alpha + float(n) + float(x_ndim) + float(x_strides[0]);
    """
    k = metal_kernel(name="tmpl", input_names=["x", "alpha", "n"], output_names=["out"], source=src)
    x = rand(3, 5)
    for dt, npdt, tol in [(mx.float32, np.float32, 1e-6), (mx.float16, np.float16, 2e-3)]:
        (o,) = k(
            inputs=[mx.array(x).astype(dt), 0.5, 7],
            template=[("T", dt), ("SCALE", 3), ("NEG", True)],
            grid=(32, 1, 1),
            threadgroup=(32, 1, 1),
            output_shapes=[(15,)],
            output_dtypes=[mx.float32],
            init_value=-1.0,
        )
        xv = x.astype(npdt).astype(np.float32).ravel()
        exp = -(xv * 3) * 0.5 + 7 + 2 + 5
        np.testing.assert_allclose(np.array(o), exp, rtol=tol, atol=tol)


def test_signature_mentions_only_used_shape_params(capsys):
    k = metal_kernel(name="sig", input_names=["a", "b"], output_names=["out"],
                     source="out[0] = a[0] + float(b_ndim) + (float)b_shape[0];")
    k(inputs=[mx.zeros((2,)), mx.zeros((3,))], grid=(1, 1, 1), threadgroup=(1, 1, 1),
      output_shapes=[(1,)], output_dtypes=[mx.float32], verbose=True)
    gen = capsys.readouterr().out
    assert "Generated source code for `sig`" in gen
    assert "b_shape" in gen and "b_ndim" in gen
    assert "a_shape" not in gen and "b_strides" not in gen and "a_strides" not in gen


# ---------------------------------------------------------------- simd collectives


def test_simd_sum_max_min():
    src = """
        uint i = thread_position_in_grid.x;
        float v = x[i];
        out[3 * i + 0] = simd_sum(v);
        out[3 * i + 1] = simd_max(v);
        out[3 * i + 2] = simd_min(v);
    """
    x = rand(256)
    o = np.array(run1(src, [mx.array(x)], (3 * 256,), (256, 1, 1), (128, 1, 1))).reshape(8, 32, 3)
    g = x.reshape(8, 32)
    np.testing.assert_allclose(o[..., 0], np.repeat(g.sum(1, keepdims=True), 32, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(o[..., 1], np.repeat(g.max(1, keepdims=True), 32, 1))
    np.testing.assert_array_equal(o[..., 2], np.repeat(g.min(1, keepdims=True), 32, 1))


def test_shuffle_xor_butterfly_int():
    src = """
        uint i = thread_position_in_grid.x;
        int v = x[i];
        for (ushort m = 16; m > 0; m >>= 1) v += simd_shuffle_xor(v, m);
        out[i] = v;
    """
    x = RNG.integers(-1000, 1000, 128).astype(np.int32)
    o = np.array(run1(src, [mx.array(x)], (128,), (128, 1, 1), (64, 1, 1), out_dtype=mx.int32))
    np.testing.assert_array_equal(o, np.repeat(x.reshape(4, 32).sum(1), 32))


def test_shuffle_up_down_broadcast_prefix():
    src = """
        uint i = thread_position_in_grid.x;
        uint lane = thread_index_in_simdgroup;
        float v = x[i];
        out[6 * i + 0] = simd_shuffle_up(v, 3);
        out[6 * i + 1] = simd_shuffle_down(v, 5);
        out[6 * i + 2] = simd_broadcast(v, 7);
        out[6 * i + 3] = simd_prefix_inclusive_sum(v);
        out[6 * i + 4] = simd_prefix_exclusive_sum(v);
        out[6 * i + 5] = simd_shuffle(v, (lane * 7) % 32);
    """
    x = rand(64)
    o = np.array(run1(src, [mx.array(x)], (6 * 64,), (64, 1, 1), (64, 1, 1))).reshape(2, 32, 6)
    g = x.reshape(2, 32)
    lane = np.arange(32)
    np.testing.assert_array_equal(o[..., 0], np.where(lane >= 3, g[:, np.maximum(lane - 3, 0)], g))
    np.testing.assert_array_equal(o[..., 1], np.where(lane + 5 < 32, g[:, np.minimum(lane + 5, 31)], g))
    np.testing.assert_array_equal(o[..., 2], np.repeat(g[:, 7:8], 32, 1))
    np.testing.assert_allclose(o[..., 3], np.cumsum(g, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(o[..., 4], np.cumsum(g, 1) - g, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(o[..., 5], g[:, (lane * 7) % 32])


def test_early_returning_lanes_leave_collectives():
    src = """
        uint lane = thread_index_in_simdgroup;
        uint i = thread_position_in_grid.x;
        if (lane >= 20) return;
        float s = simd_sum(1.0f);
        float m = simd_max(float(lane));
        bool a = simd_all(lane < 20);
        out[i] = s * 100 + m + (a ? 0.5f : 0.0f);
    """
    o = np.array(run1(src, [], (64,), (64, 1, 1), (32, 1, 1), names=[])).reshape(2, 32)
    np.testing.assert_array_equal(o[:, :20], 20 * 100 + 19 + 0.5)
    assert np.isnan(o[:, 20:]).all()  # never written: still poisoned


def test_lanes_wait_for_each_other_at_collectives():
    # Each lane writes device memory, then a collective; after it every lane
    # must see every other lane's write (impossible if lanes ran one by one).
    src = """
        uint i = thread_position_in_grid.x;
        uint lane = thread_index_in_simdgroup;
        scratch[i] = x[i];
        simdgroup_barrier(mem_flags::mem_none);
        float s = 0;
        for (uint j = 0; j < 32; ++j) s += scratch[i - lane + j];
        float t = simd_sum(0.0f);
        out[i] = s + t;
    """
    k = metal_kernel(name="order", input_names=["x"], output_names=["out", "scratch"], source=src)
    x = rand(64)
    o, _ = k(inputs=[mx.array(x)], grid=(64, 1, 1), threadgroup=(64, 1, 1),
             output_shapes=[(64,), (64,)], output_dtypes=[mx.float32, mx.float32])
    np.testing.assert_allclose(np.array(o), np.repeat(x.reshape(2, 32).sum(1), 32), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- threadgroup memory


def test_threadgroup_reverse_across_simdgroups():
    src = """
        uint t = thread_index_in_threadgroup;
        uint base = threadgroup_position_in_grid.x * 128;
        threadgroup float buf[128];
        buf[t] = x[base + t];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        float r = buf[127 - t];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        buf[t] = r * 2.0f;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[base + t] = buf[(t + 32) % 128];
    """
    x = rand(3 * 128)
    o = np.array(run1(src, [mx.array(x)], (384,), (384, 1, 1), (128, 1, 1))).reshape(3, 128)
    rev = x.reshape(3, 128)[:, ::-1] * 2
    np.testing.assert_array_equal(o, rev[:, (np.arange(128) + 32) % 128])


def test_threadgroup_array_shared_pointer_per_thread():
    # MLX kernels offset a threadgroup pointer per simdgroup: the pointer is a
    # per-thread variable while the array behind it is shared.
    src = """
        uint lane = thread_index_in_simdgroup;
        uint sg = simdgroup_index_in_threadgroup;
        threadgroup float shared_buf[4 * 32];
        threadgroup float* mine = shared_buf + sg * 32;
        mine[lane] = float(sg * 1000 + lane);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[thread_position_in_grid.x] = shared_buf[(thread_index_in_threadgroup + 32) % 128] + mine[31 - lane] * 0.0001f;
    """
    o = np.array(run1(src, [], (256,), (256, 1, 1), (128, 1, 1), names=[])).reshape(2, 128)
    t = np.arange(128)
    other = ((t + 32) % 128) // 32 * 1000 + (t + 32) % 32
    mine = (t // 32) * 1000 + (31 - t % 32)
    np.testing.assert_allclose(o, np.broadcast_to(other + mine * 0.0001, (2, 128)), rtol=1e-6)


# ---------------------------------------------------------------- simdgroup matrices


def test_simdgroup_matrix_product_and_layout():
    src = """
        uint lane = thread_index_in_simdgroup;
        simdgroup_float8x8 A, B, C, D;
        simdgroup_load(A, a, 8);
        simdgroup_load(B, b, 8, ulong2(0, 0), true);
        C = make_filled_simdgroup_matrix<float, 8, 8>(1.5f);
        simdgroup_multiply_accumulate(D, A, B, C);
        simdgroup_store(D, out, 8);
        simdgroup_multiply(D, A, A);
        simdgroup_store(D, out + 64, 8);
        auto e = A.thread_elements();
        lay[2 * lane] = e[0];
        lay[2 * lane + 1] = e[1];
    """
    k = metal_kernel(name="mma", input_names=["a", "b"], output_names=["out", "lay"], source=src)
    a, b = rand(8, 8), rand(8, 8)
    o, lay = k(inputs=[mx.array(a), mx.array(b)], grid=(32, 1, 1), threadgroup=(32, 1, 1),
               output_shapes=[(128,), (64,)], output_dtypes=[mx.float32, mx.float32])
    o = np.array(o)
    np.testing.assert_allclose(o[:64].reshape(8, 8), a @ b.T + 1.5, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(o[64:].reshape(8, 8), a @ a, rtol=1e-5, atol=1e-5)
    lane = np.arange(32)
    qid = lane // 4
    fm = (qid & 4) + (lane // 2) % 4
    fn = (qid & 2) * 2 + (lane % 2) * 2
    lay = np.array(lay).reshape(32, 2)
    np.testing.assert_array_equal(lay[:, 0], a[fm, fn])
    np.testing.assert_array_equal(lay[:, 1], a[fm, fn + 1])


# ---------------------------------------------------------------- types


def test_half_and_bfloat16_round_trips():
    src = """
        uint i = thread_position_in_grid.x;
        float f = x[i];
        oh[i] = half(f);
        ob[i] = bfloat16_t(f);
        of[i] = float(bfloat16_t(f));
        ib[i] = xb[i] * bfloat16_t(2.0f);
    """
    k = metal_kernel(name="rt", input_names=["x", "xb"], output_names=["oh", "ob", "of", "ib"], source=src)
    x = rand(256) * 100
    x[:4] = [np.inf, -np.inf, 65504.0, 1e-8]
    xb = mx.array(x).astype(mx.bfloat16)
    oh, ob, of, ib = k(inputs=[mx.array(x), xb], grid=(256, 1, 1), threadgroup=(64, 1, 1),
                       output_shapes=[(256,)] * 4,
                       output_dtypes=[mx.float16, mx.bfloat16, mx.float32, mx.bfloat16])
    assert oh.dtype == mx.float16 and ob.dtype == mx.bfloat16
    np.testing.assert_array_equal(np.array(oh), x.astype(np.float16))
    ref_b = mx.array(x).astype(mx.bfloat16)  # MLX rounds to nearest even
    np.testing.assert_array_equal(np.array(ob.view(mx.uint16)), np.array(ref_b.view(mx.uint16)))
    np.testing.assert_array_equal(np.array(of), np.array(ref_b.astype(mx.float32)))
    np.testing.assert_array_equal(np.array(ib.astype(mx.float32)), np.array((xb * 2).astype(mx.float32)))


def test_vector_types_and_math():
    src = """
        uint i = thread_position_in_grid.x;
        float4 v = float4(x[4 * i], x[4 * i + 1], x[4 * i + 2], x[4 * i + 3]);
        float4 w = v * 2.0f + 1.0f;
        half4 h = half4(w);
        out[i] = dot(w, float4(1.0f)) + float(h.w) * 0.0f + metal::precise::exp(0.0f) + fast::max(v.x, v.y) - max(v.x, v.y)
                 + clamp(v.z, -1.0f, 1.0f) - metal::min(metal::max(v.z, -1.0f), 1.0f) + select(0.0f, 1.0f, isnan(v.x))
                 + rsqrt(4.0f) + as_type<float>(as_type<uint>(1.0f)) + simd_sum(float2(1.0f, 2.0f)).y;
    """
    x = rand(32 * 4)
    o = np.array(run1(src, [mx.array(x)], (32,), (32, 1, 1), (32, 1, 1)))
    exp = (x.reshape(32, 4) * 2 + 1).sum(1) + 1 + 0.5 + 1 + 64
    np.testing.assert_allclose(o, exp, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- instrument behaviour


def test_out_of_bounds_read_and_write_named():
    read = "uint i = thread_position_in_grid.x; out[i] = inp[i + 1];"
    with pytest.raises(SimOutOfBoundsError, match=r"kernel 'oobr'.*read of buffer 'inp' at index 16"):
        metal_kernel(name="oobr", input_names=["inp"], output_names=["out"], source=read)(
            inputs=[mx.zeros((16,))], grid=(16, 1, 1), threadgroup=(16, 1, 1),
            output_shapes=[(16,)], output_dtypes=[mx.float32])
    write = """
        uint i = thread_position_in_grid.x;
        device float* p = out + 8;
        p[i] = 1.0f;
    """
    with pytest.raises(SimOutOfBoundsError, match=r"kernel 'oobw'.*buffer 'out' at index 16"):
        metal_kernel(name="oobw", input_names=[], output_names=["out"], source=write)(
            inputs=[], grid=(16, 1, 1), threadgroup=(16, 1, 1),
            output_shapes=[(16,)], output_dtypes=[mx.float32])
    neg = "uint i = thread_position_in_grid.x; out[i] = inp[int(i) - 1];"
    with pytest.raises(IndexError, match=r"'inp' at index -1"):
        metal_kernel(name="oobn", input_names=["inp"], output_names=["out"], source=neg)(
            inputs=[mx.zeros((4,))], grid=(4, 1, 1), threadgroup=(4, 1, 1),
            output_shapes=[(4,)], output_dtypes=[mx.float32])


def test_unwritten_outputs_are_poisoned_unless_init_value():
    src = "uint i = thread_position_in_grid.x; if (i % 2 == 0) { out[i] = 1.0f; iout[i] = 1; }"
    k = metal_kernel(name="poison", input_names=[], output_names=["out", "iout"], source=src)
    o, io = k(inputs=[], grid=(8, 1, 1), threadgroup=(8, 1, 1), output_shapes=[(8,), (8,)],
              output_dtypes=[mx.float32, mx.int32])
    o, io = np.array(o), np.array(io)
    assert (o[::2] == 1).all() and np.isnan(o[1::2]).all()
    assert (io[1::2] == np.frombuffer(bytes([sim.INT_POISON_BYTE] * 4), np.int32)[0]).all()
    o, io = k(inputs=[], grid=(8, 1, 1), threadgroup=(8, 1, 1), output_shapes=[(8,), (8,)],
              output_dtypes=[mx.float32, mx.int32], init_value=0.0)
    np.testing.assert_array_equal(np.array(o), np.tile([1.0, 0.0], 4))
    np.testing.assert_array_equal(np.array(io), np.tile([1, 0], 4))


def test_compile_error_carries_compiler_message():
    k = metal_kernel(name="broken", input_names=[], output_names=["out"],
                     source="out[0] = undefined_symbol_xyz + 1;")
    with pytest.raises(SimCompileError, match=r"(?s)'broken'.*undefined_symbol_xyz"):
        k(inputs=[], grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=[(1,)], output_dtypes=[mx.float32])


def test_divergent_collectives_are_reported():
    src = """
        uint lane = thread_index_in_simdgroup;
        float v = lane < 16 ? simd_sum(1.0f) : simd_max(1.0f);
        out[lane] = v;
    """
    with pytest.raises(SimKernelError, match="divergent"):
        run1(src, [], (32,), (32, 1, 1), (32, 1, 1), names=[])


def test_cache_reuse(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_GDN_SIM_CACHE", str(tmp_path))
    src = f"/* {uuid.uuid4().hex} */ out[thread_position_in_grid.x] = 2.0f;"
    before = dict(sim.STATS)

    def go():
        k = metal_kernel(name="cache", input_names=[], output_names=["out"], source=src)
        return k(inputs=[], grid=(4, 1, 1), threadgroup=(4, 1, 1), output_shapes=[(4,)], output_dtypes=[mx.float32])[0]

    go()
    assert sim.STATS["compiles"] == before["compiles"] + 1
    assert list(tmp_path.glob("msim_*.so"))
    np.testing.assert_array_equal(np.array(go()), 2.0)
    assert sim.STATS["compiles"] == before["compiles"] + 1
    assert sim.STATS["memory_hits"] > before["memory_hits"]


def test_simulated_metal_restores_and_nests():
    orig = mx.fast.metal_kernel
    assert not sim.active()
    with simulated_metal():
        assert sim.active() and mx.fast.metal_kernel is metal_kernel
        with simulated_metal():
            assert sim.active()
        assert sim.active() and mx.fast.metal_kernel is metal_kernel
    assert not sim.active() and mx.fast.metal_kernel is orig
    with pytest.raises(ZeroDivisionError):
        with simulated_metal():
            1 / 0
    assert not sim.active() and mx.fast.metal_kernel is orig


def test_bitwise_votes_rotate_and_threads(monkeypatch):
    # Several OS threads over threadgroups must give the same answers.
    monkeypatch.setenv("MLX_GDN_SIM_THREADS", "2")
    src = """
        uint i = thread_position_in_grid.x;
        uint lane = thread_index_in_simdgroup;
        uint v = x[i];
        out[5 * i + 0] = simd_and(v);
        out[5 * i + 1] = simd_or(v);
        out[5 * i + 2] = simd_xor(v);
        out[5 * i + 3] = simd_shuffle_rotate_down(v, 3);
        out[5 * i + 4] = (simd_any(v == 7u) ? 1u : 0u) + (simd_all(v < 1024u) ? 2u : 0u) + (simd_is_first() ? 4u : 0u);
    """
    x = RNG.integers(0, 1024, 32 * 16).astype(np.uint32)
    x[5] = 7
    o = np.array(run1(src, [mx.array(x)], (5 * 512,), (512, 1, 1), (32, 1, 1), out_dtype=mx.uint32)).reshape(16, 32, 5)
    g = x.reshape(16, 32)
    np.testing.assert_array_equal(o[..., 0], np.repeat(np.bitwise_and.reduce(g, 1)[:, None], 32, 1))
    np.testing.assert_array_equal(o[..., 1], np.repeat(np.bitwise_or.reduce(g, 1)[:, None], 32, 1))
    np.testing.assert_array_equal(o[..., 2], np.repeat(np.bitwise_xor.reduce(g, 1)[:, None], 32, 1))
    np.testing.assert_array_equal(o[..., 3], g[:, (np.arange(32) + 3) % 32])
    anyv = (g == 7).any(1)[:, None].astype(np.uint32)
    np.testing.assert_array_equal(o[..., 4], anyv + 2 + 4 * (np.arange(32) == 0))


def test_device_pointer_casts_and_vector_loads():
    src = """
        uint i = thread_position_in_grid.x;
        const device float4* x4 = (const device float4*)x;
        device float2* o2 = reinterpret_cast<device float2*>(out);
        float4 v = x4[i];
        o2[2 * i] = float2(v.x + v.y, v.z + v.w);
        o2[2 * i + 1] = float2(v.x * 2.0h, v.w);
    """
    x = rand(8 * 4)
    o = np.array(run1(src, [mx.array(x)], (32,), (8, 1, 1), (8, 1, 1))).reshape(8, 4)
    g = x.reshape(8, 4)
    np.testing.assert_allclose(o[:, 0], g[:, 0] + g[:, 1], rtol=1e-6)
    np.testing.assert_allclose(o[:, 1], g[:, 2] + g[:, 3], rtol=1e-6)
    np.testing.assert_allclose(o[:, 2], g[:, 0] * 2, rtol=1e-6)
    np.testing.assert_array_equal(o[:, 3], g[:, 3])


def test_ensure_row_contiguous_false_passes_the_real_layout():
    """Like MLX, a non-contiguous input keeps its buffer and strides when contiguity is not forced."""
    base = mx.array(RNG.standard_normal((6, 10)).astype(np.float32))
    view = base.T[::2]  # shape (5, 6), strides (2, 10)
    flat_read = "uint i = thread_position_in_grid.x; out[i] = inp[i];"
    strided_read = (
        "uint i = thread_position_in_grid.x; uint r = i / inp_shape[1], c = i % inp_shape[1];"
        "out[i] = inp[r * inp_strides[0] + c * inp_strides[1]];"
    )
    run = lambda body, erc: sim.metal_kernel("layout", ["inp"], ["out"], body, ensure_row_contiguous=erc)(  # noqa: E731
        inputs=[view], grid=(30, 1, 1), threadgroup=(30, 1, 1), output_shapes=[(30,)], output_dtypes=[mx.float32]
    )[0]
    want = np.array(view).reshape(-1)
    np.testing.assert_array_equal(np.array(run(strided_read, False)), want)
    np.testing.assert_array_equal(np.array(run(flat_read, True)), want)
    # Ignoring the strides reads the underlying buffer in order, as on a GPU.
    got = np.array(run(flat_read, False))
    np.testing.assert_array_equal(got, np.array(base).reshape(-1)[:30])
    assert not np.array_equal(got, want)


def test_threadgroup_memory_beyond_apple_limit_is_refused():
    """32 KiB is all an Apple GPU threadgroup has: a body that declares more must not pass here."""
    fits = """
        uint t = thread_index_in_threadgroup;
        threadgroup float a[4096];
        threadgroup float b[4096];
        a[t] = x[t]; b[t] = 2.0f * x[t];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[t] = a[t] + b[t];
    """
    x = rand(32)
    o = np.array(run1(fits, [mx.array(x)], (32,), (32, 1, 1), (32, 1, 1)))
    np.testing.assert_allclose(o, 3 * x, rtol=1e-6)
    too_big = fits.replace("threadgroup float b[4096];", "threadgroup float b[4096];\n threadgroup float c[1];\n c[0] = 0.0f;")
    with pytest.raises(SimKernelError, match="threadgroup memory of 32772 bytes exceeds"):
        run1(too_big, [mx.array(x)], (32,), (32, 1, 1), (32, 1, 1))
