"""A whole Qwen3.5-9B-shaped model: prefill and decode, patched against unpatched mlx-lm, and
transformers with fla's kernels on the same GPU when torch and fla are importable.

    PYTHONUNBUFFERED=1 python bench/model_bench.py --json model.json            # the 9B shape
    python bench/model_bench.py --layers 4 --hidden 512 --prompt 256 --json m.json  # a small one

Random bf16 weights (the layer math does not depend on trained values for timing). Prefill: one
forward pass over `--prompt` tokens from an empty cache, evaluated and synchronised, median of
`--reps` after one warm-up. Decode: after a `--context`-token prefill, `--decode` greedy tokens
through mlx-lm's `generate_step` (transformers: a loop of forward calls with its cache), tokens per
second over the decode steps only. Launches per decode step are counted from CUPTI (torch's
profiler) when torch is importable: MLX's CUDA backend costs about 14 us per launch, so a decode
step's speed follows its launch count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import mlx.core as mx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mlx_gdn  # noqa: E402
from mlx_gdn.bench.env import environment  # noqa: E402


def text_config(a) -> dict:
    """Qwen3.5-9B's shape (hidden 4096, 32 layers, linear heads Hk=16, Hv=32, Dk=Dv=128)."""
    return dict(
        model_type="qwen3_5_text", hidden_size=a.hidden, intermediate_size=a.hidden * 3, num_hidden_layers=a.layers,
        num_attention_heads=16, num_key_value_heads=4, head_dim=256, vocab_size=a.vocab,
        linear_num_value_heads=32, linear_num_key_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_conv_kernel_dim=4, full_attention_interval=4, rms_norm_eps=1e-6, tie_word_embeddings=False,
        max_position_embeddings=32768,
    )


def mlx_model(a):
    from mlx_lm.models import qwen3_5

    mx.random.seed(0)
    model = qwen3_5.Model(qwen3_5.ModelArgs.from_dict(dict(model_type="qwen3_5", text_config=text_config(a))))
    model.set_dtype(mx.bfloat16)
    mx.eval(model.parameters())
    model.eval()
    return model


def _sync():
    mx.synchronize()


def mlx_prefill_s(model, tokens, reps):
    from mlx_lm.models.cache import make_prompt_cache

    def once():
        cache = make_prompt_cache(model)
        t0 = time.perf_counter()
        logits = model(tokens, cache=cache)
        mx.eval(logits)
        _sync()
        return time.perf_counter() - t0

    once()
    return statistics.median(once() for _ in range(reps))


def mlx_decode(model, context, n):
    """(tokens per second over n greedy steps after a prefill of `context`, the tokens)."""
    from mlx_lm.generate import generate_step

    out, t0 = [], None
    for tok, _ in generate_step(context, model, max_tokens=n + 1):
        if t0 is None:
            _sync()
            t0 = time.perf_counter()
        else:
            out.append(int(tok))
    _sync()
    return n / (time.perf_counter() - t0), out


