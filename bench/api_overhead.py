"""Host-side cost of one public call: validation, dispatch, argument assembly, without any kernel.

The kernel is replaced by a stub returning existing arrays, so what is timed is the Python work a
decode step pays on top of MLX's own launch. Usage:
    PYTHONPATH=. python bench/api_overhead.py [--reps N] [--path ops|cuda|layer|module]

--path ops stubs the ops backend's `run` (validation and dispatch only); --path cuda pretends a
CUDA device is present and stubs `mx.fast.cuda_kernel`'s kernel object, so the CUDA launcher's
own work (launch spec, argument lists) is timed too. --path layer does the same for the drop-in
layer's fused T=1 step (`decode_layer.fused_backend` then `decode_step`, as the layer's `mix`
calls them for every layer at every decode step). --path module times the whole drop-in layer
(`mlx_gdn.GatedDeltaNet`, hidden size 2048) at T=1 with a cache: projections, the fused step,
norm and output projection, graph building only (the kernel stubbed, nothing evaluated).
"""

import argparse
import statistics
import time

import mlx.core as mx

import mlx_gdn
from mlx_gdn import backends, cuda, decode_layer, ops_backend
from mlx_gdn.testing import random_inputs


def layer_step():
    """The layer's T=1 fused step at the Qwen3.5 shape (conv kernel 4), with the kernel stubbed."""
    B, K, Hk, Hv, Dk, Dv = 1, 4, 16, 32, 128, 128
    C = 2 * Hk * Dk + Hv * Dv
    qkv, conv = mx.zeros((B, 1, C), dtype=mx.bfloat16), mx.zeros((B, K - 1, C), dtype=mx.bfloat16)
    w, ab = mx.zeros((C, K, 1), dtype=mx.bfloat16), mx.zeros((B, 1, Hv), dtype=mx.bfloat16)
    A_log, dt_bias, state = mx.zeros((Hv,)), mx.zeros((Hv,)), mx.zeros((B, Hv, Dv, Dk))
    backends._default_is_gpu = lambda: True  # as on a GPU machine, where "auto" picks the GPU

    def step():
        fused = decode_layer.fused_backend("auto", qkv, conv, w, ab, ab, state, None, Hk, Hv, Dk, Dv)
        return decode_layer.decode_step(fused, qkv, conv, w, ab, ab, A_log, dt_bias, state, None, Hk, Hv, Dk, Dv)
    assert decode_layer.fused_backend("auto", qkv, conv, w, ab, ab, state, None, Hk, Hv, Dk, Dv) == "cuda"
    return step


def module_step():
    """The drop-in layer's whole T=1 call (Qwen3.5 sizes, hidden 2048, bf16) with a cache."""
    from types import SimpleNamespace

    from mlx_lm.models.cache import ArraysCache

    config = SimpleNamespace(hidden_size=2048, linear_num_value_heads=32, linear_num_key_heads=16,
                             linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
                             rms_norm_eps=1e-6)
    layer = mlx_gdn.GatedDeltaNet(config)
    layer.set_dtype(mx.bfloat16)
    layer.eval()
    backends._default_is_gpu = lambda: True  # as on a GPU machine, where "auto" picks the GPU
    C = 2 * 16 * 128 + 32 * 128
    stub = [mx.zeros((1, 1, 32, 128), dtype=mx.bfloat16), mx.zeros((1, 3, C), dtype=mx.bfloat16),
            mx.zeros((1, 32, 128, 128))]
    mx.fast.cuda_kernel = lambda **kw: (lambda **call: stub)
    cache = ArraysCache(size=2)
    cache[0], cache[1] = stub[1], stub[2]
    x = mx.zeros((1, 1, 2048), dtype=mx.bfloat16)
    return lambda: layer(x, cache=cache)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20000)
    ap.add_argument("--path", choices=("ops", "cuda", "layer", "module"), default="cuda")
    args = ap.parse_args()
    x = random_inputs(1, 1, 16, 32, 128, 128, seed=0, dtype=mx.bfloat16)
    mx.eval(x.q, x.k, x.v, x.a, x.b, x.state)
    if args.path == "ops":
        ops_backend.run = lambda p, q, k, v, state, mask, **kw: (v, state)  # no kernel: host work only
    else:
        outs = [x.v, x.v, x.state] if args.path in ("layer", "module") else [x.v, x.state]  # the kernel's outputs
        cuda.available = lambda: True
        mx.fast.cuda_kernel = lambda **kw: (lambda **call: outs)
    call = lambda: mlx_gdn.gated_delta_update(x.q, x.k, x.v, x.a, x.b, x.A_log, x.dt_bias, x.state,  # noqa: E731
                                              backend=args.path)
    if args.path == "layer":
        call = layer_step()
    elif args.path == "module":
        call = module_step()
    for _ in range(1000):
        call()
    rounds = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(args.reps):
            call()
        rounds.append((time.perf_counter() - t) / args.reps * 1e6)
    what = {"layer": "fused layer step", "module": "GatedDeltaNet layer call"}.get(args.path, "gated_delta_update")
    print(f"{what} host overhead (--path {args.path}), B=1 T=1 Qwen3.5 shape: median "
          f"{statistics.median(rounds):.1f} us (rounds: {', '.join(f'{r:.1f}' for r in rounds)})")


if __name__ == "__main__":
    main()
