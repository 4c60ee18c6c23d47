"""The CUDA chunked form: a tensor-core kernel pair and its shared-memory arithmetic. Scalar gates,
masks, GQA, fused or precomputed gating.

Sources in kernels/chunked/: common.cuh, then kkt_solve.cuh, wy.cuh, state.cuh and state_regs.cuh
(see common.cuh for what each holds), and one body per launch: kkt_solve_wy.cu (stages kkt_solve
and wy, every chunk in parallel), then state_output.cu or state_output_regs.cu (stages state and
output, chunks in order).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import mlx.core as mx

from .. import launch
from ..validate import Problem
from .kernel import _dummy, _kernel, source_text

CHUNK = 64  # tokens per chunk (gdn_tc::C), as the ops form on a GPU (ops.chunked.CHUNK)
THREADS = 128  # threads per block of launch 1 (gdn_tc::NTHREADS); the state launch has 128 NH
SMEM_LIMIT = 232448  # dynamic shared memory one block may use on Hopper (227 KiB)
CHUNKED_DIMS = (64, 128, 192, 256)
# Value rows per block of the state pass: None picks by parallelism (`_choose_bv`);
# the benchmark sets it to compare.
CHUNK_BV: Optional[int] = None
# Aim for at least this many state-pass blocks (H100: 132 SMs) before narrowing the slice.
MIN_STATE_BLOCKS = 128
# Value-slice width from which the state launch runs 8 warps instead of 4 (`state_nh`).
STATE_NH2_FROM = 32
# The state pass with S in registers (gdn_tc::state_output_regs, bf16/f16, Dk <= 128) in place of
# the shared-memory one: None chooses by shape (`_regs_config`), True takes it wherever it
# applies, False never. Every block of it loads whole chunks for its 16 value rows per warp, so
# it pays where blocks are wide: on the H100 (bench/NOTES.md, "Session 5"; Qwen3.5 shape,
# T=4096) it ran the B=4 call in 0.91 ms of GPU wait against 1.13 (8 warps), B=2 in 0.58 against
# 0.66 (4 warps), and lost at B=1 (2 warps: 0.58 against 0.44).
STATE_REGS: Optional[bool] = None
# The narrowest block the shape-chosen register pass runs (`STATE_REGS = None`).
STATE_REGS_MIN_WARPS = 4
# Warps per block of that launch: None picks by parallelism (`_regs_config`); tests set it.
STATE_REGS_NW: Optional[int] = None


# Header of every chunked launch, in order: the gate math shared with every other kernel, the
# helpers every stage uses, then the stages.
HEADERS = (launch.GATES_HEADER,) + tuple(
    f"chunked/{f}.cuh" for f in ("common", "kkt_solve", "wy", "state", "state_regs"))


@lru_cache(maxsize=None)
def header() -> str:
    """The header text of the chunked launches (`HEADERS`, compacted); one object per process."""
    return "".join(source_text(h) for h in HEADERS)


def supports_chunked(p: Problem) -> bool:
    """Dk and Dv in {64, 128, 192, 256}, grid axes within CUDA's limits; per-key gates where
    launch 1's per-key arrays fit in shared memory (Dk <= 128 at Dv <= 256)."""
    key = p.gate == "key"
    if key and kkt_solve_wy_smem(p.Dk, p.Dv, p.dtype == mx.float32, key=True) > SMEM_LIMIT:
        return False
    return (
        p.Dk in CHUNKED_DIMS
        and p.Dv in CHUNKED_DIMS
        and p.Hv <= 65535
        and p.B <= 65535
        and _state_config(p) is not None
    )


