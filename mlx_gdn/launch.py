"""Launch specs for the recurrent kernels, shared by the Metal and CUDA launchers.

A `LaunchSpec` says everything about one launch except the arrays: which body file, which
headers, input/output names, template arguments, grid, threadgroup, output shapes and dtypes,
and whether the kernel needs row-contiguous inputs (pass it as `ensure_row_contiguous`).
Both `mx.fast.metal_kernel` and `mx.fast.cuda_kernel` take `grid` in threads (CUDA divides it by
the threadgroup, rounding up; Metal dispatches threads), so every grid here is a whole multiple
of its threadgroup in each axis and means the same on both.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import mlx.core as mx

from . import backends
from .validate import Problem, Serving

# Tokens up to which the unstaged decode body runs; longer calls stage blocks of tokens.
DECODE_MAX_T = 4
# State columns each lane keeps in registers (Dk / lanes-per-row). Decode: the state is the
# traffic, so more lanes per row (narrower, coalesced loads). Prefill: mlx-lm's packed layout
# (32 per lane) plus staging; 64 per lane halves the shuffles again but halves the threadgroups
# at B=1 and needs ~160 registers per thread under ptxas. Chosen from arithmetic and register
# counts, not timed on Apple silicon (bench/NOTES.md); the bodies take any lanes-per-row.
DECODE_STATE_PER_LANE = 16
PREFILL_STATE_PER_LANE = 32
# Threads per threadgroup aimed at, and the threadgroup memory a prefill block may use.
THREADS_PER_GROUP = 128
STAGE_BYTES = 16384
MAX_BLOCK_TOKENS = 16

# Kernel bodies ship as files in ``kernels/`` (installed as ``mlx_gdn.kernels``).
_HERE = Path(__file__).resolve().parent
# Installed wheel: mlx_gdn/kernels; source checkout: <repo>/kernels.
_CANDIDATES = (_HERE / "kernels", _HERE.parent / "kernels")


def kernel_dir() -> Path:
    """The directory holding the kernel source files."""
    for d in _CANDIDATES:
        if d.is_dir() and any(d.glob("*.metal")):
            return d
    for d in _CANDIDATES:
        if d.is_dir():
            return d
    raise FileNotFoundError(f"mlx_gdn kernel sources not found in {[str(c) for c in _CANDIDATES]}")


@lru_cache(maxsize=None)
def load(name: str) -> str:
    """Text of ``kernels/<name>`` (e.g. ``"recurrent.metal"``)."""
    path = kernel_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"kernel source {name!r} not found in {kernel_dir()}")
    return path.read_text()


@lru_cache(maxsize=None)
def compact(text: str) -> str:
    """`text` without `//` comments, indentation or blank lines; the same program.

    MLX's CUDA backend rebuilds and hashes a custom kernel's whole source on every call, so
    shorter text is less host work per launch. The kernel sources use no block comments and
    no `//` inside string literals (asserted here).
    """
    if "/*" in text:
        raise ValueError("compact() does not handle block comments")
    out = []
    for line in text.splitlines():
        cut = line.find("//")
        if cut >= 0:
            if '"' in line[cut:]:
                raise ValueError(f"compact() cannot tell a comment from a string in: {line!r}")
            line = line[:cut]
        line = line.strip()
        if line:
            out.append(line)
    return "\n".join(out) + "\n"


GATES_HEADER = "gates.h"
_INT32_MAX = 2**31 - 1


# Tests set this so every kernel output starts as NaN (MLX's `init_value`): an element a kernel
# forgets to write then fails the reference comparison on a real GPU too, as it does in the
# simulator, which poisons outputs by itself.
POISON_OUTPUTS = False


def launch_options() -> dict:
    """Extra keyword arguments for a kernel call (`init_value` when outputs are poisoned)."""
    return {"init_value": float("nan")} if POISON_OUTPUTS else {}


@dataclass(frozen=True)
class LaunchSpec:
    """One kernel launch minus its arrays. grid and threadgroup count threads."""

    name: str
    body: str
    headers: Tuple[str, ...]
    defines: Tuple[Tuple[str, object], ...]  # (macro, int switch or float constant)
    input_names: Tuple[str, ...]
    output_names: Tuple[str, ...]
    template: Tuple[Tuple[str, object], ...]
    grid: Tuple[int, int, int]
    threadgroup: Tuple[int, int, int]
    output_shapes: Tuple[Tuple[int, ...], ...]
    output_dtypes: Tuple[mx.Dtype, ...]
    # The recurrent bodies read every input through its *_strides, so views (e.g. slices of a
    # fused projection at B > 1) go in uncopied: no copy launches before the kernel.
    ensure_row_contiguous: bool = False

    def source(self) -> str:
        """The kernel body (text of kernels/<body>)."""
        return load(self.body)

    def header(self) -> str:
        """Variant macros, then the header files; a CUDA launcher puts its prelude first."""
        return _header(self.defines, self.headers)

    def inputs(self, arrays: Dict[str, mx.array]) -> list:
        """The arrays in `input_names` order, from a name -> array dict."""
        return [arrays[n] for n in self.input_names]

    def call_kwargs(self) -> dict:
        """Everything a kernel call takes besides `inputs` (and `init_value`, see `launch_options`)."""
        return dict(
            template=list(self.template),
            grid=self.grid,
            threadgroup=self.threadgroup,
            output_shapes=list(self.output_shapes),
            output_dtypes=list(self.output_dtypes),
        )

    def launch(self, kern, arrays: Dict[str, mx.array]) -> list:
        """Run kernel object `kern` (metal_kernel or cuda_kernel) on `arrays`; its outputs."""
        return kern(inputs=self.inputs(arrays), **self.call_kwargs(), **launch_options())


@lru_cache(maxsize=None)
def _header(defines, headers) -> str:
    # An int switch, or a float constant (as a float literal: the same text in Metal and CUDA).
    lines = [f"#define {k} {float(v)!r}f" if isinstance(v, float) else f"#define {k} {int(v)}" for k, v in defines]
    return "\n".join(lines) + "\n" + "".join(load(h) for h in headers)


def lanes_per_row(Dk: int, per_lane: int) -> int:
    """Smallest power of two L <= 32 with Dk / L <= per_lane (L divides Dk when 32 does)."""
    L = 1
    while Dk // L > per_lane and L < 32:
        L *= 2
    return L


def _rows_per_group(Dv: int, L: int) -> int:
    # R * L must fill whole simdgroups; no more rows than Dv needs.
    unit = 32 // L
    want = max(unit, THREADS_PER_GROUP // L)
    return min(want, -(-Dv // unit) * unit)


def _block_tokens(Dk: int, R: int, key_gate: bool) -> int:
    # Floats staged per token: k, q, (per-key g), v of R rows, g, beta, mask.
    per_token = 2 * Dk + (Dk if key_gate else 1) + R + 2
    return max(1, min(MAX_BLOCK_TOKENS, STAGE_BYTES // (4 * per_token)))


def supports_recurrent(p: Problem) -> bool:
    """True when the recurrent bodies take this shape (else dispatch falls back to ops)."""
    if p.Dk % 32 != 0 or not 32 <= p.Dk <= 512 or p.Dv < 1:
        return False
    if p.B * p.Hv > 65535:  # grid z (CUDA's limit)
        return False
    # Offsets in the bodies are 64-bit, but T is an int and arrays past 2**31 elements are
    # untested, so those go to the ops path.
    sizes = (p.B * p.T * p.Hk * p.Dk, p.B * p.T * p.Hv * p.Dv, p.B * p.Hv * p.Dv * p.Dk)
    if p.gate == "key":
        sizes += (p.B * p.T * p.Hv * p.Dk,)
    return max(sizes) <= _INT32_MAX


def choose_path(p: Problem) -> str:
    """"decode" (unstaged) for a few tokens, "prefill" (staged blocks) beyond."""
    return "decode" if p.T <= DECODE_MAX_T else "prefill"


def recurrent_spec(
    p: Problem,
    *,
    lower: bool = False,
    neg: bool = False,
    path: Optional[str] = None,
    vec4: bool = False,
    dt_key: bool = False,
    serve: Optional[Serving] = None,
) -> LaunchSpec:
    """Launch spec of the recurrent kernel for problem `p`.

    p.fused selects the fused-gating inputs (a, b, A_log, dt_bias, and lower_bound when `lower`)
    over (g, beta); `lower` and `neg` are the fused options (lower_bound given, allow_neg_eigval).
    path: "decode", "prefill" or None (by T, see `choose_path`). vec4: the decode body keeps each
    lane's state columns in groups of four adjacent ones (GDN_VEC4), where a lane has a multiple
    of four; the CUDA backend asks for it (16-byte state loads and stores).
    Fused per-key gates (p.fused and p.gate == "key"): a is [B, T, Hv, Dk], A_log [Hv], dt_bias [Hv]
    or, with `dt_key`, [Hv, Dk] (GDN_DT_KEY).
    serve: a serving call's options (`serving_spec`); None for a plain call.
    """
    path = path or choose_path(p)
    if path not in ("decode", "prefill"):
        raise ValueError(f"path must be 'decode' or 'prefill', got {path!r}")
    key_gate = p.gate == "key"
    per_lane = DECODE_STATE_PER_LANE if path == "decode" else PREFILL_STATE_PER_LANE
    L = lanes_per_row(p.Dk, per_lane)
    R = _rows_per_group(p.Dv, L)
    threads = R * L
    groups = -(-p.Dv // R)

    lower = bool(p.fused and lower)
    if p.fused:
        # lower_bound is an input only where it is used: every array costs MLX host time per call.
        gate_names: Sequence[str] = ("a", "b", "A_log", "dt_bias") + (("lower_bound",) if lower else ())
    else:
        gate_names = ("g", "beta")
    serving = _serving_parts(p, serve, path)
    names = ("q", "k", "v") + tuple(gate_names) + ("state_in",) + serving["inputs"] + (("mask",) if p.masked else ())

    template = [
        ("InT", p.dtype),
        ("Dk", p.Dk),
        ("Dv", p.Dv),
        ("Hk", p.Hk),
        ("Hv", p.Hv),
        ("L", L),
        ("R", R),
    ]
    if path == "prefill":
        template.append(("TB", _block_tokens(p.Dk, R, key_gate)))
    template += [("KEYGATE", key_gate), ("LOWER", lower), ("NEG", bool(p.fused and neg))] + serving["template"]

    vec4 = bool(vec4 and path == "decode" and (p.Dk // L) % 4 == 0)
    dt_key = bool(dt_key and p.fused and key_gate)
    variant = ("update" if p.fused else "rule") + ("_masked" if p.masked else "") + ("_v4" if vec4 else "")
    variant += "_dtkey" if dt_key else ""
    variant += serving["suffix"]
    return LaunchSpec(
        name=f"gdn_recurrent_{path}_{variant}",
        body=f"recurrent_{path}.metal",
        headers=(GATES_HEADER,),
        defines=(("GDN_FUSED", int(p.fused)), ("GDN_MASKED", int(p.masked)), ("GDN_LOWER", int(lower)),
                 ("GDN_VEC4", int(vec4)), ("GDN_DT_KEY", int(dt_key))) + serving["defines"],
        input_names=names,
        output_names=("y", "state_out") + serving["outputs"],
        template=tuple(template),
        grid=(threads * groups, 1, serving["N"] * p.Hv),
        threadgroup=(threads, 1, 1),
        output_shapes=((p.B, p.T, p.Hv, p.Dv), (serving["N"], p.Hv, p.Dv, p.Dk)) + serving["shapes"],
        output_dtypes=(p.dtype, mx.float32) + (mx.float32,) * len(serving["outputs"]),
    )


def _serving_parts(p: Problem, serve: Optional[Serving], path: str) -> dict:
    """What a serving call adds to a recurrent launch: inputs state_idx (GDN_POOL) and
    cu_seqlens (GDN_VARLEN), output `states` with template CS (GDN_STEPS), a grid over N
    sequences. Plain calls get nothing, so their variants are unchanged."""
    if serve is None:
        return dict(inputs=(), outputs=(), template=[], defines=(), suffix="", shapes=(), N=p.B)
    if path == "decode" and (serve.packed or serve.every):
        raise ValueError("the decode body takes state pools only; packed sequences and states run on prefill")
    outputs, shapes, template = (), (), []
    if serve.every:
        outputs, shapes = ("states",), ((p.B, serve.slots, p.Hv, p.Dv, p.Dk),)
        template = [("CS", serve.every)]
    suffix = ("_pool" if serve.pooled else "") + ("_varlen" if serve.packed else "") + ("_states" if serve.every else "")
    return dict(
        inputs=(("state_idx",) if serve.pooled else ()) + (("cu_seqlens",) if serve.packed else ()),
        outputs=outputs, template=template, suffix=suffix, shapes=shapes, N=serve.N,
        defines=(("GDN_POOL", int(serve.pooled)), ("GDN_VARLEN", int(serve.packed)), ("GDN_STEPS", int(bool(serve.every)))),
    )


def supports_serving(p: Problem, s: Serving) -> bool:
    """True when the recurrent bodies take this serving call (else it runs on the ops backend)."""
    if not supports_recurrent(p) or s.N * p.Hv > 65535:
        return False
    sizes = (s.rows * p.Hv * p.Dv * p.Dk, p.B * max(s.slots, 1) * p.Hv * p.Dv * p.Dk)
    return max(sizes) <= _INT32_MAX


def serving_path(p: Problem, s: Serving) -> str:
    """Body a serving call runs: the decode body for a pool at few tokens, else prefill (the only
    body with packed sequences and per-step states)."""
    return "decode" if not s.packed and not s.every and p.T <= DECODE_MAX_T else "prefill"


_LOWER_BOUND_ARRAYS: Dict[float, mx.array] = {}
# Kernels read element 0. Four elements, not one: MLX's CUDA allocator serves arrays of at most
# 8 bytes from a managed pool that is mapped for the GPU rather than moved to it
# (cudaMemAdviseSetAccessedBy in mlx/backend/cuda/allocator.cpp), so a value written from the host
# stays in host memory and every read crosses the bus; larger arrays move to the GPU on first use.
_LOWER_BOUND_SIZE = 4


def lower_bound_array(lower_bound: Optional[float]) -> mx.array:
    """float32 [4] holding lower_bound (0 when None), cached per value so no op runs per call."""
    key = 0.0 if lower_bound is None else float(lower_bound)
    arr = _LOWER_BOUND_ARRAYS.get(key)
    if arr is None:
        if len(_LOWER_BOUND_ARRAYS) > 64:
            _LOWER_BOUND_ARRAYS.clear()
        arr = mx.array([key] * _LOWER_BOUND_SIZE, dtype=mx.float32)  # a constant: safe under mx.compile too
        _LOWER_BOUND_ARRAYS[key] = arr
    return arr


def recurrent_inputs(q, k, v, state, mask, *, g=None, beta=None, gating=None) -> list:
    """The recurrent kernel's inputs in the order of `recurrent_spec`'s input_names."""
    if gating is not None:
        ins = [q, k, v, gating.a, gating.b, gating.A_log, gating.dt_bias]
        if gating.lower_bound is not None:
            ins.append(lower_bound_array(gating.lower_bound))
        ins.append(state)
    else:
        ins = [q, k, v, g, beta, state]
    if mask is not None:
        ins.append(mask)
    return ins


def fused_options(gating) -> Tuple[bool, bool, bool]:
    """(lower_bound given, allow_neg_eigval, dt_bias per key column) of a `FusedGating`, the
    options that select kernel variants; all False for precomputed gates (None)."""
    if gating is None:
        return False, False, False
    return gating.lower_bound is not None, bool(gating.allow_neg_eigval), gating.dt_key


@backends.on_clear
def _clear_launchers():
    recurrent_launcher.cache_clear()


@lru_cache(maxsize=512)
def recurrent_launcher(p: Problem, lower: bool, neg: bool, path: Optional[str], kernel_for, vec4: bool = False,
                       dt_key: bool = False):
    """(spec, kernel object, call keyword arguments) for one problem, built once.

    A decode loop repeats one problem every step; everything here is a pure function of it, so
    a step's host work is the input list and the kernel call.
    """
    spec = recurrent_spec(p, lower=lower, neg=neg, path=path, vec4=vec4, dt_key=dt_key)
    return spec, kernel_for(spec), spec.call_kwargs()


def run_recurrent(p: Problem, q, k, v, state, mask, *, kernel_for, g=None, beta=None, gating=None, path=None,
                  vec4: bool = False):
    """(y [B,T,Hv,Dv] in p.dtype, state [B,Hv,Dv,Dk] float32) from one recurrent launch.

    `kernel_for(spec)` gives the backend's kernel object (Metal or CUDA); path "decode",
    "prefill" or None (by T); vec4: see `recurrent_spec`.
    """
    lower, neg, dt_key = fused_options(gating)
    _, kern, kw = recurrent_launcher(p, lower, neg, path, kernel_for, vec4, dt_key)
    ins = recurrent_inputs(q, k, v, state, mask, g=g, beta=beta, gating=gating)
    y, new_state = kern(inputs=ins, **kw, **launch_options()) if POISON_OUTPUTS else kern(inputs=ins, **kw)
    return y, new_state


@lru_cache(maxsize=512)
def serving_launcher(p: Problem, s: Serving, lower: bool, neg: bool, kernel_for, vec4: bool = False,
                     dt_key: bool = False):
    """`recurrent_launcher` for a serving call."""
    spec = recurrent_spec(p, lower=lower, neg=neg, path=serving_path(p, s), vec4=vec4, serve=s, dt_key=dt_key)
    return spec, kernel_for(spec), spec.call_kwargs()


@backends.on_clear
def _clear_serving_launchers():
    serving_launcher.cache_clear()


def run_serving(p: Problem, s: Serving, q, k, v, state, mask, cu_seqlens, state_indices, *, kernel_for,
                g=None, beta=None, gating=None, vec4: bool = False):
    """(y, final states [N,Hv,Dv,Dk], states or None) from one recurrent launch of a serving call.

    state: the pool [S,Hv,Dv,Dk] (read at rows state_indices[n] inside the kernel) or the
    initial states [N,Hv,Dv,Dk]; cu_seqlens / state_indices: int32 or None as `s` says.
    """
    lower, neg, dt_key = fused_options(gating)
    _, kern, kw = serving_launcher(p, s, lower, neg, kernel_for, vec4, dt_key)
    ins = recurrent_inputs(q, k, v, state, None, g=g, beta=beta, gating=gating)
    ins += ([state_indices] if s.pooled else []) + ([cu_seqlens] if s.packed else []) + ([mask] if mask is not None else [])
    outs = kern(inputs=ins, **kw, **launch_options())
    return outs[0], outs[1], (outs[2] if s.every else None)