def mlx_step_profile(model, context):
    """One decode step split three ways: CUDA kernels launched and their summed GPU time (CUPTI
    through torch's profiler; None without torch), and the host time to build the step's graph
    (the model call before evaluation), median of 10 steps."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    mx.eval(model(context[None], cache=cache))
    tok = context[None, -1:]
    for _ in range(3):
        mx.eval(model(tok, cache=cache))
    _sync()
    builds = []
    for _ in range(10):
        t0 = time.perf_counter()
        out = model(tok, cache=cache)
        builds.append(time.perf_counter() - t0)
        mx.eval(out)
    row = {"host_build_ms": statistics.median(builds) * 1e3}
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return row
    _sync()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        mx.eval(model(tok, cache=cache))
        _sync()
        torch.cuda.synchronize()
    gpu = [ev for ev in prof.events() if "CUDA" in str(getattr(ev, "device_type", ""))]
    row["launches_per_decode_step"] = len(gpu)
    row["decode_step_gpu_ms"] = sum(ev.time_range.elapsed_us() for ev in gpu) / 1e3
    return row


def first_layer_output(model, context):
    """The first Gated DeltaNet layer's output on the embedded context, float32 (a per-layer
    check of the patch that random weights do not blur the way 32 layers do)."""
    inner = model.language_model.model
    layer = next(l for l in model.layers if getattr(l, "is_linear", False))
    h = layer.input_layernorm(inner.embed_tokens(context[None]))
    out = layer.linear_attn(h, None, None).astype(mx.float32)
    mx.eval(out)
    return out


def mlx_prefill_kernels(model, tokens, top=15):
    """GPU time of one prefill by kernel name (CUPTI through torch's profiler): the largest `top`
    names in ms, their total, and the number of launches; None without torch."""
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None
    from collections import defaultdict

    from mlx_lm.models.cache import make_prompt_cache

    mx.eval(model(tokens, cache=make_prompt_cache(model)))
    _sync()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        mx.eval(model(tokens, cache=make_prompt_cache(model)))
        _sync()
        torch.cuda.synchronize()
    per, n = defaultdict(float), 0
    for ev in prof.events():
        if "CUDA" in str(getattr(ev, "device_type", "")):
            per[ev.name[:100]] += ev.time_range.elapsed_us() / 1e3
            n += 1
    ranked = sorted(per.items(), key=lambda kv: -kv[1])
    return {"gpu_ms": sum(per.values()), "launches": n, "top_ms": dict(ranked[:top])}


def torch_rows(a, prompt_np, context_np):
    """transformers' Qwen3.5 with fla's kernels (when importable), same shape, bf16."""
    try:
        import torch
        import fla  # noqa: F401  (transformers picks fla's kernels when it can import them)
        from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig
    except Exception as exc:  # noqa: BLE001
        return {"skipped": f"{type(exc).__name__}: {exc}"}
    cfg = Qwen3_5TextConfig(**{k: v for k, v in text_config(a).items() if k != "model_type"})
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen3_5ForCausalLM(cfg).to(torch.bfloat16).eval()
    prompt = torch.from_numpy(prompt_np).long().cuda()[None]
    context = torch.from_numpy(context_np).long().cuda()[None]

    @torch.no_grad()
    def prefill():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(prompt, use_cache=True)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    prefill()
    pre = statistics.median(prefill() for _ in range(a.reps))

    @torch.no_grad()
    def decode():
        out = model(context, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(a.decode):
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        return a.decode / (time.perf_counter() - t0)

    decode()
    tps = decode()
    del model
    torch.cuda.empty_cache()
    return {"prefill_s": pre, "decode_tok_s": tps}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=248320)
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-unpatched-prefill", action="store_true", help="mlx-lm's ops loop takes seconds per call on CUDA")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--merge-projections", action="store_true",
                    help="also decode with each linear layer's four input projections merged (GatedDeltaNet.merge_projections)")
    ap.add_argument("--commit", help="record this commit (a copy on another machine may carry stale git metadata)")
    ap.add_argument("--json")
    a = ap.parse_args(argv)

    import numpy as np

    rng = np.random.default_rng(0)
    prompt_np = rng.integers(0, a.vocab, a.prompt)
    context_np = rng.integers(0, a.vocab, a.context)
    prompt, context = mx.array(prompt_np)[None], mx.array(context_np)
    rows = {}
    model = mlx_model(a)
    first = {}
    for name in ("unpatched", "patched"):
        if name == "patched":
            report = mlx_gdn.patch(model)
            rows["patch_report"] = str(report)
        first[name] = first_layer_output(model, context)
        row = {}
        if not (name == "unpatched" and a.skip_unpatched_prefill):
            row["prefill_s"] = mlx_prefill_s(model, prompt, a.reps if name == "patched" else 1)
        logits = model(context[None])[0, -1].astype(mx.float32)
        mx.eval(logits)
        rows.setdefault("_logits", {})[name] = logits
        row["decode_tok_s"], row["tokens"] = mlx_decode(model, context, a.decode)
        row.update(mlx_step_profile(model, context))
        if name == "patched":
            row["prefill_gpu"] = mlx_prefill_kernels(model, prompt)
        rows[f"mlx-lm {name}"] = row
        print(name, {k: v for k, v in row.items() if k not in ("tokens", "prefill_gpu")}, flush=True)
        if row.get("prefill_gpu"):
            g = row["prefill_gpu"]
            print(f"  prefill GPU time {g['gpu_ms']:.1f} ms in {g['launches']} launches; largest:", flush=True)
            for k, v in g["top_ms"].items():
                print(f"    {v:8.2f} ms  {k}", flush=True)
    same = rows["mlx-lm patched"]["tokens"] == rows["mlx-lm unpatched"]["tokens"]
    rows["same_greedy_tokens"] = same
    lg = rows.pop("_logits")
    diff = mx.linalg.norm(lg["patched"] - lg["unpatched"]) / mx.linalg.norm(lg["unpatched"])
    rows["last_logits_rel_diff"] = float(diff)
    d1 = mx.linalg.norm(first["patched"] - first["unpatched"]) / mx.linalg.norm(first["unpatched"])
    rows["first_layer_rel_diff"] = float(d1)
    print(f"first Gated DeltaNet layer, patched vs unpatched: {float(d1):.2e} (relative)", flush=True)
    # Random weights give near-tied logits, so greedy tokens of two bf16 paths can part ways
    # without either being wrong; the logits' relative difference is the check.
    print(f"patched vs unpatched: last-position logits differ by {float(diff):.2e} (relative); "
          f"greedy tokens equal: {same}", flush=True)
    if a.merge_projections:
        row = {"layers_merged": sum(l.linear_attn.merge_projections() for l in model.layers
                                    if getattr(l, "is_linear", False) and hasattr(l.linear_attn, "merge_projections"))}
        row["decode_tok_s"], tokens = mlx_decode(model, context, a.decode)
        row["same_greedy_tokens_as_patched"] = tokens == rows["mlx-lm patched"]["tokens"]
        row.update(mlx_step_profile(model, context))
        rows["mlx-lm patched, merged projections"] = row
        print("patched, merged projections", row, flush=True)
    del model
    if not a.no_torch:
        rows["transformers + fla"] = torch_rows(a, prompt_np, context_np)
        print("transformers + fla", rows["transformers + fla"], flush=True)
    if a.json:
        env = environment()
        if a.commit:
            env["git_commit"], env["git_dirty"] = a.commit, False
        with open(a.json, "w") as f:
            json.dump({"environment": env, "args": vars(a), "results": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
