"""`GatedDeltaNet.merge_projections`: the four input projections of the Qwen3.5 layer in one buffer.

A single-token call (B * S = 1) then runs one matmul instead of four. Checked here: decode steps
equal the unmerged layer's and mlx-lm's (float32 and a 4-bit quantized layer, under the Metal
simulator, where the step then runs the fused norm variant), the graph holds one matmul where it
held four and four again at B > 1, merging adds no second copy of the weights (MLX's active
memory), and replacing a projection's array returns the layer to four matmuls with the new
weights. Each case draws a fresh seed, reported in the messages.
"""

from __future__ import annotations

import contextlib
import gc
import io
import re
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

mlx_lm = pytest.importorskip("mlx_lm", reason="mlx-lm is an optional dependency")
from mlx_lm.models import qwen3_5  # noqa: E402
from mlx_lm.models.cache import ArraysCache  # noqa: E402

import mlx_gdn  # noqa: E402
from mlx_gdn.models import decode_step  # noqa: E402
from mlx_gdn.reference import rel_error  # noqa: E402
from mlx_gdn.sim import simulated_metal  # noqa: E402
from mlx_gdn.testing import TOLERANCE, fresh_seed  # noqa: E402

PROJ = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")


def _layer(seed, hidden=64, Hk=1, Hv=2, Dk=32, Dv=32, quantized=False, backend="metal"):
    """(mlx-lm layer, drop-in layer sharing its modules) with random weights."""
    mx.random.seed(seed)
    rng = np.random.default_rng(seed)
    args = SimpleNamespace(hidden_size=hidden, linear_num_value_heads=Hv, linear_num_key_heads=Hk,
                           linear_key_head_dim=Dk, linear_value_head_dim=Dv, linear_conv_kernel_dim=4,
                           rms_norm_eps=1e-6)
    ref = qwen3_5.GatedDeltaNet(args)
    ref.dt_bias = mx.array(rng.standard_normal(Hv).astype(np.float32))
    ref.norm.weight = mx.array(rng.uniform(0.5, 1.5, Dv).astype(np.float32))
    if quantized:
        nn.quantize(ref, group_size=32, bits=4, class_predicate=lambda path, m: path.startswith("in_proj"))
    mx.eval(ref.parameters())
    ref.eval()
    return ref, mlx_gdn.GatedDeltaNet.from_layer(ref, backend=backend)


def _matmuls(*outputs) -> int:
    buf = io.StringIO()
    mx.export_to_dot(buf, *outputs)
    return len(re.findall(r'label ="(Matmul|QuantizedMatmul)"', buf.getvalue()))


def _steps(layer, x, cache):
    outs = []
    for t in range(x.shape[1]):
        outs.append(layer(x[:, t : t + 1], None, cache))
        mx.eval(outs[-1], cache.state[:2])
    return mx.concatenate(outs, axis=1)


def _has_cuda() -> bool:
    from mlx_gdn.cuda.backend import available

    return available()


def _check_merged_decode(backend, quantized, monkeypatch):
    seed = fresh_seed()
    ref, layer = _layer(seed, quantized=quantized, backend=backend)
    x = mx.random.normal((1, 8, 64))
    c_ref = ArraysCache(2)
    want = _steps(ref, x, c_ref)
    with simulated_metal() if backend == "metal" else contextlib.nullcontext():
        c_sep = ArraysCache(2)
        separate = _steps(layer, x, c_sep)
        assert layer.merge_projections()
        norms = []
        real = decode_step.decode_step
        monkeypatch.setattr(decode_step, "decode_step",
                            lambda *a, **k: norms.append(k.get("norm") is not None) or real(*a, **k))
        c_mrg = ArraysCache(2)
        merged = _steps(layer, x, c_mrg)
    assert norms == [True] * x.shape[1], norms
    where = f"seed={seed} {backend} quantized={quantized}"
    tol = TOLERANCE[mx.float32]
    for name, got, exp in [("output vs unmerged", merged, separate), ("state vs unmerged", c_mrg[1], c_sep[1]),
                           ("conv state vs unmerged", c_mrg[0], c_sep[0]), ("output vs mlx-lm", merged, want),
                           ("state vs mlx-lm", c_mrg[1], c_ref[1])]:
        err = rel_error(got, exp)
        assert err < tol, f"{name}: rel error {err:.3g} ({where})"


@pytest.mark.parametrize("quantized", [False, True])
def test_merged_decode_matches_unmerged_and_mlx_lm(quantized, monkeypatch):
    _check_merged_decode("metal", quantized, monkeypatch)


@pytest.mark.cuda
@pytest.mark.skipif(not _has_cuda(), reason="needs MLX with a CUDA device")
@pytest.mark.parametrize("quantized", [False, True])
def test_merged_decode_on_cuda(quantized, monkeypatch):
    _check_merged_decode("cuda", quantized, monkeypatch)


def test_one_matmul_at_one_token_four_otherwise():
    seed = fresh_seed()
    _, layer = _layer(seed)
    assert _matmuls(*layer._project(mx.random.normal((1, 1, 64)))) == 4
    assert layer.merge_projections()
    assert _matmuls(*layer._project(mx.random.normal((1, 1, 64)))) == 1
    # Two tokens or two sequences: the merged output's parts would be strided views, which the
    # fused step would copy, so the four projections run.
    assert _matmuls(*layer._project(mx.random.normal((2, 1, 64)))) == 4
    assert _matmuls(*layer._project(mx.random.normal((1, 2, 64)))) == 4
    layer.train()
    assert _matmuls(*layer._project(mx.random.normal((1, 1, 64)))) == 4


def test_merge_keeps_one_copy_of_the_weights():
    seed = fresh_seed()
    _, layer = _layer(seed, hidden=512, Hk=2, Hv=4, Dk=64, Dv=64)
    size = sum(layer[n]["weight"].nbytes for n in PROJ)
    gc.collect()
    before = mx.get_active_memory()
    assert layer.merge_projections()
    gc.collect()
    grew = mx.get_active_memory() - before
    # The old arrays are freed and the new ones are views of the merged buffer.
    assert grew < 0.05 * size, f"active memory grew by {grew} bytes, projections hold {size} (seed={seed})"
    total = sum(layer[n]["weight"].nbytes for n in PROJ)
    assert total == size


def test_replaced_projection_returns_to_four_matmuls_with_the_new_weights():
    seed = fresh_seed()
    _, layer = _layer(seed)
    assert layer.merge_projections()
    layer.in_proj_z.weight = mx.random.normal(layer.in_proj_z.weight.shape)
    x = mx.random.normal((1, 1, 64))
    qkv, z, b, a = layer._project(x)
    assert _matmuls(qkv, z, b, a) == 4
    assert layer._merged_projection() is None
    want = (x @ layer.in_proj_z.weight.T).reshape(z.shape)
    assert rel_error(z, want) < 1e-6, f"seed={seed}"


def test_merge_refuses_mixed_projections():
    seed = fresh_seed()
    _, layer = _layer(seed)
    nn.quantize(layer, group_size=32, bits=4, class_predicate=lambda path, m: path == "in_proj_z")
    assert isinstance(layer.in_proj_z, nn.QuantizedLinear)
    weights = [layer[n]["weight"] for n in PROJ]
    assert not layer.merge_projections()
    assert all(layer[n]["weight"] is w for n, w in zip(PROJ, weights))
