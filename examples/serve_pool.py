"""Continuous batching over a pool of recurrent states, with speculative drafts.

A tiny random Qwen3.5 (mlx-lm's qwen3_5 Model; Gated DeltaNet layers only: attention layers
would keep a paged KV cache beside the pool, left out to keep the example about the recurrent
state) serves requests that arrive and finish at different steps. Each step packs every active
request's tokens into one call per layer:

- a new request's whole prompt (prefill), or
- a verification chunk: its last token and a draft of 4 tokens.

The Gated DeltaNet layers read each request's state from its row of a pool
(``state_indices``), run the packed sequences (``cu_seqlens``) and write the final states back;
``return_states="steps"`` returns the state after every token, so when the model rejects a
draft token the request's row is rolled back to the state after its last accepted token (the
convolution state likewise). Drafts come from a stand-in drafter that is right about 70% of
the time. The tokens are checked against one-request-at-a-time greedy generation with
mlx-lm's own code.

    python examples/serve_pool.py            # prints CHECK ok when the tokens agree
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import List

import mlx.core as mx
import mlx.nn as nn
import numpy as np

import mlx_gdn

DRAFT = 4


def tiny_qwen35(seed: int = 0):
    """A tiny random Qwen3.5 of three Gated DeltaNet layers, built locally."""
    from mlx_lm.models import qwen3_5

    text = dict(
        model_type="qwen3_5_text", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256,
        linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=32,
        linear_value_head_dim=16, linear_conv_kernel_dim=4, full_attention_interval=8,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
    )
    mx.random.seed(seed)
    model = qwen3_5.Model(qwen3_5.ModelArgs.from_dict(dict(model_type="qwen3_5", text_config=text)))
    model.language_model.model.fa_idx = None  # no attention layer to build a mask for
    mx.eval(model.parameters())
    model.eval()
    return model


def greedy_one_by_one(model, prompt: List[int], n: int) -> List[int]:
    """Reference: mlx-lm's generate_step on one request (its own Gated DeltaNet code and cache)."""
    from mlx_lm.generate import generate_step

    return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=n)]


@dataclass
class Request:
    rid: int
    prompt: List[int]
    max_new: int
    arrives: int
    slot: int = -1
    out: List[int] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return len(self.out) >= self.max_new


class Pools:
    """Per layer: recurrent states [S, Hv, Dv, Dk] and convolution inputs [S, K - 1, conv_dim]."""

    def __init__(self, model, slots: int):
        self.layers = [layer.linear_attn for layer in model.language_model.model.layers]
        a = self.layers[0]
        self.K = a.conv_kernel_size
        self.state = [mx.zeros((slots, a.num_v_heads, a.head_v_dim, a.head_k_dim)) for _ in self.layers]
        self.conv = [mx.zeros((slots, self.K - 1, a.conv_dim)) for _ in self.layers]
        self.free = list(range(slots))

    def take(self) -> int:
        slot = self.free.pop(0)
        rows = mx.array([slot])
        for i in range(len(self.layers)):  # a new request starts from zeros
            self.state[i] = put_rows(self.state[i], rows, mx.zeros((1,) + self.state[i].shape[1:]))
            self.conv[i] = put_rows(self.conv[i], rows, mx.zeros((1,) + self.conv[i].shape[1:]))
        return slot


def put_rows(pool, rows, vals):
    return mx.put_along_axis(pool, rows.reshape((-1,) + (1,) * (pool.ndim - 1)), vals, axis=0)


def gdn_packed(attn, x, cu: List[int], pools: Pools, i: int, slots: mx.array):
    """One Gated DeltaNet layer over packed sequences. Returns its output, the states after every
    token and each sequence's convolution inputs (for rolling back)."""
    _, T, _ = x.shape
    qkv = attn.in_proj_qkv(x)
    z = attn.in_proj_z(x).reshape(1, T, attn.num_v_heads, attn.head_v_dim)
    b, a = attn.in_proj_b(x), attn.in_proj_a(x)
    conv_outs, conv_ins = [], []
    for n in range(len(cu) - 1):  # the short convolution runs per sequence, from its own state
        seq_in = mx.concatenate([pools.conv[i][slots[n]][None], qkv[:, cu[n] : cu[n + 1]]], axis=1)
        conv_ins.append(seq_in[0])
        conv_outs.append(nn.silu(attn.conv1d(seq_in)))
    conv = mx.concatenate(conv_outs, axis=1)
    kd, vd = attn.key_dim, attn.value_dim
    q = conv[..., :kd].reshape(1, T, attn.num_k_heads, attn.head_k_dim)
    k = conv[..., kd : 2 * kd].reshape(1, T, attn.num_k_heads, attn.head_k_dim)
    v = conv[..., 2 * kd :].reshape(1, T, attn.num_v_heads, attn.head_v_dim)
    q, k = mlx_gdn.normalize_qk(q, k)
    y, pools.state[i], steps = mlx_gdn.gated_delta_update(
        q, k, v, a, b, attn.A_log, attn.dt_bias, pools.state[i],
        cu_seqlens=mx.array(cu, dtype=mx.int32), state_indices=slots, return_states="steps",
    )
    K1 = pools.K - 1
    pools.conv[i] = put_rows(pools.conv[i], slots, mx.stack([c[-K1:] for c in conv_ins]))
    out = attn.out_proj(attn.norm(y, z).reshape(1, T, -1))
    return out, steps, conv_ins


