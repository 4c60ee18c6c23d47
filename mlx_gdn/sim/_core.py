"""Simulated ``mx.fast.metal_kernel``: signature generation, C++ build, launch."""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np

_HERE = Path(__file__).resolve().parent
_RUNTIME = _HERE / "runtime.h"
_CUDA_VOCAB = _HERE / "cuda_vocab.h"
# Bump when the generated code or the C ABI changes in a way the runtime
# header's hash does not capture.
_ABI_VERSION = "1"

INT_POISON_BYTE = 0xA5
"""Every byte of an integer (or bool) output not given ``init_value`` starts as this."""


class SimError(RuntimeError):
    """Base class of simulator errors."""


class SimCompileError(SimError):
    """The generated C++ did not compile; the message holds the compiler's output."""


class SimKernelError(SimError):
    """A simulated kernel failed while running (divergence, bad launch, ...)."""


class SimOutOfBoundsError(SimKernelError, IndexError):
    """A simulated kernel read or wrote outside a device buffer."""


STATS = {"compiles": 0, "disk_hits": 0, "memory_hits": 0, "launches": 0}
"""Counters for tests and diagnostics."""

# --------------------------------------------------------------------------
# Types

_DTYPES = {
    # mx dtype: (Metal/C type name as MLX writes it, numpy dtype used for the buffer)
    mx.float32: ("float", np.float32),
    mx.float16: ("float16_t", np.float16),
    mx.bfloat16: ("bfloat16_t", np.uint16),
    mx.float64: ("double", np.float64),
    mx.bool_: ("bool", np.bool_),
    mx.int8: ("int8_t", np.int8),
    mx.int16: ("int16_t", np.int16),
    mx.int32: ("int32_t", np.int32),
    mx.int64: ("int64_t", np.int64),
    mx.uint8: ("uint8_t", np.uint8),
    mx.uint16: ("uint16_t", np.uint16),
    mx.uint32: ("uint32_t", np.uint32),
    mx.uint64: ("uint64_t", np.uint64),
}


def _ctype(dtype) -> str:
    try:
        return _DTYPES[dtype][0]
    except KeyError:
        raise TypeError(f"[metal_kernel sim] unsupported dtype {dtype}") from None


# Same list, same order and same substring test as MLX's metal_kernel.
_ATTRIBUTES = [
    ("dispatch_quadgroups_per_threadgroup", "uint", "((L->dtptg.x*L->dtptg.y*L->dtptg.z+3u)/4u)"),
    ("dispatch_simdgroups_per_threadgroup", "uint", "((L->dtptg.x*L->dtptg.y*L->dtptg.z+31u)/32u)"),
    ("dispatch_threads_per_threadgroup", "uint3", "L->dtptg"),
    ("grid_origin", "uint3", "uint3(0u)"),
    ("grid_size", "uint3", "L->tpg"),
    ("quadgroup_index_in_threadgroup", "uint", "(L->linear/4u)"),
    ("quadgroups_per_threadgroup", "uint", "((L->tptg.x*L->tptg.y*L->tptg.z+3u)/4u)"),
    ("simdgroup_index_in_threadgroup", "uint", "L->sgidx"),
    ("simdgroups_per_threadgroup", "uint", "L->nsg"),
    ("thread_execution_width", "uint", "32u"),
    ("thread_index_in_quadgroup", "uint", "(L->linear%4u)"),
    ("thread_index_in_simdgroup", "uint", "L->lane"),
    ("thread_index_in_threadgroup", "uint", "L->linear"),
    ("thread_position_in_grid", "uint3", "L->tpig"),
    ("thread_position_in_threadgroup", "uint3", "L->tpitg"),
    ("threadgroup_position_in_grid", "uint3", "L->tgpig"),
    ("threadgroups_per_grid", "uint3", "L->tgpg"),
    ("threads_per_grid", "uint3", "L->tpg"),
    ("threads_per_simdgroup", "uint", "32u"),
    ("threads_per_threadgroup", "uint3", "L->tptg"),
]

# --------------------------------------------------------------------------
# Source rewriting

