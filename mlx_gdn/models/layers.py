"""Drop-in gated delta rule layers for the mlx-lm model families that run the rule.

Every class has the parameters, names, shapes and call of one mlx-lm layer class, so the same
checkpoints load, and routes the recurrence through `mlx_gdn.gated_delta_update`:

    GatedDeltaNet                 qwen3_5.GatedDeltaNet (Qwen3.5, Qwen3.5-MoE)
    Qwen3NextGatedDeltaNet        qwen3_next.Qwen3NextGatedDeltaNet
    KimiDeltaAttention            kimi_linear.KimiDeltaAttention
    KimiK3DeltaAttention          kimi_k3.KimiK3DeltaAttention
    BailingKDA                    bailing_moe_v3.BailingKDA (Ling)
    OlmoHybridGatedDeltaNet       olmo_hybrid.GatedDeltaNet

The two Qwen layouts share `_GatedDeltaBase` (one conv over q, k and v, scalar gates, a fused
T=1 step); the Kimi and Bailing layers share `_KeyGatedBase` (per-key decay gates, the same
fused T=1 step with their sigmoid-gated output norm inside). All of them
are pad-proof: a masked position (left padding, or right padding beyond a cache's ``lengths``)
reaches neither the recurrent state nor the convolution state (`causal_conv`). `patch` lives in
`mlx_gdn.models.patch`.
"""

from __future__ import annotations

import importlib
import sys
from functools import lru_cache, partial
from typing import Any, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from ..api import gated_delta_update
from ..gating import normalize_qk
from ..validate import BACKENDS, check_choice
from . import decode_step, prefill_step

__all__ = [
    "GatedDeltaNet",
    "Qwen3NextGatedDeltaNet",
    "KimiDeltaAttention",
    "KimiK3DeltaAttention",
    "BailingKDA",
    "OlmoHybridGatedDeltaNet",
    "RMSNormGated",
    "DropInLayer",
    "causal_conv",
]

# mlx-lm's l2norm eps (added to the sum of squares of q and k).
_QK_EPS = 1e-6


@partial(mx.compile, shapeless=True)
def _silu_gate(h, gate, x):
    # Gate in float32, like mlx-lm's precise_swiglu, so bf16 models round once.
    return (nn.silu(gate.astype(mx.float32)) * x.astype(mx.float32)).astype(h.dtype)