KKT_WY_INPUTS = ("q", "k", "v", "gate_a", "gate_b", "A_log", "dt_bias", "lower_bound", "mask")
KKT_WY_OUTPUTS = ("W", "U", "Aqk", "G")
STATE_INPUTS = ("q", "k", "W", "U", "Aqk", "G", "state_in", "mask")
# Per-key gates: launch 1 also gives the state pass its Q and K with the decays applied per column
# (Qg, Kd) and each chunk's decay per column (Gk), which the state pass reads in place of q, k.
KKT_WY_KEY_OUTPUTS = KKT_WY_OUTPUTS + ("Qg", "Kd", "Gk")
STATE_KEY_INPUTS = ("Qg", "Kd", "W", "U", "Aqk", "G", "state_in", "mask", "Gk")
STATE_OUTPUTS = ("y", "state_out")


def _ld(exact: bool, D: int) -> int:
    return D + (4 if exact else 8)  # gdn_tc::Ld


def kkt_solve_wy_smem(Dk: int, Dv: int, exact: bool, key: bool = False) -> int:
    """Bytes of shared memory of launch 1 (gdn_tc::kkt_solve_wy_smem, plus gdn_tc::key_smem for
    per-key gates)."""
    if key:
        return kkt_solve_wy_smem(Dk, Dv, exact) + (3 * CHUNK * Dk + 6 * Dk) * 4
    es = 4 if exact else 2
    lk, lv = _ld(exact, Dk), _ld(exact, Dv)
    return (CHUNK * lk + CHUNK * max(lk, lv)) * es + (2 * CHUNK * (CHUNK + 4) + 3 * CHUNK + 8) * 4


def state_smem(Dk: int, BV: int, exact: bool, share_wq: bool) -> int:
    """Bytes of shared memory of the state launch (gdn_tc::state_smem)."""
    es = 4 if exact else 2
    lk = _ld(exact, Dk)
    return (BV * (Dk + 8) * 4 + (2 if share_wq else 3) * CHUNK * lk * es + CHUNK * (BV + 4) * 4
            + (CHUNK * _ld(exact, CHUNK) + CHUNK * _ld(exact, BV)) * es + 3 * CHUNK * 4)


def state_nh(bv: int) -> int:
    """Warp groups of the state launch: slices of 32 rows or more get 8 warps (two per token
    strip). A 128-row slice needs them (4 warps would hold twice the accumulators each). On the
    H100, 64-row slices ran faster on 8 warps; 32-row slices ran even at B=1 (where they are
    chosen) and slower at B=4 (where 128 is chosen) (bench/NOTES.md, "Session 3")."""
    return 2 if bv >= STATE_NH2_FROM else 1