_TYPE = r"(?:(?:unsigned|signed)\s+)?[A-Za-z_][\w:]*(?:\s*<[^<>;()]*>)?"
_DEVPTR = re.compile(
    r"(?P<c1>\bconst\s+)?\b(?:device|constant)\s+(?P<c2>const\s+)?(?P<ty>" + _TYPE + r")\s*(?P<c3>\bconst\s*)?\*"
)
_TGDECL = re.compile(
    r"\bthreadgroup\s+(?P<ty>" + _TYPE + r")\s+(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(?:\[[^\]\[;]+\]\s*)*);"
)
_HALF_LIT = re.compile(
    r"(?<![\w.])((?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+)[hH]\b"
)
_METAL_INCLUDE = re.compile(r"^\s*#\s*include\s*<metal_\w+>.*$", re.M)
_REINTERPRET = re.compile(r"\breinterpret_cast\s*<\s*(?=::metal_sim::dptr<)")
_COLLECTIVE = re.compile(
    r"\b(?:simd_[a-z_]+|simdgroup_barrier|simdgroup_multiply\w*|threadgroup_barrier)\s*\("
)


def _rewrite(text: str, counter: list) -> str:
    """Metal -> C++ for the few constructs the header's macros cannot express."""
    text = _METAL_INCLUDE.sub(lambda m: "// " + m.group(0).strip(), text)

    def devptr(m):
        const = m.group("c1") or m.group("c2") or m.group("c3")
        ty = m.group("ty").strip()
        return f"::metal_sim::dptr<{'const ' if const else ''}{ty}>"

    text = _DEVPTR.sub(devptr, text)
    text = _REINTERPRET.sub("static_cast<", text)

    def tgdecl(m):
        counter[0] += 1
        dims = re.sub(r"\s+", "", m.group("dims") or "")
        return (
            f"auto& {m.group('name')} = ::metal_sim::tg_var<{m.group('ty').strip()}{dims}, "
            f"{counter[0]}>();"
        )

    text = _TGDECL.sub(tgdecl, text)
    text = _HALF_LIT.sub(lambda m: f"half({m.group(1)}f)", text)
    return text


def _uses_collectives(header: str, source: str) -> bool:
    if os.environ.get("MLX_GDN_SIM_FIBERS", "") == "1":
        return True
    return bool(_COLLECTIVE.search(header) or _COLLECTIVE.search(source))


# --------------------------------------------------------------------------
# Build

_lock = threading.Lock()
_loaded: dict[str, object] = {}


def cache_dir() -> Path:
    """Directory holding compiled kernels ($MLX_GDN_SIM_CACHE or ~/.cache/mlx_gdn_sim)."""
    d = os.environ.get("MLX_GDN_SIM_CACHE")
    p = Path(d) if d else Path.home() / ".cache" / "mlx_gdn_sim"
    p.mkdir(parents=True, exist_ok=True)
    return p


def _compiler() -> str:
    for c in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if c and shutil.which(c):
            return c
    raise SimCompileError("[metal_kernel sim] no C++ compiler found (set CXX)")


_OPT = os.environ.get("MLX_GDN_SIM_OPT", "-O2")


def _flags() -> list[str]:
    extra = os.environ.get("MLX_GDN_SIM_CXXFLAGS", "").split()
    return [_OPT, "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-w", "-fno-strict-aliasing", *extra]


_runtime_hash_cache: list = []


def _runtime_hash() -> str:
    if not _runtime_hash_cache:
        _runtime_hash_cache.append(hashlib.sha256(_RUNTIME.read_bytes()).hexdigest())
    return _runtime_hash_cache[0]


