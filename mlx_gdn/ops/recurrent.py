"""The exact per-step recurrence in MLX ops: runs on any device, differentiable.

Every other path must equal this one. Products are written as multiply-and-sum so
float32 stays float32 on backends whose matmul may use reduced precision (TF32).
"""

from __future__ import annotations

from typing import Optional, Tuple

import mlx.core as mx

from ..gating import flush_decay


def _step(state, q_t, k_t, v_t, g_t, beta_t, m_t):
    """One step. state [B,Hv,Dv,Dk] f32; q_t,k_t [B,Hv,Dk]; v_t [B,Hv,Dv]; g_t [B,Hv] or [B,Hv,Dk];
    beta_t [B,Hv]; m_t [B] bool or None."""
    decay = g_t[..., None, None] if g_t.ndim == 2 else g_t[..., None, :]
    s = state * decay
    kv = (s * k_t[..., None, :]).sum(-1)
    delta = beta_t[..., None] * (v_t - kv)
    s = s + delta[..., :, None] * k_t[..., None, :]
    y = (s * q_t[..., None, :]).sum(-1)
    if m_t is not None:
        s = mx.where(m_t[:, None, None, None], s, state)
        y = mx.where(m_t[:, None, None], y, 0.0)
    return y, s


_step_compiled = mx.compile(_step)


def _steps(x: mx.array, T: int):
    """x [B, T, ...] as T arrays [B, ...]."""
    if T == 1:  # a decode step: no split op
        return [x.squeeze(1)]
    return [part.squeeze(1) for part in mx.split(x, T, axis=1)] if T > 0 else []


def recurrent_rule(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array,
    mask: Optional[mx.array] = None,
) -> Tuple[mx.array, mx.array]:
    """Sequential gated delta rule.

    q, k: [B,T,Hk,Dk]; v: [B,T,Hv,Dv]; g: [B,T,Hv] or [B,T,Hv,Dk]; beta: [B,T,Hv];
    state: [B,Hv,Dv,Dk] float32; mask: [B,T] or None.
    Returns y [B,T,Hv,Dv] in q's dtype and the new float32 state.
    """
    y, state, _ = recurrent_rule_states(q, k, v, g, beta, state, mask, every=0)
    return y, state


def recurrent_rule_states(q, k, v, g, beta, state, mask=None, *, every: int = 1):
    """`recurrent_rule` that also returns the states after tokens every, 2 every, ...

    Returns (y, state, states): states [B, T // every, Hv, Dv, Dk] float32 (None when every is 0).
    A masked step's state is the one before it.
    """
    B, T, Hk, _ = q.shape
    Hv = v.shape[2]
    out_dtype = q.dtype
    f32 = mx.float32
    q, k, v, g, beta = (x.astype(f32) for x in (q, k, v, g, beta))
    # Decays below exp(-40) become exact zeros: g * state would otherwise go subnormal, which
    # CPUs without flush-to-zero run slower (gating.LOG_DECAY_FLOOR).
    g = flush_decay(g)
    if Hv != Hk:
        # Value head h reads key head h // (Hv // Hk).
        q = mx.repeat(q, Hv // Hk, axis=2)
        k = mx.repeat(k, Hv // Hk, axis=2)
    if mask is not None:
        mask = mask.astype(mx.bool_)
    # Split each input into steps once: indexing x[:, t] per step would make the backward pass
    # scatter a full-size gradient per step (quadratic in T).
    steps = [_steps(x, T) for x in (q, k, v, g, beta)]
    masks = _steps(mask, T) if mask is not None else [None] * T
    # Compiled on GPUs (one fused kernel per step instead of several launches). Not on the CPU:
    # there MLX's own broadcasting kernels beat the fused one, 0.76 against 1.06 of mlx-lm's time
    # at T=1 and 0.84 against 0.92 at T=64 (alternating rounds, bench/NOTES.md).
    step = _step_compiled if mx.default_device().type == mx.gpu else _step
    ys, kept = [], []
    for t in range(T):
        q_t, k_t, v_t, g_t, beta_t = (s[t] for s in steps)
        y, state = step(state, q_t, k_t, v_t, g_t, beta_t, masks[t])
        ys.append(y)
        if every and (t + 1) % every == 0:
            kept.append(state)
    if T == 1:
        y = mx.expand_dims(ys[0], 1)
    else:
        y = mx.stack(ys, axis=1) if ys else mx.zeros((B, 0, Hv, v.shape[3]), f32)
    states = None
    if every:
        states = mx.stack(kept, axis=1) if kept else mx.zeros((B, 0) + tuple(state.shape[1:]), f32)
    return y.astype(out_dtype), state, states
