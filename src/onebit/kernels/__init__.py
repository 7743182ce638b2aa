"""ctypes binding of onebit's C CPU kernels (csrc/onebit_kernels.h is the ABI).

A BitLinear is ``codes, xs = quantize_act_i8(x)`` then ``linear(packed, k, layout, w_scale, codes,
xs)``; ``gemm`` gives the exact int32 accumulators. Packed weights are the on-disk layouts of
docs/formats.md (``i2``, ``t1_6``). Inputs are numpy arrays (a CPU torch tensor is taken through
``.numpy()``, no copy); every argument is checked here, before C runs, and bad input raises
TypeError / ValueError naming the argument and the fix.

Also: ``linear_i8`` / ``linear_i4`` / ``linear_f16`` (LM heads), ``attention`` (RoPE + KV cache +
GQA softmax), ``kv_quantize`` / ``kv_dequantize`` (KV cache rows, docs/formats.md §10), ``validate`` + ``linear_unchecked``, ``pack``/``unpack`` (C twins of the numpy
reference), ``read_probe`` (bandwidth). ``Layer`` is the ctypes struct of ``ob_decoder_layer``.

The C library is loaded on first use, not at import, from the package (``_onebit_kernels*.so``) or
from the file ``ONEBIT_KERNELS_LIB`` names (a build of the same sources, e.g. the sanitized one of
scripts/check_sanitizers.sh). The SIMD variant ("avx512vnni", "avx2" or
"neon"; "avx2_lut" only by name) is picked by CPU detection; ``ONEBIT_KERNELS=reference``
(environment, read by C at first use) or ``with use("reference"):`` forces one. ``use`` changes
process-wide state: not thread-safe. GEMM/GEMV split their output rows over ``get_num_threads()``
threads (``set_num_threads``, ``threads(n)``); design notes in docs/kernels.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.machinery
import math
import os
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np

from ..formats.packing import LAYOUTS, PackedFormatError, packed_row_bytes
from ..formats.packed_model import pack_i4
from ..formats.packing import _check_codes

__all__ = ["quantize_act_i8", "gemm", "linear", "linear_i8", "linear_i4", "pack_i4", "linear_f16", "attention", "kv_quantize", "kv_dequantize", "validate", "pack", "unpack", "isa", "available_isas", "use",
           "set_num_threads", "get_num_threads", "threads", "read_probe", "glu", "VARIANTS", "plan",
           "tune", "apply_plan", "isa_for"]

VARIANTS = ("reference", "neon", "avx2", "avx2_lut", "avx512vnni", "avx512vnni_zmm")  # what a build may contain
_LAYOUT_ID = {"i2": 0, "t1_6": 1}
_ERRORS = {-1: "a required pointer is NULL", -2: "a size is < 1", -3: "a row stride is < k",
           -4: "invalid code", -5: "unknown or unsupported variant", -6: "out of memory",
           -7: "non-finite value", -8: "a weight buffer's length does not match its sizes"}
_ABI_VERSION = 15  # OB_ABI_VERSION
_MAX_K = 1 << 24  # OB_MAX_K: int32 accumulators are exact up to here
_lib_handle: ctypes.CDLL | None = None


class Layer(ctypes.Structure):
    """ob_layer (onebit_kernels.h): one decoder layer's dimensions and weight pointers."""
    _fields_ = [("hidden", ctypes.c_int64), ("ffn", ctypes.c_int64), ("heads", ctypes.c_int64),
                ("kv_heads", ctypes.c_int64), ("head_dim", ctypes.c_int64),
                ("layout", ctypes.c_int32), ("relu2", ctypes.c_int32), ("inner", ctypes.c_int32),
                ("eps", ctypes.c_float), ("kv_bits", ctypes.c_int32), ("w", ctypes.c_void_p * 7), ("w_scale", ctypes.c_float * 7),
                ("norm", ctypes.c_void_p * 7), ("act_scheme", ctypes.c_int32),
                ("topk_keep", ctypes.c_double), ("wt", ctypes.c_void_p * 7), ("skip_up", ctypes.c_int32),
                ("sparse_min_zeros", ctypes.c_int32), ("bias", ctypes.c_void_p * 7),
                ("batch_invariant", ctypes.c_int32),
                ("w_bytes", ctypes.c_int64 * 7), ("wt_bytes", ctypes.c_int64 * 7)]


def _find_library() -> Path:
    override = os.environ.get("ONEBIT_KERNELS_LIB", "")
    if override:  # another build of the same sources, e.g. scripts/check_sanitizers.sh's ASan one
        path = Path(override)
        if not path.is_file():
            raise ImportError(f"ONEBIT_KERNELS_LIB={override!r} is not a file: point it at a build of "
                              f"the kernel library (scripts/check_sanitizers.sh makes "
                              f"build/sanitizers/_onebit_kernels.so) or unset it")
        return path
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_onebit_kernels{suffix}"
        if path.is_file():
            return path
    raise ImportError(f"onebit's C kernel library (_onebit_kernels*.so) is not in {here}: the "
                      f"package was installed without building it; reinstall with a C compiler "
                      f"available (pip install -e . or pip install .)")