def _build(src: str, kname: str):
    """Compile (or fetch from cache) the translation unit; returns the launch function."""
    cxx = _compiler()
    flags = _flags()
    key = hashlib.sha256(
        "\0".join([_ABI_VERSION, _runtime_hash(), cxx, " ".join(flags), sys.platform, src]).encode()
    ).hexdigest()[:32]
    with _lock:
        fn = _loaded.get(key)
        if fn is not None:
            STATS["memory_hits"] += 1
            return fn
        d = cache_dir()
        so = d / f"msim_{key}.so"
        if so.exists():
            STATS["disk_hits"] += 1
        else:
            import fcntl

            with open(d / f"msim_{key}.lock", "w") as lockf:
                fcntl.flock(lockf, fcntl.LOCK_EX)
                try:
                    if so.exists():
                        STATS["disk_hits"] += 1
                    else:
                        _compile(cxx, flags, src, so, kname)
                        STATS["compiles"] += 1
                finally:
                    fcntl.flock(lockf, fcntl.LOCK_UN)
        lib = ctypes.CDLL(str(so))
        fn = lib.msim_run
        fn.argtypes = [ctypes.POINTER(_Launch)]
        fn.restype = ctypes.c_int
        fn._lib = lib  # keep the library alive as long as the function
        _loaded[key] = fn
        return fn


_pch_dirs: dict = {}


def _pch_dir(cxx, flags) -> Path | None:
    """A directory holding runtime.h and its precompiled form (g++ only), or None.

    Parsing the runtime is a third of a small kernel's build time.
    """
    key = (cxx, tuple(flags))
    if key in _pch_dirs:
        return _pch_dirs[key]
    result = None
    if "clang" not in cxx and os.environ.get("MLX_GDN_SIM_PCH", "1") != "0":
        h = hashlib.sha256("\0".join([_runtime_hash(), cxx, *flags]).encode()).hexdigest()[:16]
        d = cache_dir() / f"pch_{h}"
        gch = d / "runtime.h.gch"
        if gch.exists():
            result = d
        else:
            import fcntl

            d.mkdir(exist_ok=True)
            with open(d / "lock", "w") as lockf:
                fcntl.flock(lockf, fcntl.LOCK_EX)
                try:
                    if not gch.exists():
                        shutil.copyfile(_RUNTIME, d / "runtime.h")
                        tmp = d / f"runtime.h.gch.{os.getpid()}"
                        pflags = [f for f in flags if f != "-shared"]
                        r = subprocess.run(
                            [cxx, *pflags, "-x", "c++-header", str(d / "runtime.h"), "-o", str(tmp)],
                            capture_output=True,
                            text=True,
                        )
                        if r.returncode == 0:
                            os.replace(tmp, gch)
                    if gch.exists():
                        result = d
                finally:
                    fcntl.flock(lockf, fcntl.LOCK_UN)
    _pch_dirs[key] = result
    return result