def _choose_bv(p: Problem) -> int:
    # The widest slice that still gives about one block per SM: each block walks the chunks in
    # order, so blocks beyond one wave run a second full chain.
    if CHUNK_BV is not None and p.Dv % CHUNK_BV == 0:
        return CHUNK_BV
    for bv in (128, 64, 32, 16):
        if p.Dv % bv == 0 and p.B * p.Hv * (p.Dv // bv) >= MIN_STATE_BLOCKS:
            return bv
    return 16


def _state_config(p: Problem):
    """(BV, SHARE_WQ, smem) for the state launch, or None when nothing fits in shared memory."""
    exact = p.dtype == mx.float32
    first = _choose_bv(p)
    extra = 4 * p.Dk if p.gate == "key" else 0  # the chunk's decay per key column
    for bv in [first] + [b for b in (64, 32, 16) if b < first]:
        for share in (False, True):
            smem = state_smem(p.Dk, bv, exact, share) + extra
            if smem <= SMEM_LIMIT:
                return bv, share, smem
    return None


def state_regs_smem(Dk: int, BV: int) -> int:
    """Bytes of shared memory of the register-state launch (gdn_tc::state_regs_smem): two stages of
    W, Q, K rows, Aqk, the U slice (bf16) and G."""
    lk, la, lu = _ld(False, Dk), _ld(False, CHUNK), _ld(False, BV)
    return 2 * ((3 * CHUNK * lk + CHUNK * la + CHUNK * lu) * 2 + CHUNK * 4)


def _regs_config(p: Problem):
    """(warps, smem) of the register-state launch, or None where the shared-memory pass runs.
    Each warp owns 16 value rows; blocks of up to 8 warps, as wide as still gives
    MIN_STATE_BLOCKS blocks. By shape (STATE_REGS None) only blocks of STATE_REGS_MIN_WARPS or more."""
    if STATE_REGS is False or p.dtype == mx.float32 or p.Dk not in (64, 128) or p.gate == "key":
        return None
    nw = STATE_REGS_NW or next(
        (w for w in (8, 4, 2) if p.Dv % (16 * w) == 0 and p.B * p.Hv * (p.Dv // (16 * w)) >= MIN_STATE_BLOCKS), 1)
    if STATE_REGS is None and nw < STATE_REGS_MIN_WARPS:
        return None
    smem = state_regs_smem(p.Dk, 16 * nw)
    return (nw, smem) if p.Dv % (16 * nw) == 0 and smem <= SMEM_LIMIT else None


def _kkt_wy_launch(p: Problem, lower: bool, neg: bool, dt_key: bool):
    """(kernel name, body file, outputs, template, shared memory bytes) of the kkt_solve + wy launch."""
    exact = p.dtype == mx.float32
    template = [("Dk", p.Dk), ("Dv", p.Dv), ("EXACT", exact), ("FUSED", p.fused), ("MASKED", p.masked),
                ("HAS_LB", bool(p.fused and lower)), ("NEG", bool(p.fused and neg))]
    if p.gate == "key":
        return ("gdn_cuda_chunked_kkt_solve_wy_key", "chunked/kkt_solve_wy_key.cu", KKT_WY_KEY_OUTPUTS,
                template + [("DT_KEY", bool(p.fused and dt_key))], kkt_solve_wy_smem(p.Dk, p.Dv, exact, key=True))
    return ("gdn_cuda_chunked_kkt_solve_wy", "chunked/kkt_solve_wy.cu", KKT_WY_OUTPUTS, template,
            kkt_solve_wy_smem(p.Dk, p.Dv, exact))


def _state_launch(p: Problem, save_every: int = 0):
    """(kernel name, body file, inputs, threads per block, value rows per block, template, shared
    memory bytes) of the state + output launch; `save_every` > 0 takes the body that also writes
    the state after every save_every-th full chunk (output "saved")."""
    exact = p.dtype == mx.float32
    save = [("SAVE_EVERY", save_every)] if save_every else []
    tail = "_save" if save_every else ""
    regs = None if p.gate == "key" else _regs_config(p)
    if regs is not None:  # S in registers: 16 value rows per warp
        nw, smem = regs
        template = [("Dk", p.Dk), ("Dv", p.Dv), ("NW", nw), ("MASKED", p.masked)] + save
        return (f"gdn_cuda_chunked_state_output_regs{tail}", f"chunked/state_output_regs{tail}.cu", STATE_INPUTS,
                32 * nw, 16 * nw, template, smem)
    rows, share, smem = _state_config(p)
    template = [("Dk", p.Dk), ("Dv", p.Dv), ("BV", rows), ("EXACT", exact), ("MASKED", p.masked),
                ("SHARE_WQ", share), ("NH", state_nh(rows))] + save
    if p.gate == "key":  # per-key gates take the shared-memory pass
        return (f"gdn_cuda_chunked_state_output_key{tail}", f"chunked/state_output_key{tail}.cu", STATE_KEY_INPUTS,
                THREADS * state_nh(rows), rows, template, smem)
    return (f"gdn_cuda_chunked_state_output{tail}", f"chunked/state_output{tail}.cu", STATE_INPUTS,
            THREADS * state_nh(rows), rows, template, smem)


def chunked_variants(p: Problem, *, lower: bool = False, neg: bool = False, dt_key: bool = False):
    """The (kkt_solve + wy, state + output) kernel variants (`fallback.Variant`) of a call on `p`."""
    from ..fallback import variant

    hdr = header()
    kname, body, _, template, smem = _kkt_wy_launch(p, lower, neg, dt_key)
    sname, sbody, _, _, _, stemplate, ssmem = _state_launch(p)
    return (
        variant(kname, template, hdr, source_text(body), str(smem)),
        variant(sname, stemplate, hdr, source_text(sbody), str(ssmem)),
    )


def run_chunked(p: Problem, q, k, v, state, mask, *, g=None, beta=None, gating=None, save_every: int = 0):
    """(y, state) from the two chunked launches; g [B,T,Hv] or [B,T,Hv,Dk] (or `gating`, a per-head or
    per-key a), see `supports_chunked`. Per-key gates take the shared-memory state pass.

    save_every = E > 0: (y, state, saved), saved [B, T // (64 E), Hv, Dv, Dk] float32 the state after
    tokens 64 E, 128 E, ... (a partial last chunk ends no saved state)."""
    if save_every < 0:
        raise ValueError(f"save_every: expected an integer >= 0, got {save_every}")
    exact = p.dtype == mx.float32
    ot = mx.float32 if exact else mx.bfloat16
    nt = -(-p.T // CHUNK)
    tp = nt * CHUNK
    dummy = _dummy()
    lower, neg, dt_key = launch.fused_options(gating)
    if gating is not None:
        gate_a, gate_b = gating.a, gating.b
        a_log, dt_bias = gating.A_log, gating.dt_bias
        lb = launch.lower_bound_array(gating.lower_bound)
    else:
        gate_a, gate_b, a_log, dt_bias, lb = g, beta, dummy, dummy, dummy
    m = mask if mask is not None else dummy
    key = p.gate == "key"

    kname, body, outputs, template, smem = _kkt_wy_launch(p, lower, neg, dt_key)
    kkt_wy = _kernel(kname, KKT_WY_INPUTS, outputs, source_text(body), header(), smem)
    shapes = [(p.B, p.Hv, tp, p.Dk), (p.B, p.Hv, tp, p.Dv), (p.B, p.Hv, nt, CHUNK, CHUNK), (p.B, p.Hv, tp)]
    dtypes = [ot, ot, ot, mx.float32]
    if key:  # q and k with the decay folded in, and the chunk-end decays per key column
        shapes += [(p.B, p.T, p.Hv, p.Dk), (p.B, p.T, p.Hv, p.Dk), (p.B, p.Hv, nt, p.Dk)]
        dtypes += [p.dtype, p.dtype, mx.float32]
    outs = kkt_wy(
        inputs=[q, k, v, gate_a, gate_b, a_log, dt_bias, lb, m],
        template=template,
        grid=(nt * THREADS, p.Hv, p.B),
        threadgroup=(THREADS, 1, 1),
        output_shapes=shapes,
        output_dtypes=dtypes,
        **launch.launch_options(),
    )
    W, U, Aqk, G = outs[:4]

    sname, sbody, sinputs, threads, rows, stemplate, ssmem = _state_launch(p, save_every)
    shapes = [(p.B, p.T, p.Hv, p.Dv), (p.B, p.Hv, p.Dv, p.Dk)]
    dtypes = [p.dtype, mx.float32]
    outputs = STATE_OUTPUTS
    if save_every:
        outputs = STATE_OUTPUTS + ("saved",)
        shapes.append((p.B, p.T // (CHUNK * save_every), p.Hv, p.Dv, p.Dk))
        dtypes.append(mx.float32)
    step = _kernel(sname, sinputs, outputs, source_text(sbody), header(), ssmem)
    ins = [outs[4], outs[5], W, U, Aqk, G, state, m, outs[6]] if key else [q, k, W, U, Aqk, G, state, m]
    res = step(
        inputs=ins,
        template=stemplate,
        grid=(p.Dv // rows * threads, p.Hv, p.B),
        threadgroup=(threads, 1, 1),
        output_shapes=shapes,
        output_dtypes=dtypes,
        **launch.launch_options(),
    )
    return tuple(res)