def _lib() -> ctypes.CDLL:
    global _lib_handle
    if _lib_handle is not None:
        return _lib_handle
    lib = ctypes.CDLL(str(_find_library()))
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    sigs = {
        "ob_quantize_act_i8": (i32, [p, i64, i64, i64, p, f32, p, p]),
        "ob_quantize_act_i4": (i32, [p, i64, i64, i64, p, f32, p, p]),
        "ob_quantize_act_topk_i8": (i32, [p, i64, i64, i64, p, f32, ctypes.c_double, p, p]),
        # every weight pointer is followed by the byte length of its buffer (w_bytes)
        "ob_transpose_packed_i2": (i32, [p, i64, i64, i64, p]),
        "ob_linear_colsparse_i2": (i32, [p, i64, i64, i64, p, i64, i64, f32, p, p]),
        "ob_linear_rows": (i32, [i32, p, i64, i64, i64, p, p, i64, f32, f32, p]),
        "ob_gemm_i2": (i32, [p, i64, i64, i64, p, i64, i64, p]),
        "ob_gemm_t1_6": (i32, [p, i64, i64, i64, p, i64, i64, p]),
        "ob_linear_i2": (i32, [p, i64, i64, i64, p, i64, i64, f32, p, p]),
        "ob_linear_t1_6": (i32, [p, i64, i64, i64, p, i64, i64, f32, p, p]),
        "ob_linear_i2_unchecked": (i32, [p, i64, i64, i64, p, i64, i64, f32, p, p]),
        "ob_linear_t1_6_unchecked": (i32, [p, i64, i64, i64, p, i64, i64, f32, p, p]),
        "ob_validate_packed": (i32, [p, i64, i64, i64, i32]),
        "ob_set_num_threads": (i32, [i32]),
        "ob_get_num_threads": (i32, []),
        "ob_isa": (ctypes.c_char_p, []),
        "ob_isa_supported": (i32, [ctypes.c_char_p]),
        "ob_set_isa": (i32, [ctypes.c_char_p]),
        "ob_abi_version": (i32, []),
        "ob_isa_class_for_m": (i32, [i64]),
        "ob_set_isa_class": (i32, [i32, ctypes.c_char_p]),
        "ob_isa_class": (ctypes.c_char_p, [i32]),
        "ob_pack": (i32, [p, i64, i64, i64, i32, p]),
        "ob_unpack": (i32, [p, i64, i64, i64, i32, p]),
        "ob_read_probe": (ctypes.c_uint64, [p, i64, i32]),
        "ob_glu": (i32, [p, p, i64, i32]),
        "ob_linear_i8": (i32, [p, i64, p, i64, i64, p, i64, i64, p, p]),
        "ob_linear_f16": (i32, [p, i64, i64, i64, p, i64, i64, p]),
        "ob_linear_i4": (i32, [p, i64, p, i64, i64, p, i64, i64, p, p]),
        "ob_attention": (i32, [p, p, p, i64, i64, i64, i64, i64, p, p, i64, p, p, i64, p]),
        "ob_kv_row_bytes": (i64, [i64, i32]),
        "ob_kv_quantize_rows": (i32, [p, i64, i64, i32, p, p]),
        "ob_kv_dequantize_rows": (i32, [p, p, i64, i64, i32, p]),
        "ob_kv_cache_bytes": (i64, [i64, i64, i64, i32]),
        "ob_attention_kv": (i32, [p, p, p, i64, i64, i64, i64, i64, p, p, i64, i32, p, p, i64, p]),
        "ob_decoder_layer": (i32, [p, p, i64, i64, p, p, i64, p, p, i64]),
        "ob_decoder_layer_batch": (i32, [p, p, i64, p, p, p, p, i64, p, p, i64]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    if lib.ob_abi_version() != _ABI_VERSION:
        raise ImportError(f"onebit's C kernel library has ABI {lib.ob_abi_version()}, this Python "
                          f"code needs {_ABI_VERSION}: rebuild it (pip install -e . or bash "
                          f"scripts/setup.sh)")
    env = os.environ.get("ONEBIT_KERNELS", "")
    if env and not lib.ob_isa_supported(env.encode()):
        warnings.warn(f"ONEBIT_KERNELS={env!r} is not available on this CPU/build (available: "
                      f"{_supported(lib)}); using the scalar reference kernels", stacklevel=3)
    elif not env and lib.ob_isa().decode() == "reference":
        warnings.warn("no SIMD kernel variant runs on this CPU; using the scalar reference "
                      "kernels (slow)", stacklevel=3)
    _lib_handle = lib
    return lib


def _supported(lib: ctypes.CDLL) -> list[str]:
    return [v for v in VARIANTS if lib.ob_isa_supported(v.encode())]


def isa() -> str:
    """Name of the kernel variant in use: "reference", "avx2" or "avx512vnni"."""
    return _lib().ob_isa().decode()


def plan() -> dict[str, str]:
    """The variant each shape class of the ternary GEMM runs now: {"gemv", "gemm8", "gemm128",
    "gemm512"} -> name (onebit.kernels.wisdom: kernel choice by measurement)."""
    from .wisdom import plan as _plan

    return _plan()


def isa_for(m: int) -> str:
    """The variant an ``m``-row ternary GEMM runs now (its shape class's choice)."""
    lib = _lib()
    return lib.ob_isa_class(lib.ob_isa_class_for_m(int(m))).decode()


def tune(force: bool = False) -> dict[str, str]:
    """This machine's per-class kernel choice: cached, else measured once (wisdom.tune)."""
    from .wisdom import tune as _tune

    return _tune(force=force)


def apply_plan(p: dict[str, str] | None) -> None:
    """Run each shape class with the variant ``p`` names (None: all follow ``isa()``)."""
    from .wisdom import apply_plan as _apply

    _apply(p)


def available_isas() -> list[str]:
    """Variants this build has and this CPU runs, slowest ("reference") first."""
    return _supported(_lib())


@contextlib.contextmanager
def use(impl: str) -> Iterator[str]:
    """Run the kernels with variant ``impl`` inside the block (process-wide; not thread-safe).

    An unknown name raises ValueError; a known one this CPU lacks falls back to "reference" with
    a warning. Yields the variant actually used.
    """
    if impl not in VARIANTS:
        raise ValueError(f"unknown kernel variant {impl!r}; use one of {VARIANTS}")
    lib = _lib()
    prev = lib.ob_isa()
    if not lib.ob_isa_supported(impl.encode()):
        warnings.warn(f"kernel variant {impl!r} does not run on this CPU (available: "
                      f"{_supported(lib)}); using the scalar reference", stacklevel=3)
        impl = "reference"
    _check_status(lib.ob_set_isa(impl.encode()), "use")  # every shape class runs impl
    try:
        yield impl
    finally:
        lib.ob_set_isa(prev)
        from . import wisdom

        if wisdom.applied_plan() is not None:  # the per-class plan the block overrode
            wisdom.apply_plan(wisdom.applied_plan())


def set_num_threads(n: int) -> None:
    """Threads the GEMM kernels may use (process-wide), an integer >= 1.

    The default is ``ONEBIT_NUM_THREADS`` or else the physical cores this process may run on.
    The caller's thread works too; pool workers spin ``ONEBIT_SPIN_US`` (default 50) µs after a
    call and then sleep, so they never compete with torch's threads between calls.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n={n!r} must be an integer >= 1")
    _check_status(_lib().ob_set_num_threads(int(n)), "set_num_threads")


def get_num_threads() -> int:
    """Threads the GEMM kernels use."""
    return _lib().ob_get_num_threads()


@contextlib.contextmanager
def threads(n: int) -> Iterator[int]:
    """Run the kernels with ``n`` threads inside the block (process-wide; not thread-safe)."""
    prev = get_num_threads()
    set_num_threads(n)
    try:
        yield n
    finally:
        set_num_threads(prev)


def read_probe(buf: np.ndarray, nthreads: int | None = None) -> int:
    """Read every byte of ``buf`` (uint8, contiguous) on ``nthreads`` threads; returns a checksum.

    The kernel bench times it to measure the machine's read bandwidth.
    """
    buf = _array(buf, "buf", np.uint8, (1, 2))
    if not buf.flags.c_contiguous:
        raise ValueError("buf must be contiguous; pass np.ascontiguousarray(buf)")
    return int(_lib().ob_read_probe(buf.ctypes.data, buf.size, nthreads or get_num_threads()))


def glu(g, u, act: str = "silu") -> np.ndarray:
    """The engine's gated activation: ``silu(g) * u`` (``act="silu"``, SwiGLU) or
    ``relu(g)**2 * u`` (``"relu2"``), float32 of any shape, as a new array (ob_glu)."""
    if act not in ("silu", "relu2"):
        raise ValueError(f"act={act!r} is not valid: use 'silu' or 'relu2'")
    g = np.array(_array(g, "g", np.float32, tuple(range(0, 9))), dtype=np.float32, order="C")
    u = np.ascontiguousarray(_array(u, "u", np.float32, tuple(range(0, 9))))
    if g.shape != u.shape:
        raise ValueError(f"g {g.shape} and u {u.shape} must have the same shape")
    _check_status(_lib().ob_glu(g.ctypes.data, u.ctypes.data, g.size, int(act == "relu2")), "glu")
    return g


# ---------------------------------------------------------------------------------------------
# Argument checks: everything C relies on is verified here, so C never sees a bad pointer/size.
# ---------------------------------------------------------------------------------------------

def _array(a, name: str, dtype: type, ndim: tuple[int, ...]) -> np.ndarray:
    if not isinstance(a, np.ndarray) and type(a).__module__.startswith("torch"):
        if a.device.type != "cpu":
            raise ValueError(f"{name} is on {a.device}; the C kernels need CPU memory: use .cpu()")
        a = a.detach().numpy()
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise TypeError(f"{name} must have dtype {np.dtype(dtype)}, got {a.dtype}; convert it with "
                        f".astype(np.{np.dtype(dtype).name})")
    if a.ndim not in ndim:
        raise ValueError(f"{name} must be {' or '.join(f'{d}-D' for d in ndim)}, got shape {a.shape}")
    if a.ctypes.data % a.itemsize:
        raise ValueError(f"{name} is not {a.itemsize}-byte aligned; pass np.ascontiguousarray({name}) "
                         f"or a fresh copy")
    return a


def _rows(a: np.ndarray, name: str) -> int:
    """Row stride (in elements) of a 2-D array whose rows are contiguous."""
    it = a.itemsize
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{name} must be non-empty, got shape {a.shape}")
    if a.strides[1] != it or a.strides[0] % it or a.strides[0] < a.shape[1] * it:
        if a.shape[0] == 1 and a.strides[1] == it:
            return a.shape[1]
        raise ValueError(f"{name} must have contiguous rows (strides {a.strides}); pass "
                         f"np.ascontiguousarray({name})")
    return a.strides[0] // it


def _vector(a, name: str, dtype: type, length: int) -> np.ndarray:
    a = _array(a, name, dtype, (1, 2))
    if a.ndim == 2 and a.shape[1] == 1:  # [m, 1], as quant.int8_absmax returns its scale
        a = a[:, 0]
    if a.shape != (length,):
        raise ValueError(f"{name} must have shape [{length}], got {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be contiguous; pass np.ascontiguousarray({name})")
    return a


def _check_status(st: int, fn: str) -> None:
    if st == 0:
        return
    if st == -4:
        raise PackedFormatError(f"{fn}: packed weights hold an invalid code/byte (i2 code 3 or an "
                                f"unused t1_6 byte); locate it with formats.packing.validate_packed "
                                f"and re-pack the matrix")
    if st == -7:
        raise ValueError(f"{fn}: the activation holds NaN or inf (after the norm); fix the input")
    if st == -6:
        raise MemoryError(f"{fn}: the C kernel could not allocate its scratch buffer")
    raise RuntimeError(f"{fn}: C kernel status {st} ({_ERRORS.get(st, 'unknown')}); this is a bug "
                       f"in the binding's checks")


def _weights(packed, k, layout: str) -> tuple[np.ndarray, int]:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown packed layout {layout!r}; known layouts: {sorted(LAYOUTS)}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= _MAX_K:
        raise ValueError(f"k={k!r} must be an integer in [1, {_MAX_K}] (the in_features of the "
                         f"matrix; larger k could overflow the int32 accumulators)")
    packed = _array(packed, "packed", np.uint8, (2,))
    rb = packed_row_bytes(int(k), layout)
    if packed.shape[0] < 1 or packed.shape[1] != rb:
        raise PackedFormatError(f"packed shape {packed.shape} does not fit k={k} with layout "
                                f"{layout!r}: a row of {k} weights is {rb} bytes; pass the K the "
                                f"matrix was packed with (and N >= 1)")
    if not packed.flags.c_contiguous:
        raise ValueError("packed must be C-contiguous; pass np.ascontiguousarray(packed)")
    return packed, int(k)


def _codes(x_codes, k: int) -> tuple[np.ndarray, int]:
    x = _array(x_codes, "x_codes", np.int8, (2,))
    if x.shape[1] != k:
        raise ValueError(f"x_codes has {x.shape[1]} columns but the weight has k={k} inputs; "
                         f"x_codes must be int8 [m, {k}]")
    return x, _rows(x, "x_codes")


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

def _quantize_args(x, norm_weight, eps):
    x = _array(x, "x", np.float32, (2,))
    ldx = _rows(x, "x")
    m, k = x.shape
    nw = None
    if norm_weight is not None:
        nw = _vector(norm_weight, "norm_weight", np.float32, k)
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
            raise ValueError(f"eps={eps!r} must be a finite number >= 0")
    return x, ldx, m, k, nw


def quantize_act_i8(x, norm_weight=None, eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """Per-token absmax INT8 of float32 x [m, k], optionally after RMSNorm with ``norm_weight`` [k].

    Returns (codes int8 [m, k], scale float32 [m]) with x ≈ codes * scale[:, None]; without norm
    the codes equal ``quant.int8_absmax`` bit for bit. Raises TypeError/ValueError on bad input
    (including NaN/inf).
    """
    x, ldx, m, k, nw = _quantize_args(x, norm_weight, eps)
    codes = np.empty((m, k), dtype=np.int8)
    scale = np.empty(m, dtype=np.float32)
    st = _lib().ob_quantize_act_i8(x.ctypes.data, m, k, ldx, None if nw is None else nw.ctypes.data,
                                   float(eps), codes.ctypes.data, scale.ctypes.data)
    _check_status(st, "quantize_act_i8")
    return codes, scale


def quantize_act_i4(x, norm_weight=None, eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """a4.8 per-token absmean INT4 of float32 x [m, k] (RMSNorm with ``norm_weight`` first if
    given): (codes int8 in [-8, 7] [m, k], scale float32 [m]), ``quant.int4_absmean``'s formula."""
    x, ldx, m, k, nw = _quantize_args(x, norm_weight, eps)
    codes, scale = np.empty((m, k), dtype=np.int8), np.empty(m, dtype=np.float32)
    st = _lib().ob_quantize_act_i4(x.ctypes.data, m, k, ldx, None if nw is None else nw.ctypes.data,
                                   float(eps), codes.ctypes.data, scale.ctypes.data)
    _check_status(st, "quantize_act_i4")
    return codes, scale


def quantize_act_topk_i8(x, keep: float = 0.5, norm_weight=None, eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """a4.8 o_proj input: keep the ceil(keep*k) largest |x| per row (ties: lowest index), zero the
    rest, then INT8 absmax (``quant.topk_sparsify`` then ``quant.int8_absmax``)."""
    x, ldx, m, k, nw = _quantize_args(x, norm_weight, eps)
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < float(keep) <= 1.0:
        raise ValueError(f"keep={keep!r} must be in (0, 1] (the fraction of entries kept per row)")
    codes, scale = np.empty((m, k), dtype=np.int8), np.empty(m, dtype=np.float32)
    st = _lib().ob_quantize_act_topk_i8(x.ctypes.data, m, k, ldx, None if nw is None else nw.ctypes.data,
                                        float(eps), float(keep), codes.ctypes.data, scale.ctypes.data)
    _check_status(st, "quantize_act_topk_i8")
    return codes, scale


def transpose_packed_i2(packed, k: int) -> np.ndarray:
    """The i2 packing of W^T for i2-packed W [n, k]: uint8 [k, row_bytes(n)] (the layout
    ``linear_colsparse_i2`` reads). Raises PackedFormatError for an invalid code."""
    packed, k = _weights(packed, k, "i2")
    n = packed.shape[0]
    if n > _MAX_K:
        raise ValueError(f"n={n} rows is more than {_MAX_K}: the transposed rows would overflow")
    wt = np.empty((k, packed_row_bytes(n, "i2")), dtype=np.uint8)
    _check_status(_lib().ob_transpose_packed_i2(packed.ctypes.data, packed.nbytes, n, k, wt.ctypes.data),
                  "transpose_packed_i2")
    return wt


def linear_colsparse_i2(wt, n: int, w_scale: float, x_codes, x_scale) -> np.ndarray:
    """``linear`` of W [n, k] given its transpose ``wt = transpose_packed_i2(W, k)`` [k, ...],
    reading only the columns of nonzero activations: float32 [m, n], bit-identical to
    ``linear(W, ...)``. ``wt`` is trusted like ``linear_unchecked``'s weights."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= _MAX_K:
        raise ValueError(f"n={n!r} must be an integer in [1, {_MAX_K}] (the out_features)")
    x = _array(x_codes, "x_codes", np.int8, (2,))
    ldx = _rows(x, "x_codes")
    k = x.shape[1]
    if k > _MAX_K:
        raise ValueError(f"x_codes has k={k} columns, more than {_MAX_K}")
    wt = _array(wt, "wt", np.uint8, (2,))
    if not wt.flags.c_contiguous:
        raise ValueError("wt must be C-contiguous; pass np.ascontiguousarray(wt)")
    if wt.shape != (k, packed_row_bytes(int(n), "i2")):
        raise PackedFormatError(f"wt shape {wt.shape} is not the transpose of an [{n}, {k}] i2 matrix "
                                f"(expected ({k}, {packed_row_bytes(int(n), 'i2')})); build it with "
                                f"transpose_packed_i2")
    m = x.shape[0]
    xs = _vector(x_scale, "x_scale", np.float32, m)
    w_scale = float(w_scale)
    if not (math.isfinite(w_scale) and w_scale >= 0):
        raise ValueError(f"w_scale={w_scale} must be finite and >= 0 (the tensor's mean|W|)")
    out = np.empty((m, int(n)), dtype=np.float32)
    _check_status(_lib().ob_linear_colsparse_i2(wt.ctypes.data, wt.nbytes, int(n), k, x.ctypes.data, m, ldx,
                                                w_scale, xs.ctypes.data, out.ctypes.data),
                  "linear_colsparse_i2")
    return out


def linear_rows(packed, k: int, layout: str, w_scale: float, x_codes, x_scale: float, rows) -> np.ndarray:
    """``linear_unchecked`` for ONE activation row [k] (or [1, k]), computing only the output rows
    listed in ``rows``: float32 [n] with NaN at every unlisted row."""
    packed, k = _weights(packed, k, layout)
    x = np.ascontiguousarray(_array(x_codes, "x_codes", np.int8, (1, 2)).reshape(-1))
    if x.shape[0] != k:
        raise ValueError(f"x_codes has {x.shape[0]} values but the weight has k={k} inputs")
    n = packed.shape[0]
    r = np.ascontiguousarray(np.asarray(rows, dtype=np.int64).reshape(-1))
    if r.size and (r.min() < 0 or r.max() >= n):
        raise ValueError(f"rows must lie in [0, {n}) (the weight's output rows)")
    w_scale, x_scale = float(w_scale), float(x_scale)
    out = np.full(n, np.nan, dtype=np.float32)
    _check_status(_lib().ob_linear_rows(0 if layout == "i2" else 1,
                                        packed.ctypes.data, packed.nbytes, n, k, x.ctypes.data,
                                        r.ctypes.data if r.size else None, r.size, w_scale, x_scale,
                                        out.ctypes.data), "linear_rows")
    return out


def gemm(packed, k: int, layout: str, x_codes) -> np.ndarray:
    """Exact int32 ``x_codes [m, k] @ W[n, k]^T`` -> [m, n]; W packed uint8 [n, row_bytes(k)].

    Raises PackedFormatError (a ValueError) for a packed shape that does not fit k or an invalid
    packed byte, TypeError/ValueError for other bad arguments.
    """
    packed, k = _weights(packed, k, layout)
    x, ldx = _codes(x_codes, k)
    m, n = x.shape[0], packed.shape[0]
    acc = np.empty((m, n), dtype=np.int32)
    fn = _lib().ob_gemm_i2 if layout == "i2" else _lib().ob_gemm_t1_6
    _check_status(fn(packed.ctypes.data, packed.nbytes, n, k, x.ctypes.data, m, ldx, acc.ctypes.data),
                  "gemm")
    return acc


def linear(packed, k: int, layout: str, w_scale: float, x_codes, x_scale) -> np.ndarray:
    """BitLinear output float32 [m, n] = gemm(...) * w_scale * x_scale[row] (in that order)."""
    return _linear(packed, k, layout, w_scale, x_codes, x_scale, checked=True)


def _linear(packed, k, layout, w_scale, x_codes, x_scale, *, checked: bool) -> np.ndarray:
    packed, k = _weights(packed, k, layout)
    x, ldx = _codes(x_codes, k)
    m, n = x.shape[0], packed.shape[0]
    xs = _vector(x_scale, "x_scale", np.float32, m)
    w_scale = float(w_scale)
    if not (math.isfinite(w_scale) and w_scale >= 0):
        raise ValueError(f"w_scale={w_scale} must be finite and >= 0 (the tensor's mean|W|)")
    out = np.empty((m, n), dtype=np.float32)
    lib = _lib()
    if checked:
        fn = lib.ob_linear_i2 if layout == "i2" else lib.ob_linear_t1_6
    else:
        fn = lib.ob_linear_i2_unchecked if layout == "i2" else lib.ob_linear_t1_6_unchecked
    _check_status(fn(packed.ctypes.data, packed.nbytes, n, k, x.ctypes.data, m, ldx, w_scale,
                     xs.ctypes.data, out.ctypes.data), "linear" if checked else "linear_unchecked")
    return out


def pack(codes, layout: str) -> np.ndarray:
    """C twin of ``formats.packing.pack`` (byte-identical): int8 [N, K] in {-1,0,1} -> uint8."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown packed layout {layout!r}; known layouts: {sorted(LAYOUTS)}")
    codes = _array(codes, "codes", np.int8, (2,))
    _check_codes(codes)
    ldc = _rows(codes, "codes")
    n, k = codes.shape
    if k > _MAX_K:
        raise ValueError(f"codes has k={k} columns; the kernels take at most {_MAX_K}")
    out = np.empty((n, packed_row_bytes(k, layout)), dtype=np.uint8)
    _check_status(_lib().ob_pack(codes.ctypes.data, n, k, ldc, _LAYOUT_ID[layout], out.ctypes.data),
                  "pack")
    return out


def unpack(packed, k: int, layout: str) -> np.ndarray:
    """C twin of ``formats.packing.unpack``: uint8 [N, row_bytes(k)] -> int8 [N, k].

    Raises PackedFormatError for an invalid byte or nonzero padding (locate it with
    ``formats.packing.validate_packed``).
    """
    packed, k = _weights(packed, k, layout)
    out = np.empty((packed.shape[0], k), dtype=np.int8)
    st = _lib().ob_unpack(packed.ctypes.data, packed.nbytes, packed.shape[0], k, _LAYOUT_ID[layout],
                          out.ctypes.data)
    if st == -4:
        raise PackedFormatError("unpack: packed weights hold an invalid code/byte or nonzero "
                                "padding; locate it with formats.packing.validate_packed")
    _check_status(st, "unpack")
    return out


def linear_i8(w, w_scale, x_codes, x_scale) -> np.ndarray:
    """8-bit linear (the int8 LM head): float32 [m, n] = (w @ x^T) * w_scale[j] * x_scale[r].

    ``w`` int8 [n, k] with per-row ``w_scale`` float32 [n]; ``x_codes`` int8 [m, k] in
    [-127, 127] (``quantize_act_i8`` output) with ``x_scale`` float32 [m].
    """
    w = _array(w, "w", np.int8, (2,))
    if not w.flags.c_contiguous or w.shape[0] < 1 or w.shape[1] < 1:
        raise ValueError(f"w must be a non-empty C-contiguous int8 [n, k], got shape {w.shape}")
    n, k = w.shape
    ws = _vector(w_scale, "w_scale", np.float32, n)
    x, ldx = _codes(x_codes, k)
    m = x.shape[0]
    xs = _vector(x_scale, "x_scale", np.float32, m)
    out = np.empty((m, n), dtype=np.float32)
    st = _lib().ob_linear_i8(w.ctypes.data, w.nbytes, ws.ctypes.data, n, k, x.ctypes.data, m, ldx,
                             xs.ctypes.data, out.ctypes.data)
    if st == -7:
        raise ValueError("linear_i8: an activation code is -128; the int8 head takes codes in "
                         "[-127, 127] (quantize_act_i8 never writes -128)")
    _check_status(st, "linear_i8")
    return out


def attention(q, k, v, pos: int, rope_cos, rope_sin, cache_k, cache_v) -> np.ndarray:
    """RoPE + KV-cache write + causal GQA attention for T new tokens (the engine's layer step).

    ``q`` float32 [T, H, hd] and ``k`` [T, Hkv, hd] are rotated IN PLACE; ``v`` [T, Hkv, hd];
    ``rope_cos/rope_sin`` float32 [L, hd/2]; caches float32 [Hkv, cache_len, hd] (written at
    positions pos..pos+T-1). Returns y float32 [T, H*hd].
    """
    q = _array(q, "q", np.float32, (3,))
    T, H, hd = q.shape
    k = _array(k, "k", np.float32, (3,))
    v = _array(v, "v", np.float32, (3,))
    Hkv = k.shape[1]
    if k.shape != (T, Hkv, hd) or v.shape != k.shape or Hkv < 1 or H % Hkv or hd % 2:
        raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape}: need q [T, H, hd], k and v "
                         f"[T, Hkv, hd] with H a multiple of Hkv and hd even")
    cos = _array(rope_cos, "rope_cos", np.float32, (2,))
    sin = _array(rope_sin, "rope_sin", np.float32, (2,))
    ck = _array(cache_k, "cache_k", np.float32, (3,))
    cv = _array(cache_v, "cache_v", np.float32, (3,))
    if cos.shape != sin.shape or cos.shape[1] != hd // 2:
        raise ValueError(f"rope tables {cos.shape}/{sin.shape} must both be [L, {hd // 2}]")
    if ck.shape != cv.shape or ck.shape[0] != Hkv or ck.shape[2] != hd:
        raise ValueError(f"caches {ck.shape}/{cv.shape} must both be [{Hkv}, cache_len, {hd}]")
    if isinstance(pos, bool) or not isinstance(pos, (int, np.integer)) or pos < 0 \
            or pos + T > min(ck.shape[1], cos.shape[0]):
        raise ValueError(f"pos={pos!r}: positions pos..pos+{T - 1} must fit the cache "
                         f"({ck.shape[1]}) and the rope tables ({cos.shape[0]})")
    for a, name in ((q, "q"), (k, "k"), (v, "v"), (cos, "rope_cos"), (sin, "rope_sin"),
                    (ck, "cache_k"), (cv, "cache_v")):
        if not a.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous; pass np.ascontiguousarray({name})")
        if not a.flags.writeable and name in ("q", "k", "cache_k", "cache_v"):
            raise ValueError(f"{name} is read-only; it is written in place")
    y = np.empty((T, H * hd), dtype=np.float32)
    st = _lib().ob_attention(q.ctypes.data, k.ctypes.data, v.ctypes.data, T, int(pos), H, Hkv, hd,
                             cos.ctypes.data, sin.ctypes.data, cos.shape[0], ck.ctypes.data,
                             cv.ctypes.data, ck.shape[1], y.ctypes.data)
    _check_status(st, "attention")
    return y


