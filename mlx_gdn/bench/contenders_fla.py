"""fla's Triton kernels through torch on the same NVIDIA GPU, with conventions translated.

fla takes g in log space, applies `scale` to q itself (we pass 1.0: q arrives prescaled) and keeps
the state as [N, HV, K, V]; this package keeps [B, Hv, Dv, Dk]. The bridge (array conversion and
sync) is a parameter so the translation can be tested without torch.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional

import numpy as np

from .contender import Contender
from .inputs import InputSet


class TorchBridge:
    """Moves float32 NumPy arrays to CUDA tensors of a dtype and back; syncs the device."""

    def __init__(self, torch):
        self.torch = torch

    def to_device(self, x: np.ndarray, dtype: str):
        t = self.torch
        return t.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device="cuda", dtype=getattr(t, dtype))

    def to_numpy(self, x) -> np.ndarray:
        return x.detach().float().cpu().numpy()

    def sync(self, out) -> None:
        self.torch.cuda.synchronize()


def _np32(x) -> np.ndarray:
    import mlx.core as mx

    return np.array(x.astype(mx.float32), dtype=np.float32)


def make_fla_contender(name: str, fn: Callable, bridge: Any, description: str = "") -> Contender:
    """A Contender calling an fla-style `fn(q, k, v, g, beta, scale=, initial_state=, ...)`."""

    def prepare(s: InputSet):
        dt = str(s.q.dtype).rsplit(".", 1)[-1]
        q, k, v = (bridge.to_device(_np32(x), dt) for x in (s.q, s.k, s.v))
        # fla wants the log-decay; taken from the raw gate inputs so a decay that underflows
        # to 0 in float32 stays finite: log g = -exp(A_log) * softplus(a + dt_bias).
        x = _np32(s.a).astype(np.float64) + _np32(s.dt_bias)
        g = bridge.to_device(-np.exp(_np32(s.A_log).astype(np.float64)) * np.logaddexp(0.0, x), "float32")
        beta = bridge.to_device(_np32(s.beta), dt)
        h0 = bridge.to_device(np.swapaxes(_np32(s.state), -1, -2), "float32")  # [B,Hv,Dk,Dv]
        return lambda: fn(
            q, k, v, g=g, beta=beta, scale=1.0, initial_state=h0,
            output_final_state=True, use_qk_l2norm_in_kernel=False,
        )

    def result(out):
        y, ht = out
        return bridge.to_numpy(y), np.swapaxes(bridge.to_numpy(ht), -1, -2)

    return Contender(
        name=name, family="fla", gating="precomputed", prepare=prepare,
        description=description, sync=bridge.sync, result=result,
    )


def fla_contenders(torch_mod: Optional[Any] = None) -> List[Contender]:
    """fla's fused_recurrent and chunk kernels when torch sees a CUDA GPU and fla imports."""
    try:
        torch = torch_mod or __import__("torch")
        if not torch.cuda.is_available():
            return []
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    except Exception:
        return []
    try:
        import fla

        ver = getattr(fla, "__version__", "?")
    except Exception:  # pragma: no cover
        ver = "?"
    bridge = TorchBridge(torch)
    return [
        make_fla_contender("fla fused_recurrent", fused_recurrent_gated_delta_rule, bridge,
                           f"fla {ver} fused_recurrent_gated_delta_rule (torch {torch.__version__})"),
        make_fla_contender("fla chunk", chunk_gated_delta_rule, bridge,
                           f"fla {ver} chunk_gated_delta_rule (torch {torch.__version__})"),
    ]