class RMSNormGated(nn.Module):
    """RMS norm of ``x`` [..., D] times ``silu(gate)``; same parameter (``weight`` [D]) as mlx-lm's."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones(hidden_size)

    def __call__(self, hidden_states: mx.array, gate: Optional[mx.array] = None) -> mx.array:
        x = mx.fast.rms_norm(hidden_states, self["weight"], self.eps)  # item access: see _GatedDeltaBase
        if gate is None:
            return x.astype(hidden_states.dtype)
        return _silu_gate(hidden_states, gate, x)


def _gated_norm(module: nn.Module, z: mx.array) -> Optional["decode_step.Norm"]:
    """The fused step's `decode_step.Norm` for output norm `module` and gate z, when `module` is
    this package's `RMSNormGated` or mlx-lm's Qwen3-Next / Qwen3.5 one (the same computation);
    else None (another norm runs as itself)."""
    cls = type(module)
    if cls is not RMSNormGated:
        # mlx-lm's class can only be the norm's class if mlx-lm's module is already imported.
        lm = sys.modules.get("mlx_lm.models.qwen3_next")
        if lm is None or cls is not getattr(lm, "Qwen3NextRMSNormGated", None):
            return None
    return decode_step.Norm(z, module["weight"], module.eps)


def _with_plain_vjp(fast, plain):
    """`fast` (kernel launches, which have no VJP in MLX) with the gradient of `plain`, the unfused
    computation it equals: both take the same arrays and return the same outputs. A gradient taken
    through a layer in eval mode then flows as through the unfused layer."""
    f = mx.custom_function(fast)

    @f.vjp
    def _vjp(primals, cotangents, outputs):
        cot = list(cotangents) if isinstance(cotangents, (list, tuple)) else [cotangents]
        _, grads = mx.vjp(plain, list(primals), cot)
        return tuple(grads)

    return f


def _unfused_prep(qkv, conv_state, w, mask, Hk: int, Hv: int, Dk: int, Dv: int):
    """q, k, v of a Qwen layer from its projection: `causal_conv` with the conv weight w given as an
    array, split, `normalize_qk` (the path `prefill_step.prep` equals)."""
    B, S, C = qkv.shape
    conv, _ = causal_conv(qkv, lambda x: mx.conv1d(x, w, groups=C), conv_state, w.shape[1] - 1, mask)
    q, k, v = mx.split(conv, [Hk * Dk, 2 * Hk * Dk], -1)
    q, k = normalize_qk(q.reshape(B, S, Hk, Dk), k.reshape(B, S, Hk, Dk), eps=_QK_EPS)
    return q, k, v.reshape(B, S, Hv, Dv)


def causal_conv(x: mx.array, conv: nn.Module, state: Optional[mx.array], n_keep: int,
                mask: Optional[mx.array] = None, lengths: Optional[mx.array] = None) -> Tuple[mx.array, mx.array]:
    """Depthwise causal convolution with SiLU over a stream carried in a conv state, pad-proof.

    x [B, S, C]; conv: mlx-lm's depthwise ``nn.Conv1d`` (weight [C, K, 1], no padding), or a function
    doing the same;
    state [B, n_keep, C] in x's dtype, or None (zeros: the start of a sequence); n_keep = K - 1;
    mask [B, S] bool or None; lengths [B] int or None (a cache's per-sequence valid lengths for
    this call, right padding beyond them). Returns (silu(conv) [B, S, C], new state [B, n_keep, C]).

    Masked inputs are zeroed before the convolution: a left pad then reads as the zeros a fresh
    state holds, so a padded sequence's outputs equal its unpadded ones. The new state holds the
    n_keep inputs before each sequence's end (``lengths``), so right padding never enters it.
    """
    if mask is not None:
        x = mx.where(mask[..., None], x, 0)
    B, S, C = x.shape
    if state is None:
        state = mx.zeros((B, n_keep, C), dtype=x.dtype)
    conv_input = mx.concatenate([state, x], axis=1)
    if lengths is not None:
        ends = mx.clip(lengths, 0, S)
        positions = (ends[:, None] + mx.arange(n_keep))[..., None]
        new_state = mx.take_along_axis(conv_input, positions, axis=1)
    else:
        new_state = mx.contiguous(conv_input[:, S:, :])
    return nn.silu(conv(conv_input)), new_state


def _cache_lengths(cache) -> Optional[mx.array]:
    return getattr(cache, "lengths", None) if cache is not None else None


class DropInLayer(nn.Module):
    """What every drop-in layer shares: adoption of an mlx-lm layer's contents and the backend.

    ``backend`` ("auto", "metal", "cuda", "ops") is what the layer passes to `gated_delta_update`,
    in training as at inference (every backend has gradients: `mlx_gdn.autodiff`). Subclasses
    name the mlx-lm class they stand in for in ``MLX_LM_CLASS`` ("module:Class" under
    ``mlx_lm.models``).
    """

    MLX_LM_CLASS = ""

    @classmethod
    def mlx_lm_class(cls) -> type:
        """The mlx-lm layer class this class stands in for (imports mlx-lm)."""
        module, name = cls.MLX_LM_CLASS.split(":")
        return getattr(importlib.import_module(f"mlx_lm.models.{module}"), name)

    @classmethod
    def from_layer(cls, layer: nn.Module, backend: str = "auto") -> "DropInLayer":
        """A layer of this class sharing `layer`'s submodules and arrays (weights stay where they are,
        quantized projections stay quantized), its sizes, training mode and frozen parameters."""
        check_choice("backend", backend, BACKENDS)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new._adopt(layer, backend)
        return new

    def _adopt(self, layer: nn.Module, backend: str) -> None:
        for key, value in layer.__dict__.items():
            object.__setattr__(self, key, value)
        self._no_grad = set(layer._no_grad)
        for key, value in layer.items():
            self[key] = value
        self.backend = check_choice("backend", backend, BACKENDS)
        if not hasattr(self, "sharding_group"):
            self.sharding_group = None

    def _backend(self) -> str:
        return self.backend

    def to_mlx_lm(self) -> nn.Module:
        """An instance of the mlx-lm class sharing this layer's submodules, arrays and state."""
        cls = self.mlx_lm_class()
        old = cls.__new__(cls)
        nn.Module.__init__(old)
        for key, value in self.__dict__.items():
            if key not in ("backend", "_joined_conv"):
                object.__setattr__(old, key, value)
        old._no_grad = set(self._no_grad)
        for key, value in self.items():
            old[key] = value
        if "_step" in old.__dict__:
            old._step = None  # a compiled step traced on another object
        return old


@lru_cache(maxsize=None)
def _decode_prep(K: int, Hk: int, Dk: int, masked: bool):
    """Compiled T=1 step from the qkv projection to normalised q, k, v and the new conv state.

    The depthwise convolution over K taps is written as K multiply-adds so that the conv-state
    shift, the convolution and SiLU fuse into one elementwise kernel; q and k share one sum of
    squares and one normalisation kernel that also applies the readout scale.
    """
    key_dim = Hk * Dk
    inv = Dk**-0.5

    def prep(conv_state, qkv, w, *mask):
        # conv_state [B, K-1, C]; qkv [B, 1, C]; w [C, K, 1]; mask [B, 1] bool.
        B, _, C = qkv.shape
        dt = qkv.dtype
        if masked:
            qkv = mx.where(mask[0][..., None], qkv, 0)
        taps = [conv_state[:, j] for j in range(K - 1)] + [qkv[:, 0]]
        acc = taps[0].astype(mx.float32) * w[:, 0, 0].astype(mx.float32)
        for j in range(1, K):
            acc = acc + taps[j].astype(mx.float32) * w[:, j, 0].astype(mx.float32)
        x = nn.silu(acc.astype(dt))  # [B, C], rounded where mlx-lm's conv output is
        x32 = x.astype(mx.float32)
        sq = x32 * x32
        ss = sq[:, : 2 * key_dim].reshape(B, 2 * Hk, Dk).sum(-1, keepdims=True)
        # x / sqrt(sum(x^2) + eps) == rms_norm(x, eps * inv^2) * inv, as mlx-lm's normalize_qk;
        # q also takes the Dk**-0.5 readout scale, so q rows get inv^2 and k rows inv.
        scale = mx.array([inv * inv] * Hk + [inv] * Hk, dtype=mx.float32)[:, None]
        r = mx.rsqrt(ss * (1.0 / Dk) + _QK_EPS * inv * inv)
        qk = (x32[:, : 2 * key_dim].reshape(B, 2 * Hk, Dk) * (r * inv) * (scale / inv)).astype(dt)
        v = x[:, 2 * key_dim :]
        new_conv = mx.concatenate([conv_state[:, 1:], qkv], axis=1) if K > 1 else conv_state
        return qk[:, None, :Hk], qk[:, None, Hk:], v, new_conv

    return mx.compile(prep)