def validate(packed, k: int, layout: str) -> None:
    """Check every packed byte is a valid code byte (C, threaded, memory speed); raise
    PackedFormatError otherwise. Padding values are not checked (kernels ignore them)."""
    packed, k = _weights(packed, k, layout)
    st = _lib().ob_validate_packed(packed.ctypes.data, packed.nbytes, packed.shape[0], k,
                                   _LAYOUT_ID[layout])
    _check_status(st, "validate")


def linear_unchecked(packed, k: int, layout: str, w_scale: float, x_codes, x_scale) -> np.ndarray:
    """``linear`` for weights that passed ``validate``: skips the per-call code check."""
    return _linear(packed, k, layout, w_scale, x_codes, x_scale, checked=False)


def linear_f16(w, x) -> np.ndarray:
    """float16 weights [n, k] x float32 activations [m, k] -> float32 [m, n] (the fp16 LM head)."""
    w = _array(w, "w", np.float16, (2,))
    if not w.flags.c_contiguous or w.shape[0] < 1 or w.shape[1] < 1:
        raise ValueError(f"w must be a non-empty C-contiguous float16 [n, k], got shape {w.shape}")
    n, k = w.shape
    x = _array(x, "x", np.float32, (2,))
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} columns but w has k={k}")
    ldx = _rows(x, "x")
    out = np.empty((x.shape[0], n), dtype=np.float32)
    _check_status(_lib().ob_linear_f16(w.ctypes.data, w.nbytes, n, k, x.ctypes.data, x.shape[0], ldx,
                                       out.ctypes.data), "linear_f16")
    return out


