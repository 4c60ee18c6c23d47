"""Patch an mlx-lm model with mlx-gdn's Gated DeltaNet layers and compare generation speed.

    python examples/patch_mlx_lm.py --model mlx-community/Qwen3.5-...   # path or Hugging Face name
    python examples/patch_mlx_lm.py --tiny                              # tiny random Qwen3.5, no download

Prints the generated tokens and tokens per second without and with the patch (greedy decoding,
so both runs must produce the same tokens).
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import numpy as np

import mlx_gdn


def tiny_qwen35(seed: int = 0):
    """A tiny random Qwen3.5 model (3 Gated DeltaNet layers, 1 attention layer), built locally."""
    from mlx_lm.models import qwen3_5

    text = dict(
        model_type="qwen3_5_text", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256,
        linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=32,
        linear_value_head_dim=16, linear_conv_kernel_dim=4, full_attention_interval=4,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
    )
    mx.random.seed(seed)
    model = qwen3_5.Model(qwen3_5.ModelArgs.from_dict(dict(model_type="qwen3_5", text_config=text)))
    mx.eval(model.parameters())
    model.eval()
    return model, None


def load(name: str):
    from mlx_lm import load as mlx_lm_load

    return mlx_lm_load(name)


def generate(model, prompt: mx.array, max_tokens: int):
    """Greedy tokens and decode tokens per second (prompt processing excluded)."""
    from mlx_lm.generate import generate_step

    out, start = [], None
    for tok, _ in generate_step(prompt, model, max_tokens=max_tokens):
        if start is None:
            start = time.perf_counter()  # first token marks the end of prompt processing
        out.append(int(tok))
    elapsed = time.perf_counter() - start
    return out, (len(out) - 1) / elapsed if elapsed > 0 and len(out) > 1 else float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="local path or Hugging Face name of an mlx-lm model")
    src.add_argument("--tiny", action="store_true", help="build a tiny random Qwen3.5 model locally")
    ap.add_argument("--prompt", default="The Gated DeltaNet layer", help="prompt text (with --model)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--backend", default="auto", choices=["auto", "metal", "cuda", "ops"])
    args = ap.parse_args(argv)

    if args.tiny:
        model, tokenizer = tiny_qwen35()
        prompt = mx.array(np.random.default_rng(0).integers(0, 256, 12).astype(np.int32))
    else:
        model, tokenizer = load(args.model)
        prompt = mx.array(tokenizer.encode(args.prompt))

    ref, ref_tps = generate(model, prompt, args.max_tokens)
    n = mlx_gdn.patch(model, backend=args.backend)
    out, tps = generate(model, prompt, args.max_tokens)

    show = (lambda t: tokenizer.decode(t)) if tokenizer is not None else (lambda t: " ".join(map(str, t)))
    print(f"layers patched: {n} (backend={args.backend!r}, available: {', '.join(mlx_gdn.available_backends())})")
    print(f"unpatched: {ref_tps:8.1f} tokens/s  {show(ref)!r}")
    print(f"patched:   {tps:8.1f} tokens/s  {show(out)!r}")
    same = out == ref
    print("same tokens" if same else "tokens differ (expected only from rounding differences in low precision)")
    return 0 if (same or not args.tiny) else 1


if __name__ == "__main__":
    raise SystemExit(main())