class _GatedDeltaBase(DropInLayer):
    """Everything between the projections, shared by the Qwen3.5 and Qwen3-Next layouts.

    Subclasses define `_project(inputs) -> (qkv [B,S,conv_dim], z [B,S,Hv,Dv], b [B,S,Hv], a [B,S,Hv])`.
    ``backend`` as in `DropInLayer`.
    """

    def _init_common(self, config, backend: str) -> None:
        self.hidden_size = config.hidden_size
        self.num_v_heads = config.linear_num_value_heads
        self.num_k_heads = config.linear_num_key_heads
        self.head_k_dim = config.linear_key_head_dim
        self.head_v_dim = config.linear_value_head_dim
        self.key_dim = self.head_k_dim * self.num_k_heads
        self.value_dim = self.head_v_dim * self.num_v_heads
        if self.num_v_heads % self.num_k_heads != 0:
            raise ValueError(
                f"num_v_heads ({self.num_v_heads}) must be divisible by num_k_heads ({self.num_k_heads})"
            )
        self.conv_kernel_size = config.linear_conv_kernel_dim
        self.layer_norm_epsilon = config.rms_norm_eps
        self.conv_dim = self.key_dim * 2 + self.value_dim
        self.conv1d = nn.Conv1d(
            in_channels=self.conv_dim,
            out_channels=self.conv_dim,
            bias=False,
            kernel_size=self.conv_kernel_size,
            groups=self.conv_dim,
            padding=0,
        )
        self.backend = check_choice("backend", backend, BACKENDS)
        self.sharding_group = None

    def _init_tail(self) -> None:
        self.dt_bias = mx.ones(self.num_v_heads)
        self.A_log = mx.log(mx.random.uniform(low=0, high=16, shape=(self.num_v_heads,)))
        self.norm = RMSNormGated(self.head_v_dim, eps=self.layer_norm_epsilon)
        self.out_proj = nn.Linear(self.value_dim, self.hidden_size, bias=False)

    def _project(self, inputs: mx.array):
        raise NotImplementedError

    # The per-call paths read submodules and arrays as items of the Module's dict, where
    # nn.Module keeps them: `self.name` reaches them only after Python's attribute lookup fails
    # (0.8 us each on the 2-core CI CPU, against 0.05 us), and a decode step pays that for every
    # layer at every token.

    def __call__(self, inputs: mx.array, mask: Optional[mx.array] = None, cache: Optional[Any] = None) -> mx.array:
        """inputs [B, S, hidden]; mask [B, S] bool or None; cache: mlx-lm ArraysCache(size=2) or None.
        Returns [B, S, hidden] in the inputs' dtype; updates the cache in place."""
        B, S, _ = inputs.shape
        if self.sharding_group is not None:
            from mlx.nn.layers.distributed import sum_gradients

            inputs = sum_gradients(self.sharding_group)(inputs)
        qkv, z, b, a = self._project(inputs)
        out = self.mix_norm(qkv, z, a, b, mask, cache)
        out = self["out_proj"](out.reshape(B, S, -1))
        if self.sharding_group is not None:
            out = mx.distributed.all_sum(out, group=self.sharding_group)
        return out

    def mix_norm(self, qkv: mx.array, z: mx.array, a: mx.array, b: mx.array, mask=None, cache=None) -> mx.array:
        """`mix`, then the output norm: ``norm(mix(qkv, a, b, mask, cache), z)`` [B, S, Hv, Dv]. Where
        the fused T=1 step applies and the norm is a gated RMS norm, one launch does both.

        qkv [B, S, conv_dim]; z [B, S, Hv, Dv]; a, b [B, S, Hv]; mask [B, S] or None."""
        if qkv.shape[1] == 1 and not self.training and _cache_lengths(cache) is None:
            norm = _gated_norm(self["norm"], z)
            if norm is not None:
                out = self._fused_step(qkv, a, b, mask, cache, norm)
                if out is not None:
                    return out
        y = self.mix(qkv, a, b, mask, cache)
        if qkv.shape[1] > 1 and not self.training:
            norm = _gated_norm(self["norm"], z)
            if norm is not None:
                # One launch for the norm and its gate (`prefill_step.gated_norm`) on a kernel backend.
                fused = prefill_step.norm_backend(self._backend(), y, norm.z, norm.weight, norm.eps)
                if fused is not None:
                    eps = norm.eps
                    return _with_plain_vjp(
                        lambda y, z, w: prefill_step.gated_norm(fused, y, z, w, eps),
                        lambda y, z, w: _silu_gate(y, z, mx.fast.rms_norm(y, w, eps)),
                    )(y, norm.z, norm.weight)
        return self["norm"](y, z)

    def _sizes(self) -> Tuple[int, int, int, int]:
        return self.num_k_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim

    def _fused_step(self, qkv, a, b, mask, cache, norm=None) -> Optional[mx.array]:
        # The T=1 step in one launch (`decode_step`; with `norm` its norm variant), updating the
        # cache; None (cache untouched) where the fused step does not take the call.
        backend = self._backend()
        if backend == "ops":
            return None
        B = qkv.shape[0]
        if cache is not None and cache[0] is not None:
            conv_state = cache[0]
        else:
            conv_state = mx.zeros((B, self.conv_kernel_size - 1, self.conv_dim), dtype=qkv.dtype)
        state = cache[1] if cache is not None else None
        w = self["conv1d"]["weight"]
        sizes = (self.num_k_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim)
        fused = decode_step.fused_backend(backend, qkv, conv_state, w, a, b, state, mask, *sizes, norm=norm)
        if fused is None:
            return None
        out, new_conv, state = decode_step.decode_step(
            fused, qkv, conv_state, w, a, b, self["A_log"], self["dt_bias"], state, mask, *sizes, norm=norm
        )
        if cache is not None:
            cache[0], cache[1] = new_conv, state
            cache.advance(1)
        return out

    def mix(self, qkv: mx.array, a: mx.array, b: mx.array, mask=None, cache=None) -> mx.array:
        """From projections to the recurrence output: conv-state update, conv, SiLU, split,
        q/k normalisation, gating and the recurrence. At T=1 (inference, no per-sequence lengths)
        on the "metal" or "cuda" backend this is one fused kernel (`mlx_gdn.models.decode_step`).

        qkv [B, S, conv_dim]; a, b [B, S, Hv]; mask [B, S] or None. Returns y [B, S, Hv, Dv].
        """
        B, S, _ = qkv.shape
        lengths = _cache_lengths(cache)
        if S == 1 and not self.training and lengths is None:
            out = self._fused_step(qkv, a, b, mask, cache)
            if out is not None:
                return out
        n_keep = self.conv_kernel_size - 1
        if cache is not None and cache[0] is not None:
            conv_state = cache[0]
        else:
            conv_state = mx.zeros((B, n_keep, self.conv_dim), dtype=qkv.dtype)
        state = cache[1] if cache is not None else None
        backend = self._backend()

        if S == 1 and not self.training and lengths is None:
            w = self["conv1d"]["weight"]
            prep = _decode_prep(self.conv_kernel_size, self.num_k_heads, self.head_k_dim, mask is not None)
            extra = () if mask is None else (mask,)
            q, k, v, new_conv = prep(conv_state, qkv, w, *extra)
            v = v.reshape(B, 1, self.num_v_heads, self.head_v_dim)
            if cache is not None:
                cache[0] = new_conv
        elif (S > 1 and not self.training and lengths is None and (fused := prefill_step.prep_backend(
                backend, qkv, conv_state, self["conv1d"]["weight"], mask, *self._sizes())) is not None):
            # One launch from the projection to contiguous q, k, v (`prefill_step.prep`).
            sizes = self._sizes()
            q, k, v = _with_plain_vjp(
                lambda x, cs, w: prefill_step.prep(fused, x, cs, w, mask, *sizes),
                lambda x, cs, w: _unfused_prep(x, cs, w, mask, *sizes),
            )(qkv, conv_state, self["conv1d"]["weight"])
            if cache is not None:
                cache[0] = prefill_step.conv_tail(qkv, conv_state, mask)
        else:
            conv_out, new_conv = causal_conv(qkv, self["conv1d"], conv_state, n_keep, mask, lengths)
            if cache is not None:
                cache[0] = new_conv
            q, k, v = mx.split(conv_out, [self.key_dim, 2 * self.key_dim], -1)
            q = q.reshape(B, S, self.num_k_heads, self.head_k_dim)
            k = k.reshape(B, S, self.num_k_heads, self.head_k_dim)
            v = v.reshape(B, S, self.num_v_heads, self.head_v_dim)
            q, k = normalize_qk(q, k, eps=_QK_EPS)

        out, state = gated_delta_update(
            q, k, v, a, b, self["A_log"], self["dt_bias"], state, mask, backend=backend
        )
        if cache is not None:
            cache[1] = state
            cache.advance(S)
        return out