def _compile(cxx, flags, src, so: Path, kname: str):
    d = so.parent
    pch = _pch_dir(cxx, flags)
    with tempfile.TemporaryDirectory(dir=d, prefix="build_") as tmp:
        cpp = Path(tmp) / "kernel.cpp"
        cpp.write_text(src)
        out = Path(tmp) / "kernel.so"
        incs = ([f"-I{pch}"] if pch else []) + [f"-I{_HERE}"]
        cmd = [cxx, *flags, *incs, str(cpp), "-o", str(out), "-lm", "-pthread"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            msg = (r.stderr or r.stdout).strip()
            raise SimCompileError(
                f"[metal_kernel sim] kernel '{kname}' failed to compile:\n{msg}\n"
                f"(generated source: pass verbose=True to print it)"
            )
        # Keep the source next to the library: compiler diagnostics and
        # debuggers can then be pointed at it.
        os.replace(cpp, so.with_suffix(".cpp"))
        os.replace(out, so)


# --------------------------------------------------------------------------
# Launch ABI (mirrors msim_buf / msim_launch in runtime.h)


class _Buf(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("nbytes", ctypes.c_int64),
        ("name", ctypes.c_char_p),
        ("tname", ctypes.c_char_p),
        ("elem_size", ctypes.c_int64),
    ]


class _Launch(ctypes.Structure):
    _fields_ = [
        ("nbufs", ctypes.c_int32),
        ("bufs", ctypes.POINTER(_Buf)),
        ("grid", ctypes.c_uint32 * 3),
        ("tg", ctypes.c_uint32 * 3),
        ("fibers", ctypes.c_int32),
        ("nthreads", ctypes.c_int32),
        ("stack_size", ctypes.c_int64),
        ("err", ctypes.c_char_p),
        ("errcap", ctypes.c_int32),
        ("errkind", ctypes.c_int32),
    ]


def _to_numpy(a: mx.array) -> np.ndarray:
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.ascontiguousarray(np.array(a, copy=True))


def _row_strides(shape) -> np.ndarray:
    """Element strides of a row-contiguous array of `shape` (int64, as MLX passes them)."""
    st = np.ones(len(shape), dtype=np.int64)
    for d in range(len(shape) - 2, -1, -1):
        st[d] = st[d + 1] * shape[d + 1]
    return st


def _strided_input(a: mx.array):
    """(flat buffer, element strides) of `a` as laid out in memory.

    With ensure_row_contiguous=False MLX hands the kernel the array's own buffer and strides,
    so a body that ignores `_strides` reads the wrong elements: the simulator must do the same.
    Layouts it cannot express that way (negative strides) fall back to a contiguous copy.
    """
    mx.eval(a)
    view = np.asarray(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a)
    item = view.itemsize
    if view.ndim == 0 or view.size == 0 or any(st < 0 or st % item for st in view.strides):
        return _to_numpy(a).reshape(-1), _row_strides(a.shape)
    strides = np.array([st // item for st in view.strides], dtype=np.int64)
    span = int(sum((n - 1) * st for n, st in zip(view.shape, strides))) + 1
    flat = np.lib.stride_tricks.as_strided(view, shape=(span,), strides=(item,), writeable=False)
    return np.array(flat, copy=True), strides


def _from_numpy(x: np.ndarray, dtype) -> mx.array:
    if dtype == mx.bfloat16:
        return mx.array(x).view(mx.bfloat16)
    return mx.array(x)


def _as_input(v) -> mx.array:
    # Python scalars become 0-d arrays exactly as MLX's to_array does.
    if isinstance(v, mx.array):
        return v
    if isinstance(v, bool):
        return mx.array(v, dtype=mx.bool_)
    if isinstance(v, int):
        return mx.array(v, dtype=mx.int32)
    if isinstance(v, float):
        return mx.array(v, dtype=mx.float32)
    return mx.array(v)


def _poisoned(shape, dtype, init_value):
    ctype, npdt = _DTYPES[dtype]
    if init_value is not None:
        if dtype == mx.bfloat16:
            bits = np.array(mx.array(init_value, dtype=mx.bfloat16).view(mx.uint16))
            return np.full(shape, bits, dtype=np.uint16)
        return np.full(shape, init_value, dtype=npdt)
    if dtype == mx.bfloat16:
        return np.full(shape, 0x7FC0, dtype=np.uint16)
    if np.issubdtype(npdt, np.floating):
        return np.full(shape, np.nan, dtype=npdt)
    out = np.empty(shape, dtype=npdt)
    out.view(np.uint8)[...] = INT_POISON_BYTE
    return out


# --------------------------------------------------------------------------
# Kernel object


class SimMetalKernel:
    """Callable returned by the simulated ``metal_kernel``; see MLX's ``metal_kernel``."""

    def __init__(
        self,
        name,
        input_names,
        output_names,
        source,
        header="",
        ensure_row_contiguous=True,
        atomic_outputs=False,
        compile_options=None,
        raw_pointers=False,
    ):
        if not output_names:
            raise ValueError("[metal_kernel] Must specify at least one output.")
        if atomic_outputs:
            raise NotImplementedError("[metal_kernel sim] atomic_outputs is not simulated")
        self.name = name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.source = source
        self.header = header or ""
        self.ensure_row_contiguous = ensure_row_contiguous
        self.compile_options = compile_options
        # CUDA bodies pass their arguments on as plain pointers (cuda_kernel): buffers are guarded instead.
        self.raw_pointers = raw_pointers
        self._shape_infos = [
            (n + "_shape" in source, n + "_strides" in source, n + "_ndim" in source)
            for n in self.input_names
        ]
        self._attributes = [a for a in _ATTRIBUTES if a[0] in source]
        self._fibers = _uses_collectives(self.header, source)
        counter = [0]
        self._header_cpp = _rewrite(self.header, counter)
        self._source_cpp = _rewrite(source, counter)

    def _ptr(self, t: str) -> str:
        return f"{t}*" if self.raw_pointers else f"::metal_sim::dptr<{t}>"

    def _arg(self, t: str, k: int) -> str:
        raw = f"static_cast<{t}*>(A->c->bufs[{k}].data)"
        return raw if self.raw_pointers else f"::metal_sim::dptr<{t}>({raw}, &A->bufs[{k}])"

    def _generate(self, inputs, output_dtypes, template):
        lines = ['#include "runtime.h"', "", self._header_cpp, ""]
        targs = []
        if template:
            params = []
            for tname, val in template:
                if isinstance(val, bool):
                    params.append(f"bool {tname}")
                    targs.append("true" if val else "false")
                elif isinstance(val, int):
                    params.append(f"int {tname}")
                    targs.append(str(val))
                elif isinstance(val, mx.Dtype):
                    params.append(f"typename {tname}")
                    targs.append(_ctype(val))
                else:
                    raise ValueError(
                        "[metal_kernel] Invalid template argument. Must be `mlx.core.Dtype`, `int` or `bool`."
                    )
            lines.append(f"template <{', '.join(params)}>")
        params, args = [], []
        bufs = []  # (kind, input index or output index)
        for i, (n, a) in enumerate(zip(self.input_names, inputs)):
            t = _ctype(a.dtype)
            k = len(bufs)
            if a.ndim == 0:
                params.append(f"  const {t}& {n}")
                args.append(f"*static_cast<const {t}*>(A->c->bufs[{k}].data)")
                bufs.append(("in", i))
                continue
            params.append(f"  {self._ptr('const ' + t)} {n}")
            args.append(self._arg("const " + t, k))
            bufs.append(("in", i))
            sh, st, nd = self._shape_infos[i]
            if sh:
                k = len(bufs)
                params.append(f"  {self._ptr('const int')} {n}_shape")
                args.append(self._arg("const int", k))
                bufs.append(("shape", i))
            if st:
                k = len(bufs)
                params.append(f"  {self._ptr('const int64_t')} {n}_strides")
                args.append(self._arg("const int64_t", k))
                bufs.append(("strides", i))
            if nd:
                k = len(bufs)
                params.append(f"  const int& {n}_ndim")
                args.append(f"*static_cast<const int*>(A->c->bufs[{k}].data)")
                bufs.append(("ndim", i))
        for j, (n, dt) in enumerate(zip(self.output_names, output_dtypes)):
            t = _ctype(dt)
            k = len(bufs)
            params.append(f"  {self._ptr(t)} {n}")
            args.append(self._arg(t, k))
            bufs.append(("out", j))
        for attr, ty, expr in self._attributes:
            params.append(f"  {ty} {attr}")
            args.append(expr)
        lines.append("static void msim_kernel(\n" + ",\n".join(params) + ") {")
        lines.append(self._source_cpp)
        lines.append("}")
        lines.append("")
        inst = "msim_kernel" + (f"<{', '.join(targs)}>" if template else "")
        lines.append("static void msim_thread(::metal_sim::Lane* L) {")
        lines.append("  ::metal_sim::Launch* A = ::metal_sim::g_launch;")
        lines.append("  (void)A; (void)L;")
        lines.append(f"  {inst}(\n    " + ",\n    ".join(args) + ");")
        lines.append("}")
        lines.append("")
        lines.append(
            'extern "C" __attribute__((visibility("default"))) int msim_run(msim_launch* c) {'
        )
        lines.append("  return ::metal_sim::run(c, msim_thread);")
        lines.append("}")
        return "\n".join(lines) + "\n", bufs

    def __call__(
        self,
        *,
        inputs,
        output_shapes,
        output_dtypes,
        grid,
        threadgroup,
        template=None,
        init_value=None,
        verbose=False,
        stream=None,
    ):
        def check_size(actual, expected, what):
            if actual != expected:
                raise ValueError(
                    f"[metal_kernel] Expected `{what}` to have size {expected} but got size {actual}."
                )

        check_size(len(inputs), len(self.input_names), "inputs")
        check_size(len(output_shapes), len(self.output_names), "output_shapes")
        check_size(len(output_dtypes), len(self.output_names), "output_dtypes")
        grid = tuple(int(g) for g in grid)
        threadgroup = tuple(int(t) for t in threadgroup)
        if len(grid) != 3 or len(threadgroup) != 3:
            raise ValueError("[metal_kernel] grid and threadgroup must be 3-tuples")
        if min(threadgroup) < 1:
            raise ValueError(f"[metal_kernel sim] threadgroup {threadgroup} has a zero dimension")
        tg_size = threadgroup[0] * threadgroup[1] * threadgroup[2]
        if tg_size > 1024:
            raise ValueError(
                f"[metal_kernel] Thread group size ({tg_size}) is greater than  the maximum allowed "
                f"threads per threadgroup (1024)."
            )
        ins = [_as_input(v) for v in inputs]
        src, bufs = self._generate(ins, output_dtypes, template)
        if verbose:
            print(f"Generated source code for `{self.name}`:\n```\n{src}\n```")
        fn = _build(src, self.name)

        keep = []
        guards = []  # raw pointers: (guarded copy, output to fill from it)
        cbufs = (_Buf * max(1, len(bufs)))()
        outs_np = [
            _poisoned(tuple(int(s) for s in shp), dt, init_value)
            for shp, dt in zip(output_shapes, output_dtypes)
        ]
        in_np = {}
        for k, (kind, i) in enumerate(bufs):
            if kind == "out":
                arr = outs_np[i]
                name = self.output_names[i]
                tname = _ctype(output_dtypes[i])
            else:
                a = ins[i]
                if i not in in_np:
                    in_np[i] = (
                        _strided_input(a) if not self.ensure_row_contiguous else (_to_numpy(a), None)
                    )
                base = self.input_names[i]
                if kind == "in":
                    arr, name, tname = in_np[i][0], base, _ctype(a.dtype)
                elif kind == "shape":
                    arr, name, tname = np.array(a.shape, dtype=np.int32), base + "_shape", "int"
                elif kind == "strides":
                    st = in_np[i][1]
                    arr = _row_strides(a.shape) if st is None else st
                    name, tname = base + "_strides", "int64_t"
                else:
                    arr, name, tname = np.array(a.ndim, dtype=np.int32), base + "_ndim", "int"
            arr = np.ascontiguousarray(arr)
            if arr.size == 0:
                arr = np.empty(1, dtype=arr.dtype)[:0]
            if self.raw_pointers:
                guard = _Guarded(arr, name)
                guards.append((guard, outs_np[i] if kind == "out" else None))
                arr = guard.data
            bname = name.encode()
            btype = tname.encode()
            keep.extend([arr, bname, btype])
            cbufs[k].data = arr.ctypes.data
            cbufs[k].nbytes = arr.nbytes
            cbufs[k].name = bname
            cbufs[k].tname = btype
            cbufs[k].elem_size = arr.itemsize

        errbuf = ctypes.create_string_buffer(2048)
        launch = _Launch()
        launch.nbufs = len(bufs)
        launch.bufs = cbufs
        launch.grid[:] = grid
        launch.tg[:] = threadgroup
        launch.fibers = 1 if self._fibers else 0
        launch.nthreads = int(os.environ.get("MLX_GDN_SIM_THREADS", "1"))
        launch.stack_size = int(os.environ.get("MLX_GDN_SIM_STACK", str(128 * 1024)))
        launch.err = ctypes.cast(errbuf, ctypes.c_char_p)
        launch.errcap = len(errbuf)
        launch.errkind = 0
        STATS["launches"] += 1
        if min(grid) > 0:
            rc = fn(ctypes.byref(launch))
            if rc != 0:
                msg = errbuf.value.decode(errors="replace")
                cls = SimOutOfBoundsError if launch.errkind == 1 else SimKernelError
                raise cls(f"[metal_kernel sim] kernel '{self.name}': {msg}")
        for guard, out in guards:
            guard.check(self.name)
            if out is not None:
                np.copyto(out, guard.data)
        del keep
        return _without_transforms(self.name, ins, [_from_numpy(o, dt) for o, dt in zip(outs_np, output_dtypes)])


def _not_implemented(transform: str, kernel: str):
    # MLX's CustomKernel primitive defines no transforms: Primitive::vjp (jvp, vmap) throws
    # std::invalid_argument, which Python sees as ValueError with this message.
    def raise_(*_):
        raise ValueError(
            f"[Primitive::{transform}] Not implemented for CustomKernel (simulated kernel '{kernel}')."
        )

    return raise_


def _without_transforms(kernel: str, inputs, outputs):
    """`outputs`, tied to `inputs` the way a real kernel's are: computed from NumPy copies they
    would be constants to MLX, and a gradient through them silently zero. Routed through a
    custom function whose vjp, jvp and vmap raise as MLX's CustomKernel does."""
    fn = mx.custom_function(lambda *_: list(outputs))
    fn.vjp(_not_implemented("vjp", kernel))
    fn.jvp(_not_implemented("jvp", kernel))
    fn.vmap(_not_implemented("vmap", kernel))
    return fn(*inputs)


class _Guarded:
    """A buffer's bytes between two canary-filled pads, for kernels given plain pointers (no
    bounds checks of their own): a write outside the buffer lands in a pad and is reported."""

    PAD = 65536
    CANARY = 0x5A

    def __init__(self, arr: np.ndarray, name: str):
        self.name = name
        n = arr.nbytes
        self.raw = np.full(2 * self.PAD + n + 64, self.CANARY, dtype=np.uint8)
        off = self.PAD + (-self.raw.ctypes.data - self.PAD) % 64  # data 64-byte aligned
        self.lo, self.hi = off, off + n
        self.data = self.raw[self.lo:self.hi].view(arr.dtype).reshape(arr.shape)
        np.copyto(self.data, arr)

    def check(self, kernel: str):
        if (self.raw[: self.lo] != self.CANARY).any() or (self.raw[self.hi :] != self.CANARY).any():
            raise SimOutOfBoundsError(f"[cuda_kernel sim] kernel '{kernel}' wrote outside buffer '{self.name}'")


def metal_kernel(
    name,
    input_names,
    output_names,
    source,
    header="",
    ensure_row_contiguous=True,
    atomic_outputs=False,
    compile_options=None,
):
    """Drop-in for ``mx.fast.metal_kernel`` that runs the kernel on the CPU."""
    return SimMetalKernel(
        name,
        input_names,
        output_names,
        source,
        header=header,
        ensure_row_contiguous=ensure_row_contiguous,
        atomic_outputs=atomic_outputs,
        compile_options=compile_options,
    )


def cuda_kernel(
    name,
    input_names,
    output_names,
    source,
    header="",
    ensure_row_contiguous=True,
    atomic_outputs=False,
    shared_memory=0,
):
    """Drop-in for ``mx.fast.cuda_kernel`` that runs a CUDA kernel on the CPU.

    For kernels written in CUDA (kernels/chunked/*.cuh): threads, blocks, warps, shared memory
    and the PTX the kernels use are given CPU meanings by cuda_vocab.h (see there). Bodies in
    Metal's vocabulary (the recurrent kernels, through the CUDA prelude) are simulated with
    ``simulated_metal()`` instead. Grids count threads, as for MLX's CUDA kernels; launchers keep
    them whole multiples of the block.
    """
    if "#define GDN_CUDA_PRELUDE_H" in header:
        raise SimError(
            f"[cuda_kernel sim] kernel '{name}' is a Metal-vocabulary body behind the CUDA prelude; "
            "simulate it with simulated_metal()"
        )
    vocab = f"#define GDN_SIM_SMEM {int(shared_memory)}\n" + _CUDA_VOCAB.read_text()
    return SimMetalKernel(
        name,
        input_names,
        output_names,
        source,
        header=vocab + "\n" + header,
        ensure_row_contiguous=ensure_row_contiguous,
        atomic_outputs=atomic_outputs,
        raw_pointers=True,
    )