def forward(model, chunks: List[List[int]], slots: List[int], pools: Pools):
    """Logits [T, vocab] of the packed chunks; per layer the states after every token and the
    convolution inputs per sequence."""
    lm = model.language_model
    cu = [0]
    for c in chunks:
        cu.append(cu[-1] + len(c))
    idx = mx.array(slots, dtype=mx.int32)
    x = lm.model.embed_tokens(mx.array([sum(chunks, [])]))
    saved = []
    for i, layer in enumerate(lm.model.layers):
        r, steps, conv_ins = gdn_packed(layer.linear_attn, layer.input_layernorm(x), cu, pools, i, idx)
        h = x + r
        x = h + layer.mlp(layer.post_attention_layernorm(h))
        saved.append((steps, conv_ins))
    logits = lm.lm_head(lm.model.norm(x))[0]
    return logits, cu, saved


def roll_back(pools: Pools, saved, slot: int, n: int, start: int, keep: int):
    """Set `slot` to sequence n's state after the first `keep` tokens of its chunk (which starts
    at packed token `start`)."""
    row = mx.array([slot])
    K1 = pools.K - 1
    for i, (steps, conv_ins) in enumerate(saved):
        pools.state[i] = put_rows(pools.state[i], row, steps[0, start + keep - 1][None])
        pools.conv[i] = put_rows(pools.conv[i], row, conv_ins[n][keep : keep + K1][None])


def serve(model, requests: List[Request], slots: int, drafter, log) -> None:
    pools = Pools(model, slots)
    waiting = sorted(requests, key=lambda r: r.arrives)
    active: List[Request] = []
    step = 0
    while waiting or active:
        while waiting and waiting[0].arrives <= step and pools.free:
            r = waiting.pop(0)
            r.slot = pools.take()
            active.append(r)
        if not active:
            step += 1
            continue
        chunks = [r.prompt if not r.out else [r.out[-1]] + drafter(r) for r in active]
        logits, cu, saved = forward(model, chunks, [r.slot for r in active], pools)
        preds = np.array(mx.argmax(logits, axis=-1)).tolist()
        for n, r in enumerate(active):
            p = preds[cu[n] : cu[n + 1]]
            if not r.out:  # prefill: the next token after the prompt
                r.out.append(p[-1])
                continue
            drafts = chunks[n][1:]
            a = 0
            while a < len(drafts) and drafts[a] == p[a]:
                a += 1
            r.out += drafts[:a] + [p[a]]
            if a < len(drafts):  # rejected: keep the state after the last token and a accepted drafts
                roll_back(pools, saved, r.slot, n, cu[n], 1 + a)
            log(f"step {step}: request {r.rid} accepted {a}/{len(drafts)} drafts")
        for r in [r for r in active if r.done]:
            r.out = r.out[: r.max_new]
            pools.free.append(r.slot)
            active.remove(r)
            log(f"step {step}: request {r.rid} finished, slot {r.slot} freed")
        step += 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slots", type=int, default=4, help="rows of the state pool")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    log = (lambda s: None) if args.quiet else print
    model = tiny_qwen35(args.seed)
    rng = np.random.default_rng(args.seed)
    requests = [Request(i, rng.integers(0, 256, size=int(n)).tolist(), int(m), int(t))
                for i, (n, m, t) in enumerate([(7, 9, 0), (1, 5, 0), (12, 11, 1), (3, 4, 2), (9, 8, 2), (5, 10, 4)])]
    expected = {r.rid: greedy_one_by_one(model, r.prompt, r.max_new) for r in requests}

    def drafter(r: Request) -> List[int]:
        # Stand-in for a draft model: the true continuation, each token wrong with probability 0.3.
        truth = expected[r.rid][len(r.out) : len(r.out) + DRAFT]
        truth += [0] * (DRAFT - len(truth))
        return [t if rng.random() > 0.3 else int(rng.integers(0, 256)) for t in truth]

    serve(model, requests, args.slots, drafter, log)
    bad = [r.rid for r in requests if r.out != expected[r.rid]]
    for r in requests:
        log(f"request {r.rid}: {r.out}")
    if bad:
        print(f"CHECK FAILED: requests {bad} differ from one-at-a-time greedy generation")
        return 1
    print(f"CHECK ok: {len(requests)} requests, tokens equal one-at-a-time greedy generation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