# The Qwen3.5 layout's input projections, in the order `merge_projections` stacks them.
_PROJECTIONS = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")


class GatedDeltaNet(_GatedDeltaBase):
    """Qwen3.5 / Qwen3.5-MoE Gated DeltaNet layer (mlx-lm ``qwen3_5.GatedDeltaNet`` layout).

    config: the model's text args (hidden_size, linear_num_value_heads, linear_num_key_heads,
    linear_key_head_dim, linear_value_head_dim, linear_conv_kernel_dim, rms_norm_eps).
    Call: ``layer(inputs [B, S, hidden], mask=None, cache=None) -> [B, S, hidden]``.
    """

    MLX_LM_CLASS = "qwen3_5:GatedDeltaNet"

    def __init__(self, config, backend: str = "auto"):
        super().__init__()
        self._init_common(config, backend)
        self.in_proj_qkv = nn.Linear(self.hidden_size, self.key_dim * 2 + self.value_dim, bias=False)
        self.in_proj_z = nn.Linear(self.hidden_size, self.value_dim, bias=False)
        self.in_proj_b = nn.Linear(self.hidden_size, self.num_v_heads, bias=False)
        self.in_proj_a = nn.Linear(self.hidden_size, self.num_v_heads, bias=False)
        self._init_tail()

    def _project(self, inputs):
        B, S, _ = inputs.shape
        if B * S == 1 and not self.training:
            merged = self._merged_projection()
            if merged is not None:
                # One matmul; at B * S = 1 each part is a contiguous slice of its output.
                out = merged(inputs)
                c1 = self.conv_dim
                c2 = c1 + self.value_dim
                c3 = c2 + self.num_v_heads
                z = out[..., c1:c2].reshape(B, S, self.num_v_heads, self.head_v_dim)
                return out[..., :c1], z, out[..., c2:c3], out[..., c3:]
        qkv = self["in_proj_qkv"](inputs)
        z = self["in_proj_z"](inputs).reshape(B, S, self.num_v_heads, self.head_v_dim)
        return qkv, z, self["in_proj_b"](inputs), self["in_proj_a"](inputs)

    def merge_projections(self) -> bool:
        """Put the four input projections' arrays in one buffer per array name, each projection's
        array becoming a row slice of it (a view: no second copy of the weights, once the old arrays
        have no other owner), so a single-token call (B * S = 1) runs one matmul instead of four.

        Takes effect while the four projections are plain ``nn.Linear`` or ``nn.QuantizedLinear``
        (same group size, bits and mode) holding exactly the arrays this call put there: replacing a
        projection or any of its arrays (loading weights, quantizing, LoRA, sharding, gradient
        tracing) silently returns the layer to four matmuls. Returns whether the merge was made.
        """
        mods = [self[n] for n in _PROJECTIONS]
        cls = type(mods[0])
        if cls not in (nn.Linear, nn.QuantizedLinear) or any(type(m) is not cls for m in mods):
            return False
        keys = tuple(sorted(k for k, v in mods[0].items() if isinstance(v, mx.array)))
        if any(tuple(sorted(k for k, v in m.items() if isinstance(v, mx.array))) != keys for m in mods):
            return False
        if cls is nn.QuantizedLinear and len({(m.group_size, m.bits, m.mode) for m in mods}) != 1:
            return False
        merged = cls.__new__(cls)
        nn.Module.__init__(merged)
        merged.__dict__.update({k: v for k, v in mods[0].__dict__.items() if k != "_no_grad"})
        cats = {k: mx.concatenate([m[k] for m in mods], axis=0) for k in keys}
        mx.eval(cats)
        for k, v in cats.items():
            merged[k] = v
        at = 0
        for m in mods:
            rows = m["weight"].shape[0]
            for k in keys:
                m[k] = cats[k][at : at + rows]
            at += rows
        mx.eval([m[k] for m in mods for k in keys])
        held = tuple((m, tuple(m[k] for k in keys)) for m in mods)
        object.__setattr__(self, "_merged_proj", (merged, keys, held))
        return True

    def _merged_projection(self) -> Optional[nn.Module]:
        # The merged projection while the four projections still hold the arrays
        # `merge_projections` gave them; else None, and the merged buffer is let go.
        entry = self.__dict__.get("_merged_proj")
        if entry is None:
            return None
        merged, keys, held = entry
        for name, (mod, arrays) in zip(_PROJECTIONS, held):
            if self[name] is not mod or any(mod[k] is not a for k, a in zip(keys, arrays)):
                object.__setattr__(self, "_merged_proj", None)
                return None
        return merged


