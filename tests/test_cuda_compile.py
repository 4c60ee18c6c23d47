"""Compile the CUDA kernels offline, the way MLX builds them, with nvcc.

For each variant the CUDA launcher can produce, the test writes the translation unit that
`mx.fast.cuda_kernel` would compile (MLX's includes, the header, the generated signature with
`*_shape` parameters and template constants, the body inside namespace mlx::core::cu) and
compiles it for sm_90a with `nvcc -c`. Variants are grouped into two translation units,
compiled in parallel. Skipped where nvcc is absent; no GPU needed.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import mlx.core as mx

from mlx_gdn import launch
from mlx_gdn.cuda import chunked as cuda_chunked
from mlx_gdn.cuda import kernel as cuda
from mlx_gdn.launch import compact
from mlx_gdn.validate import Problem, Serving

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found")

# What MLX's default header provides (mlx/backend/cuda/device/utils.cuh and cooperative groups):
# the half types, cuda::std::array, and Shape / Strides in mlx::core::cu.
MLX_HEADER = """#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda/std/array>
#include <cuda/std/limits>
#include <cooperative_groups.h>
#include <cstdint>
namespace mlx::core::cu {
using Shape = cuda::std::array<int32_t, 10>;
using Strides = cuda::std::array<int64_t, 10>;
}
"""

DIMS = [(64, 64), (128, 128), (192, 256), (256, 192)]
DTYPES = [mx.bfloat16, mx.float32, mx.float16]


def _nvcc(src: str, workdir: Path, name: str):
    path = workdir / f"{name}.cu"
    path.write_text(src)
    cmd = [NVCC, "-c", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", str(path), "-o", str(path.with_suffix(".o"))]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _undefine(spec) -> str:
    # One translation unit holds many variants: each one's macros must not leak into the next.
    return "".join(f"#undef {name}\n" for name, _ in spec.defines)


def _recurrent_tu() -> str:
    parts = [MLX_HEADER, cuda.source_text(cuda.PRELUDE)]
    i = 0
    for path in ("decode", "prefill"):
        rule = [(False, key, masked, False, False, False) for key, masked in itertools.product((False, True), repeat=2)]
        upd = [(True, False, m, lo, ng, False) for m, lo, ng in itertools.product((False, True), repeat=3)]
        # fused per-key gates (a [B,T,Hv,Dk]), dt_bias per key column (GDN_DT_KEY) or per head
        upd_key = [(True, True, m, lo, ng, dk) for m, lo, ng, dk in
                   ((False, True, False, True), (True, False, True, True), (True, True, True, False), (False, False, False, False))]
        for fused, key, masked, lower, neg, dt_key in rule + upd + upd_key:
            Dk, Dv = DIMS[i % len(DIMS)]
            dt = DTYPES[i % len(DTYPES)]
            T = 1 if path == "decode" else 64
            p = Problem(2, T, 2, 4, Dk, Dv, dt, "key" if key else "scalar", masked, fused)
            # decode: CUDA's grouped columns (16-byte state moves) and, every other variant, the
            # element-wise layout it falls back to
            spec = launch.recurrent_spec(p, lower=lower, neg=neg, path=path, vec4=i % 2 == 0, dt_key=dt_key)
            ndim = {"q": 4, "k": 4, "v": 4, "state_in": 4, "mask": 2, "g": 4 if key else 3, "beta": 3,
                    "a": 4 if key else 3, "b": 3, "A_log": 1, "dt_bias": 2 if dt_key else 1, "lower_bound": 1}
            dtypes = {"state_in": mx.float32, "mask": mx.bool_, "lower_bound": mx.float32, "A_log": mx.float32,
                      "dt_bias": mx.float32, "beta": mx.float32}
            inputs = [(n, dtypes.get(n, dt), ndim[n]) for n in spec.input_names]
            outputs = list(zip(spec.output_names, spec.output_dtypes))
            header = _undefine(spec) + compact(spec.header())
            parts.append(cuda.kernel_text(f"custom_kernel_{spec.name}_{i}", header, compact(spec.source()), inputs, outputs,
                                          list(spec.template)))
            i += 1
    parts += _serving_variants(i)
    return "".join(parts)


# Serving variants of the recurrent bodies (GDN_POOL, GDN_VARLEN, GDN_STEPS):
# (path, fused, key gate, masked, pooled, packed, every)
SERVING = [
    ("decode", False, False, False, True, False, 0),
    ("decode", True, False, True, True, False, 0),
    ("prefill", False, True, True, True, True, 1),
    ("prefill", True, False, False, False, True, 64),
    ("prefill", False, False, True, True, False, 16),
    ("prefill", True, False, True, True, True, 0),
]


def _serving_variants(i0: int) -> list:
    parts = []
    for i, (path, fused, key, masked, pooled, packed, every) in enumerate(SERVING, start=i0):
        Dk, Dv = DIMS[i % len(DIMS)]
        dt = DTYPES[i % len(DTYPES)]
        T = 1 if path == "decode" else 256
        B = 1 if packed else 2
        p = Problem(B, T, 2, 4, Dk, Dv, dt, "key" if key else "scalar", masked, fused)
        N = 3 if packed else B
        s = Serving(N, packed, pooled, 8 if pooled else N, every, (T if every == 1 else T // every) if every else 0)
        spec = launch.recurrent_spec(p, path=path, vec4=path == "decode", serve=s)
        ndim = {"q": 4, "k": 4, "v": 4, "state_in": 4, "mask": 2, "g": 4 if key else 3, "beta": 3, "a": 3, "b": 3,
                "A_log": 1, "dt_bias": 1, "state_idx": 1, "cu_seqlens": 1}
        dtypes = {"state_in": mx.float32, "mask": mx.bool_, "A_log": mx.float32, "dt_bias": mx.float32,
                  "beta": mx.float32, "state_idx": mx.int32, "cu_seqlens": mx.int32}
        inputs = [(n, dtypes.get(n, dt), ndim[n]) for n in spec.input_names]
        outputs = list(zip(spec.output_names, spec.output_dtypes))
        header = _undefine(spec) + compact(spec.header())
        parts.append(cuda.kernel_text(f"custom_kernel_{spec.name}_{i}", header, compact(spec.source()), inputs, outputs,
                                      list(spec.template)))
    return parts


def _chunked_tu() -> str:
    parts = [MLX_HEADER, cuda_chunked.header()]
    prep_cases = [  # dtype, Dk, Dv, fused, masked, lower, neg
        (mx.bfloat16, 128, 128, False, False, False, False),
        (mx.float32, 256, 192, True, True, True, True),
        (mx.float16, 64, 256, True, True, False, False),
    ]
    for i, (dt, Dk, Dv, fused, masked, lower, neg) in enumerate(prep_cases):
        exact = dt == mx.float32
        ot = mx.float32 if exact else mx.bfloat16
        inputs = [("q", dt, 4), ("k", dt, 4), ("v", dt, 4), ("gate_a", dt, 3), ("gate_b", mx.float32, 3),
                  ("A_log", mx.float32, 1), ("dt_bias", mx.float32, 1), ("lower_bound", mx.float32, 1),
                  ("mask", mx.bool_ if masked else mx.float32, 2 if masked else 1)]
        outputs = list(zip(cuda_chunked.KKT_WY_OUTPUTS, (ot, ot, ot, mx.float32)))
        template = [("Dk", Dk), ("Dv", Dv), ("EXACT", exact), ("FUSED", fused), ("MASKED", masked),
                    ("HAS_LB", lower), ("NEG", neg)]
        parts.append(cuda.kernel_text(f"custom_kernel_prep_{i}", "", cuda.source_text("chunked/kkt_solve_wy.cu"), inputs, outputs, template))
    state_cases = [  # dtype, Dk, Dv, masked, B (B=4 takes 128-row slices on 8 warps)
        (mx.bfloat16, 128, 128, False, 1),
        (mx.bfloat16, 128, 128, True, 4),
        (mx.float32, 256, 256, True, 1),
        (mx.float32, 128, 128, False, 4),
        (mx.float16, 192, 64, True, 1),
    ]
    for i, (dt, Dk, Dv, masked, B) in enumerate(state_cases):
        p = Problem(B, 256, 16, 32, Dk, Dv, dt, "scalar", masked, False)
        bv, share, smem = cuda_chunked._state_config(p)
        assert smem <= cuda_chunked.SMEM_LIMIT
        exact = dt == mx.float32
        ot = mx.float32 if exact else mx.bfloat16
        inputs = [("q", dt, 4), ("k", dt, 4), ("W", ot, 4), ("U", ot, 4), ("Aqk", ot, 5), ("G", mx.float32, 3),
                  ("state_in", mx.float32, 4), ("mask", mx.bool_ if masked else mx.float32, 2 if masked else 1)]
        outputs = [("y", dt), ("state_out", mx.float32)]
        template = [("Dk", Dk), ("Dv", Dv), ("BV", bv), ("EXACT", exact), ("MASKED", masked), ("SHARE_WQ", share),
                    ("NH", cuda_chunked.state_nh(bv))]
        parts.append(cuda.kernel_text(f"custom_kernel_state_{i}", "", cuda.source_text("chunked/state_output.cu"), inputs, outputs, template))
    regs_cases = [  # dtype, Dk, Dv, masked, warps: the state pass with S in registers
        (mx.bfloat16, 128, 128, False, 8),
        (mx.bfloat16, 64, 192, True, 4),
        (mx.float16, 128, 64, True, 1),
    ]
    for i, (dt, Dk, Dv, masked, nw) in enumerate(regs_cases):
        assert cuda_chunked.state_regs_smem(Dk, 16 * nw) <= cuda_chunked.SMEM_LIMIT
        inputs = [("q", dt, 4), ("k", dt, 4), ("W", mx.bfloat16, 4), ("U", mx.bfloat16, 4), ("Aqk", mx.bfloat16, 5),
                  ("G", mx.float32, 3), ("state_in", mx.float32, 4),
                  ("mask", mx.bool_ if masked else mx.float32, 2 if masked else 1)]
        outputs = [("y", dt), ("state_out", mx.float32)]
        template = [("Dk", Dk), ("Dv", Dv), ("NW", nw), ("MASKED", masked)]
        parts.append(cuda.kernel_text(f"custom_kernel_state_regs_{i}", "", cuda.source_text("chunked/state_output_regs.cu"),
                                      inputs, outputs, template))
    key_cases = [  # per-key gates: dtype, Dk, Dv, fused, masked, lower, neg, dt_key
        (mx.bfloat16, 128, 128, False, False, False, False, False),
        (mx.float32, 64, 256, True, True, True, True, True),
        (mx.float16, 128, 64, True, True, False, False, False),
    ]
    for i, (dt, Dk, Dv, fused, masked, lower, neg, dt_key) in enumerate(key_cases):
        exact = dt == mx.float32
        ot = mx.float32 if exact else mx.bfloat16
        assert cuda_chunked.kkt_solve_wy_smem(Dk, Dv, exact, key=True) <= cuda_chunked.SMEM_LIMIT
        mask_in = ("mask", mx.bool_ if masked else mx.float32, 2 if masked else 1)
        inputs = [("q", dt, 4), ("k", dt, 4), ("v", dt, 4), ("gate_a", dt, 4), ("gate_b", mx.float32, 3),
                  ("A_log", mx.float32, 1), ("dt_bias", mx.float32, 2 if dt_key else 1),
                  ("lower_bound", mx.float32, 1), mask_in]
        outputs = list(zip(cuda_chunked.KKT_WY_KEY_OUTPUTS, (ot, ot, ot, mx.float32, dt, dt, mx.float32)))
        template = [("Dk", Dk), ("Dv", Dv), ("EXACT", exact), ("FUSED", fused), ("MASKED", masked),
                    ("HAS_LB", lower), ("NEG", neg), ("DT_KEY", dt_key)]
        parts.append(cuda.kernel_text(f"custom_kernel_prep_key_{i}", "", cuda.source_text("chunked/kkt_solve_wy_key.cu"),
                                      inputs, outputs, template))
        p = Problem(1, 256, 16, 32, Dk, Dv, dt, "key", masked, fused)
        bv, share, smem = cuda_chunked._state_config(p)
        assert smem <= cuda_chunked.SMEM_LIMIT
        inputs = [("Qg", dt, 4), ("Kd", dt, 4), ("W", ot, 4), ("U", ot, 4), ("Aqk", ot, 5), ("G", mx.float32, 3),
                  ("state_in", mx.float32, 4), mask_in, ("Gk", mx.float32, 4)]
        template = [("Dk", Dk), ("Dv", Dv), ("BV", bv), ("EXACT", exact), ("MASKED", masked), ("SHARE_WQ", share),
                    ("NH", cuda_chunked.state_nh(bv))]
        parts.append(cuda.kernel_text(f"custom_kernel_state_key_{i}", "", cuda.source_text("chunked/state_output_key.cu"),
                                      inputs, [("y", dt), ("state_out", mx.float32)], template))
    return "".join(parts)


def _decode_layer_tu() -> str:
    """The fused T=1 layer step (kernels/decode_layer.metal) through the same prelude."""
    from mlx_gdn.models import decode_step as decode_layer

    parts = [MLX_HEADER, cuda.source_text(cuda.PRELUDE)]
    G = decode_layer.Gating
    # (dtype, Dk, Dv, masked, norm dtype or None for the plain variant, gate variant[, sigmoid dtype])
    for i, (dt, Dk, Dv, masked, nd, gating, *sd) in enumerate([
            (mx.bfloat16, 128, 128, False, None, G()), (mx.float32, 64, 64, True, None, G()),
            (mx.float16, 256, 192, True, None, G()),
            (mx.bfloat16, 128, 128, False, mx.bfloat16, G()), (mx.float32, 64, 64, True, mx.float32, G()),
            (mx.float16, 256, 192, True, mx.float32, G()), (mx.bfloat16, 32, 24, True, mx.float32, G()),
            (mx.bfloat16, 128, 128, False, None, G(True, True, -5.0, False)),  # Kimi K3 / Bailing gates
            (mx.float32, 64, 64, True, None, G(True, False, None, True)),
            (mx.bfloat16, 128, 128, True, mx.bfloat16, G(False, False, -2.0, True)),
            # the Kimi / Bailing sigmoid-gated output norm
            (mx.bfloat16, 128, 128, True, mx.bfloat16, G(True, True, -5.0, False), mx.bfloat16),
            (mx.bfloat16, 64, 64, False, mx.float32, G(True, True, None, False), mx.bfloat16),
            (mx.float16, 128, 128, True, mx.float16, G(True, False, None, True), mx.float32)]):
        spec = decode_layer.decode_spec(2, 4, 2, 4, Dk, Dv, dt, masked, nd, 1e-6, gating, *sd)
        ndim = dict(qkv=3, conv_state=3, w=3, a=4 if gating.key else 3, b=3, A_log=1, dt_bias=2 if gating.dt_key else 1,
                    state_in=4, z=4, norm_weight=1, mask=2)
        kinds = {"state_in": mx.float32, "mask": mx.bool_, "norm_weight": nd, "A_log": mx.float32}
        inputs = [(n, kinds.get(n) or dt, ndim[n]) for n in spec.input_names]
        header = _undefine(spec) + compact(spec.header())
        parts.append(cuda.kernel_text(f"custom_kernel_{spec.name}_{i}", header, compact(spec.source()), inputs,
                                      list(zip(spec.output_names, spec.output_dtypes)), list(spec.template)))
    return "".join(parts)


def test_all_variants_compile():
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        jobs = {"recurrent": _recurrent_tu(), "chunked": _chunked_tu(), "decode_layer": _decode_layer_tu()}
        with ThreadPoolExecutor(max_workers=2) as pool:
            results = dict(zip(jobs, pool.map(lambda kv: _nvcc(kv[1], work, kv[0]), jobs.items())))
        for name, r in results.items():
            assert r.returncode == 0, f"{name} translation unit failed to compile:\n{r.stderr[-6000:]}"


def test_broken_source_fails():
    """The harness itself must fail on bad CUDA: a body with a type error does not compile."""
    src = cuda.kernel_text("custom_kernel_broken", cuda.source_text(cuda.PRELUDE),
                           "float x = simd_sum(1.0f); undefined_thing(x);", [("a", mx.float32, 1)],
                           [("out", mx.float32)], [])
    with tempfile.TemporaryDirectory() as d:
        r = _nvcc(MLX_HEADER + src, Path(d), "broken")
    assert r.returncode != 0 and "undefined_thing" in r.stderr