def linear_i4(w_packed, k: int, w_scale, x_codes, x_scale) -> np.ndarray:
    """4-bit linear: float32 [m, n] = (q @ x^T) * w_scale[j] * x_scale[r], q unpacked from
    ``pack_i4`` bytes; ``x_codes`` int8 in [-127, 127] (``quantize_act_i8``)."""
    w = _array(w_packed, "w_packed", np.uint8, (2,))
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= _MAX_K:
        raise ValueError(f"k={k!r} must be an integer in [1, {_MAX_K}]")
    k = int(k)
    if not w.flags.c_contiguous or w.shape[0] < 1 or w.shape[1] != -(-k // 64) * 32:
        raise ValueError(f"w_packed {w.shape} does not fit k={k}: rows of {-(-k // 64) * 32} bytes")
    n = w.shape[0]
    ws = _vector(w_scale, "w_scale", np.float32, n)
    x, ldx = _codes(x_codes, k)
    m = x.shape[0]
    xs = _vector(x_scale, "x_scale", np.float32, m)
    out = np.empty((m, n), dtype=np.float32)
    st = _lib().ob_linear_i4(w.ctypes.data, w.nbytes, ws.ctypes.data, n, k, x.ctypes.data, m, ldx,
                             xs.ctypes.data, out.ctypes.data)
    if st == -7:
        raise ValueError("linear_i4: an activation code is -128; use codes in [-127, 127]")
    _check_status(st, "linear_i4")
    return out


def _kv_bits(bits) -> int:
    if isinstance(bits, bool) or bits not in (16, 8, 4, 3):
        raise ValueError(f"bits={bits!r} is not a KV cache width: use 16 (float16), 8, 4 or 3")
    return int(bits)


def kv_quantize(x, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """K/V rows float32 ``[..., hd]`` -> (packed codes uint8 ``[..., ceil(hd*bits/8)]``, step
    float16 ``[...]``), byte-identical to ``onebit.quant.quantize_kv`` (docs/formats.md §10).
    ``bits=16``: the row as little-endian IEEE float16 (``np.clip(x, -65504, 65504)
    .astype(np.float16)``), step 1.0."""
    bits = _kv_bits(bits)
    x = np.ascontiguousarray(_array(x, "x", np.float32, tuple(range(1, 9))))
    hd = x.shape[-1]
    n = x.size // hd if hd else 0
    if hd < 1 or n < 1:
        raise ValueError(f"x {x.shape} must hold at least one row of at least one value")
    rb = _lib().ob_kv_row_bytes(hd, bits)
    out = np.empty(x.shape[:-1] + (rb,), np.uint8)
    step = np.empty(x.shape[:-1], np.float16)
    st = _lib().ob_kv_quantize_rows(x.ctypes.data, n, hd, bits, out.ctypes.data, step.ctypes.data)
    if st == -7:
        raise ValueError("kv_quantize: x holds NaN or inf; a KV row must be finite")
    _check_status(st, "kv_quantize")
    return out, step


def kv_dequantize(packed, step, bits: int, head_dim: int) -> np.ndarray:
    """Inverse of ``kv_quantize``: float32 ``[..., head_dim]`` = (codes - (2^(bits-1) - 1/2)) * step
    (``bits=16``: the float16 values)."""
    bits = _kv_bits(bits)
    rb = _lib().ob_kv_row_bytes(int(head_dim), bits)
    packed = np.ascontiguousarray(_array(packed, "packed", np.uint8, tuple(range(1, 9))))
    step = np.ascontiguousarray(_array(step, "step", np.float16, tuple(range(0, 8))))
    if rb < 1 or packed.shape[-1] != rb or step.shape != packed.shape[:-1] or step.size < 1:
        raise ValueError(f"packed {packed.shape} / step {step.shape}: need packed [..., {rb}] and "
                         f"step [...] for head_dim={head_dim} at {bits} bits")
    out = np.empty(packed.shape[:-1] + (int(head_dim),), np.float32)
    st = _lib().ob_kv_dequantize_rows(packed.ctypes.data, step.ctypes.data, step.size, int(head_dim),
                                      bits, out.ctypes.data)
    _check_status(st, "kv_dequantize")
    return out