class Qwen3NextGatedDeltaNet(_GatedDeltaBase):
    """Qwen3-Next Gated DeltaNet layer (mlx-lm ``qwen3_next.Qwen3NextGatedDeltaNet`` layout:
    per-key-head interleaved ``in_proj_qkvz`` and ``in_proj_ba``). Same call as `GatedDeltaNet`."""

    MLX_LM_CLASS = "qwen3_next:Qwen3NextGatedDeltaNet"

    def __init__(self, config, backend: str = "auto"):
        super().__init__()
        self._init_common(config, backend)
        self.in_proj_qkvz = nn.Linear(self.hidden_size, self.key_dim * 2 + self.value_dim * 2, bias=False)
        self.in_proj_ba = nn.Linear(self.hidden_size, self.num_v_heads * 2, bias=False)
        self._init_tail()

    def fix_query_key_value_ordering(self, mixed_qkvz: mx.array, mixed_ba: mx.array) -> Tuple[mx.array, ...]:
        """Split the per-key-head interleaved projections into q, k [B,S,Hk,Dk], v, z [B,S,Hv,Dv], b, a [B,S,Hv]."""
        nk, dn, nv, dv = self.num_k_heads, self.head_k_dim, self.num_v_heads, self.head_v_dim
        mixed_qkvz = mixed_qkvz.reshape(*mixed_qkvz.shape[:-1], nk, -1)
        mixed_ba = mixed_ba.reshape(*mixed_ba.shape[:-1], nk, -1)
        q, k, v, z = mx.split(mixed_qkvz, [dn, 2 * dn, 2 * dn + nv // nk * dv], axis=-1)
        b, a = mx.split(mixed_ba, [nv // nk], axis=-1)
        return (
            q,
            k,
            v.reshape(*v.shape[:2], -1, dv),
            z.reshape(*z.shape[:2], -1, dv),
            b.reshape(*b.shape[:2], nv),
            a.reshape(*a.shape[:2], nv),
        )

    def _project(self, inputs):
        B, S, _ = inputs.shape
        q, k, v, z, b, a = self.fix_query_key_value_ordering(self["in_proj_qkvz"](inputs), self["in_proj_ba"](inputs))
        qkv = mx.concatenate([q.reshape(B, S, -1), k.reshape(B, S, -1), v.reshape(B, S, -1)], axis=-1)
        return qkv, z, b, a



class _KeyGatedBase(DropInLayer):
    """Layers with one decay gate per key column (Kimi Linear, Kimi K3, Bailing MoE V3).

    Sizes read at every call (so `model.shard` may change them): ``num_heads`` H and ``head_dim``
    D (keys and values alike); ``A_log`` holds H rates in any shape, ``dt_bias`` H * D biases.
    Construct with the mlx-lm class's arguments (``Class(args, ...)``, plus ``backend=``) or
    adopt a loaded layer with `from_layer`.
    """

    lower_bound = None
    # Backends whose fused T=1 step this family takes (`_fused_step`); elsewhere the unfused step runs.
    FUSED_STEP_BACKENDS = ("metal", "cuda")

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__()
        self._adopt(self.mlx_lm_class()(*args, **kwargs), backend)

    def _recur(self, q, k, v, a, b, state, mask):
        """q, k, v [B, T, H, D] after the convolution; a [B, T, H*D]; b [B, T, H].
        Returns y [B, T, H, D] and the new state [B, H, D, D]."""
        B, T, H, D = q.shape
        q, k = normalize_qk(q, k, eps=_QK_EPS)
        return gated_delta_update(
            q, k, v, a.reshape(B, T, H, D), b,
            self["A_log"].reshape(H, 1), self["dt_bias"].reshape(H, D),
            state, mask, lower_bound=self.lower_bound, backend=self._backend(),
        )

    def _fused_step(self, qkv, conv_state, w, a, b, state, mask, gate):
        """The T=1 step from the projections to the output gate in one launch (`decode_step`,
        per-key gates): qkv [B, 1, 3*H*D] (q | k | v), conv_state [B, K-1, 3*H*D] or None,
        w [3*H*D, K, 1], a [B, 1, H*D], b [B, 1, H], gate [B, 1, H*D] (the output gate's logits).
        Returns (out, new conv state, new state, normed): out is the gated output norm [B, 1, H, D]
        where the kernel applied it (normed True: an nn.RMSNorm ``o_norm``), else y [B, 1, H, D]
        for `_gate_output`; or None where the fused step does not take the call (the caller then
        runs its unfused step)."""
        backend = self._backend()
        if backend == "ops":
            return None
        B = qkv.shape[0]
        H, D = self.num_heads, self.head_dim
        if conv_state is None:
            conv_state = mx.zeros((B, w.shape[1] - 1, qkv.shape[-1]), dtype=qkv.dtype)
        a = a.reshape(B, 1, H, D)
        A_log, dt_bias = self["A_log"].reshape(H), self["dt_bias"].reshape(H, D)
        args = (qkv, conv_state, w, a, b, state, mask, H, H, D, D)
        opts = dict(A_log=A_log, dt_bias=dt_bias, lower_bound=self.lower_bound)
        norm = self._output_norm(gate.reshape(B, 1, H, D), qkv.dtype)
        for norm in (norm, None) if norm is not None else (None,):  # the norm inside where it can be
            fused = decode_step.fused_backend(backend, *args, norm=norm, **opts)
            if fused is not None and fused not in self.FUSED_STEP_BACKENDS:
                return None
            if fused is not None:
                out, conv, state = decode_step.decode_step(fused, qkv, conv_state, w, a, b, A_log, dt_bias, state, mask,
                                                           H, H, D, D, norm=norm, lower_bound=self.lower_bound)
                return out, conv, state, norm is not None
        return None

    def _output_norm(self, z, y_dtype) -> Optional["decode_step.Norm"]:
        """The fused step's `decode_step.Norm` for this layer's output norm and gate z [B, 1, H, D]
        (mx.fast.rms_norm of y in `y_dtype`, times the weight, times sigmoid(z)) where ``o_norm`` is
        an nn.RMSNorm; else None (another norm runs as itself)."""
        norm = self["o_norm"]
        if type(norm) is not nn.RMSNorm:
            return None
        return decode_step.Norm(z, norm["weight"], norm.eps, self._sigmoid_dtype(z.dtype, y_dtype, norm["weight"].dtype))

    def _sigmoid_dtype(self, z_dtype, y_dtype, weight_dtype):
        # The Kimi layers take mx.sigmoid of the gate in its own dtype.
        return z_dtype

    def _fused_split_step(self, xs, states, ws, a, b, mask, gate):
        """`_fused_step` for a layer with separate q, k and v convs (Kimi Linear, Bailing): the
        three projections [B, 1, H*D] and conv states [B, K-1, H*D] (None: zeros) side by side,
        the three conv weights joined once and kept while they are the same arrays; states[3] is
        the recurrent state. Returns (out, [q, k, v conv states] (views of one array), state,
        normed) or None."""
        P = self.num_heads * self.head_dim
        w = self._joined_conv_weight(ws)
        conv_state = None if any(c is None for c in states[:3]) else mx.concatenate(states[:3], axis=-1)
        step = self._fused_step(mx.concatenate(xs, axis=-1), conv_state, w, a, b, states[3], mask, gate)
        if step is None:
            return None
        out, conv, state, normed = step
        return out, [conv[..., :P], conv[..., P : 2 * P], conv[..., 2 * P :]], state, normed

    def _split_conv_mix(self, xs, convs, a, b, b_recur, gate, mask, cache) -> mx.array:
        """From the projections to the gated output [B, T, H*D] of a layer with a convolution each
        for q, k and v (Kimi Linear, Bailing): the fused T=1 step where it applies, else the three
        convs and the recurrence (taking b as `b_recur`). xs: the q, k, v projections [B, T, H*D];
        convs: their depthwise Conv1d modules; cache: mlx-lm ArraysCache(size=4) or None."""
        B, T, _ = xs[0].shape
        H, D = self.num_heads, self.head_dim
        n_keep = convs[0]["weight"].shape[1] - 1
        lengths = _cache_lengths(cache)
        states = [cache[i] for i in range(4)] if cache is not None else [None] * 4
        step, normed = None, False
        if _decoding(self, T, cache):
            step = self._fused_split_step(xs, states, [c["weight"] for c in convs], a, b, mask, gate)
        if step is not None:
            out, states[:3], states[3], normed = step
        else:
            qkv = []
            for i in range(3):
                y, states[i] = causal_conv(xs[i], convs[i], states[i], n_keep, mask, lengths)
                qkv.append(y.reshape(B, T, H, D))
            out, states[3] = self._recur(*qkv, a, b_recur, states[3], mask)
        if cache is not None:
            for i in range(4):
                cache[i] = states[i]
            cache.advance(T)
        return self._gate_output(out, gate, normed)

    def _joined_conv_weight(self, ws) -> mx.array:
        # Not a Module attribute (it would become a parameter): the joined copy is derived data.
        held = self.__dict__.get("_joined_conv")
        if held is None or len(held[0]) != len(ws) or any(x is not y for x, y in zip(held[0], ws)):
            held = (tuple(ws), mx.concatenate(ws, axis=0))
            object.__setattr__(self, "_joined_conv", held)
        return held[1]

    def _gate_output(self, out, gate, normed=False):
        """o_norm(out) * sigmoid(gate) over [B, T, H, D] (out as it is where the fused step
        `normed` it); returns [B, T, H*D]."""
        B, T = out.shape[:2]
        if normed:
            return out.reshape(B, T, -1)
        return (self["o_norm"](out) * mx.sigmoid(gate.reshape(out.shape))).reshape(B, T, -1)


def _decoding(layer: DropInLayer, T: int, cache) -> bool:
    # Where a drop-in layer tries its fused T=1 step: one token, inference, no per-sequence lengths.
    return T == 1 and not layer.training and _cache_lengths(cache) is None


class KimiDeltaAttention(_KeyGatedBase):
    """Kimi Linear delta attention (mlx-lm ``kimi_linear.KimiDeltaAttention``): separate q, k, v
    projections each with a short conv, low-rank decay and output gates.

    Call: ``layer(x [B, T, hidden], mask=None, cache=None) -> [B, T, hidden]``; cache: mlx-lm
    ArraysCache(size=4) (q, k, v conv states, recurrent state)."""

    MLX_LM_CLASS = "kimi_linear:KimiDeltaAttention"

    def __call__(self, x: mx.array, mask: Optional[mx.array] = None, cache: Optional[Any] = None) -> mx.array:
        xs = [self[f"{name}_proj"](x) for name in "qkv"]
        a = self["f_b_proj"](self["f_a_proj"](x))
        b = self["b_proj"](x)
        gate = self["g_b_proj"](self["g_a_proj"](x))
        convs = [self[f"{name}_conv"]["conv"] for name in "qkv"]
        return self["o_proj"](self._split_conv_mix(xs, convs, a, b, b, gate, mask, cache))


class KimiK3DeltaAttention(_KeyGatedBase):
    """Kimi K3 delta attention (mlx-lm ``kimi_k3.KimiK3DeltaAttention``): one fused qkv projection
    and conv, decay gates with ``lower_bound``, a low-rank or full-rank output gate.

    Call as `KimiDeltaAttention`; cache: mlx-lm ArraysCache(size=2) (conv state, recurrent state)."""

    MLX_LM_CLASS = "kimi_k3:KimiK3DeltaAttention"
    # On the H200 (8023510) a patched tiny Kimi K3 model served by mlx-lm's BatchGenerator on the
    # fused step gave a request greedy tokens other than the same prompt generated alone; with the
    # same seed under the Metal simulator the two agree to 1e-7 in log-probabilities, and the step
    # itself matches the reference on the GPU (tests/test_decode_layer.py). Until a GPU run
    # explains the difference, K3 decodes on CUDA through the unfused step (bench/NOTES.md).
    FUSED_STEP_BACKENDS = ("metal",)

    def __call__(self, x: mx.array, mask: Optional[mx.array] = None, cache: Optional[Any] = None) -> mx.array:
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        conv_state, state = (cache[0], cache[1]) if cache is not None else (None, None)
        qkv_x = self["qkv_proj"](x)
        a = self["f_b_proj"](self["f_a_proj"](x))
        b = self["b_proj"](x)
        gate = self["g_proj"](x) if self.use_full_rank_gate else self["g_b_proj"](self["g_a_proj"](x))
        conv = self["qkv_conv"]["conv"]
        step, normed = None, False
        if _decoding(self, T, cache):
            step = self._fused_step(qkv_x, conv_state, conv["weight"], a, b, state, mask, gate)
        if step is not None:
            out, conv_state, state, normed = step
        else:
            qkv, conv_state = causal_conv(qkv_x, conv, conv_state, self.conv_kernel - 1, mask, _cache_lengths(cache))
            q, k, v = mx.split(qkv.reshape(B, T, 3, H, D), 3, axis=2)
            out, state = self._recur(q[:, :, 0], k[:, :, 0], v[:, :, 0], a, b, state, mask)
        if cache is not None:
            cache[0], cache[1] = conv_state, state
            cache.advance(T)
        return self["o_proj"](self._gate_output(out, gate, normed))


class BailingKDA(_KeyGatedBase):
    """Bailing MoE V3 (Ling) delta attention (mlx-lm ``bailing_moe_v3.BailingKDA``): q, k, v
    projections with their own convs, full-rank decay gate with ``lower_bound``, output gate.

    Call as `KimiDeltaAttention`; cache: mlx-lm ArraysCache(size=4)."""

    MLX_LM_CLASS = "bailing_moe_v3:BailingKDA"

    def __call__(self, x: mx.array, mask: Optional[mx.array] = None, cache: Optional[Any] = None) -> mx.array:
        xs = [self[f"{name}_proj"](x) for name in "qkv"]
        a = self["f_proj"](x)
        b = self["b_proj"](x)  # the kernels read it as float32 either way
        gate = self["g_proj"](x)
        convs = [self[f"{name}_conv1d"] for name in "qkv"]
        # b in float32 on the unfused path, as the mlx-lm layer passes it
        return self["o_proj"](self._split_conv_mix(xs, convs, a, b, b.astype(mx.float32), gate, mask, cache))

    def _gate_output(self, out, gate, normed=False):
        """o_norm(out) * sigmoid(gate), the sigmoid in float32 rounded to the norm's dtype, as the
        mlx-lm layer does; returns [B, T, H*D]."""
        B, T = out.shape[:2]
        if normed:
            return out.reshape(B, T, -1)
        out = self["o_norm"](out)
        return (out * mx.sigmoid(gate.reshape(out.shape).astype(mx.float32)).astype(out.dtype)).reshape(B, T, -1)

    def _sigmoid_dtype(self, z_dtype, y_dtype, weight_dtype):
        # Bailing takes the sigmoid in float32 and rounds it to the norm's output dtype.
        return decode_step.norm_dtype(y_dtype, weight_dtype)


class OlmoHybridGatedDeltaNet(DropInLayer):
    """OLMo Hybrid Gated DeltaNet (mlx-lm ``olmo_hybrid.GatedDeltaNet``): q, k, v projections with
    their own convs, scalar gates, beta in [0, 2] with ``allow_neg_eigval``.

    Unlike the mlx-lm layer, padding never reaches the conv state or the convolution (mlx-lm's
    convolves pad tokens into the first real ones and keeps them in the conv state).
    Call: ``layer(x [B, S, hidden], mask=None, cache=None) -> [B, S, hidden]``; cache: mlx-lm
    ArraysCache(size=4). Construct with ``OlmoHybridGatedDeltaNet(args, backend=...)`` or
    `from_layer`."""

    MLX_LM_CLASS = "olmo_hybrid:GatedDeltaNet"

    def __init__(self, args, backend: str = "auto"):
        super().__init__()
        self._adopt(self.mlx_lm_class()(args), backend)

    def __call__(self, x: mx.array, mask: Optional[mx.array] = None, cache: Optional[Any] = None) -> mx.array:
        B, S, _ = x.shape
        n_keep = self.conv_kernel_size - 1
        lengths = _cache_lengths(cache)
        states = [cache[i] for i in range(4)] if cache is not None else [None] * 4
        heads = (self.num_k_heads, self.num_k_heads, self.num_v_heads)
        dims = (self.head_k_dim, self.head_k_dim, self.head_v_dim)
        qkv = []
        for i, name in enumerate("qkv"):
            y, states[i] = causal_conv(self[f"{name}_proj"](x), self[f"{name}_conv1d"], states[i], n_keep,
                                       mask, lengths)
            qkv.append(y.reshape(B, S, heads[i], dims[i]))
        q, k = normalize_qk(qkv[0], qkv[1], eps=_QK_EPS)
        out, states[3] = gated_delta_update(
            q, k, qkv[2], self["a_proj"](x), self["b_proj"](x), self["A_log"], self["dt_bias"], states[3], mask,
            allow_neg_eigval=self.allow_neg_eigval, backend=self._backend(),
        )
        if cache is not None:
            for i in range(4):
                cache[i] = states[i]
            cache.advance(S)
        Dv = self.head_v_dim
        out = self["o_norm"](out.reshape(-1, Dv), self["g_proj"](x).reshape(-1, Dv))
        return self["o_proj"](out.reshape(B, S, -1))
