"""Kernel choice by measurement (like FFTW's wisdom): per shape class of the ternary GEMM, the
variant that ran fastest on this machine, measured once and cached.

The C library picks one variant by CPU detection (the newest ISA it runs). That is not always the
fastest: which of avx2, avx512vnni (256-bit) and avx512vnni_zmm wins depends on the CPU and on the
number of activation rows m (a decode GEMV reads memory, a prefill GEMM multiplies). So for each
class of m (C: ``ob_isa_class_for_m``) -- ``gemv`` (m < 8), ``gemm8`` (8-23), ``gemm128``
(24-255), ``gemm512`` (>= 256) -- :func:`tune` times every variant this CPU runs but the scalar
reference, interleaved (A B C A B C ...; each variant's fastest round counts), at m = 1, 8, 128, 512 on i2 weights
of a 2B4T-sized projection (the GEMV's weights rotate over copies larger than the L3, as a decode
step streams them), on one thread, and keeps the fastest. One thread: the variants differ per core
(threads split the output columns the same way for all of them), and on a shared machine a
two-thread timing needs both cores free at once, so its rounds scatter far more (measured on the
2-core VM at load 8: the 2-thread choice changed from run to run, the 1-thread one never did). Every variant gives
the same integers, so the choice only moves speed.

The choice is cached in ``$ONEBIT_CACHE_DIR`` (else ``$XDG_CACHE_HOME/onebit``, else
``~/.cache/onebit``) ``/kernel-wisdom.json``, keyed by the CPU (model name and feature flags),
onebit's version, the kernel ABI and a hash of the kernel library file: a new build or another
machine measures again. :func:`ensure_plan` (called when the engine loads a
model) applies the cached plan, measuring first -- in a child process, so its ~70 MB of weight
copies never count in the caller's memory -- if there is none. ``ONEBIT_KERNELS=<variant>`` (all
classes run it) or ``ONEBIT_TUNE=0`` (CPU detection's single choice) turn it off;
``onebit bench kernels --tune`` measures again and prints the table.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["CLASSES", "CLASS_M", "cache_path", "machine_key", "measure", "tune", "load_plan",
           "apply_plan", "ensure_plan", "plan", "applied_plan", "plan_text"]

CLASSES = ("gemv", "gemm8", "gemm128", "gemm512")  # C: OB_ISA_GEMV .. OB_ISA_GEMM_L
CLASS_M = {"gemv": 1, "gemm8": 8, "gemm128": 128, "gemm512": 512}  # m each class is timed at
# (n, k) timed per class: 2B4T's gate/up projection for the GEMV (memory-bound, so a big one), a
# square 2B4T one for the GEMMs (compute-bound; m = 512 on a smaller one keeps tuning ~1 s)
CLASS_SHAPE = {"gemv": (6912, 2560), "gemm8": (2560, 2560), "gemm128": (2560, 2560),
               "gemm512": (1536, 1536)}
WISDOM_VERSION = 1
MAX_ENTRIES = 16

_applied: dict[str, str] | None = None  # the plan apply_plan set last (use() restores it)


def cache_path() -> Path:
    base = os.environ.get("ONEBIT_CACHE_DIR")
    if not base:
        base = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "onebit")
    return Path(base) / "kernel-wisdom.json"


def _cpu() -> tuple[str, str]:
    model, flags = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model", "CPU part") and not model:
                model = val.strip()
            elif key in ("flags", "Features") and not flags:
                flags = " ".join(sorted(val.split()))
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags


def _lib_hash() -> str:
    from . import _find_library

    h = hashlib.sha256()
    with open(_find_library(), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def machine_key() -> str:
    """What a cached plan is valid for: CPU model + flags, onebit, ABI, library build."""
    from .. import __version__
    from . import _ABI_VERSION

    model, flags = _cpu()
    fl = hashlib.sha256(flags.encode()).hexdigest()[:12]
    return f"{model} | flags {fl} | onebit {__version__} | abi {_ABI_VERSION} | lib {_lib_hash()}"


def candidates() -> list[str]:
    """The variants a plan may choose from: every one this CPU runs but the scalar reference."""
    from . import available_isas

    return [v for v in available_isas() if v != "reference"]


def measure(rounds: int = 7, sample_s: float = 0.01, seed: int = 0) -> dict:
    """Time every candidate per class in this process (see the module docstring). Returns
    ``{"plan": {class: variant}, "us": {class: {variant: its fastest round, µs per call}},
    "ratio": {class: {variant: [min, median, max] over rounds of its time / the chosen one's in the
    same round]}}, "load": ...}``: the fastest variant by its fastest round."""
    from . import _lib, threads

    with threads(1):
        return _measure(_lib(), rounds, sample_s, seed)


def _measure(lib, rounds: int, sample_s: float, seed: int) -> dict:
    from . import get_num_threads, pack

    cands = candidates()
    rng = np.random.default_rng(seed)
    out: dict = {"plan": {}, "us": {}, "ratio": {}, "threads": get_num_threads(), "rounds": rounds,
                 "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    prev = lib.ob_isa()
    try:
        for cls in CLASSES:
            m, (n, k) = CLASS_M[cls], CLASS_SHAPE[cls]
            w = pack(rng.integers(-1, 2, size=(n, k), dtype=np.int8), "i2")
            copies = [w]
            if m == 1:  # a decode GEMV streams its weights from memory: rotate past the L3
                copies += [w.copy() for _ in range(max(1, (64 << 20) // w.nbytes))]
            x = rng.integers(-127, 128, size=(m, k), dtype=np.int8)
            acc = np.empty((m, n), np.int32)
            ptrs = [c.ctypes.data for c in copies]
            state = [0]

            def call() -> None:
                p = ptrs[state[0] % len(ptrs)]
                state[0] += 1
                st = lib.ob_gemm_i2(p, w.nbytes, n, k, x.ctypes.data, m, k, acc.ctypes.data)
                if st:
                    raise RuntimeError(f"ob_gemm_i2 failed (status {st}) while tuning")

            batch = {}
            for v in cands:
                lib.ob_set_isa(v.encode())
                call()
                t0 = time.perf_counter()
                call()
                batch[v] = max(1, min(2000, round(sample_s / max(time.perf_counter() - t0, 1e-7))))
            times: dict[str, list[float]] = {v: [] for v in cands}
            for _ in range(rounds):
                for v in cands:
                    lib.ob_set_isa(v.encode())
                    call()  # untimed: this variant's code and threads warm
                    t0 = time.perf_counter()
                    for _ in range(batch[v]):
                        call()
                    times[v].append((time.perf_counter() - t0) / batch[v])
            # the fastest round of each: on a shared machine neighbours only ever add time, so the
            # minimum is the estimate of a variant's own speed least hit by them
            best_t = {v: min(ts) for v, ts in times.items()}
            best = min(cands, key=lambda v: best_t[v])
            out["plan"][cls] = best
            out["us"][cls] = {v: round(t * 1e6, 2) for v, t in best_t.items()}
            out["ratio"][cls] = {v: [round(f(a / b for a, b in zip(times[v], times[best])), 3)
                                     for f in (min, statistics.median, max)] for v in cands}
    finally:
        lib.ob_set_isa(prev)
    return out


def _read() -> dict:
    try:
        data = json.loads(cache_path().read_text(encoding="utf-8"))
        if isinstance(data, dict) and data.get("version") == WISDOM_VERSION and isinstance(data.get("entries"), dict):
            return data
    except (OSError, ValueError):
        pass
    return {"version": WISDOM_VERSION, "entries": {}}


def _valid(plan) -> bool:
    cands = candidates()
    return isinstance(plan, dict) and all(plan.get(c) in cands for c in CLASSES)


def load_plan(key: str | None = None) -> dict[str, str] | None:
    """The cached plan for this machine and build, or None."""
    entry = _read()["entries"].get(key or machine_key())
    plan = entry.get("plan") if isinstance(entry, dict) else None
    return dict(plan) if _valid(plan) else None


def save(key: str, result: dict) -> Path:
    """Store ``result`` (from :func:`measure`) under ``key``; atomic, keeps the newest entries."""
    from ..atomic import atomic_write_text

    data = _read()
    entries = data["entries"]
    entries.pop(key, None)
    entries[key] = {**result, "when": datetime.datetime.now().isoformat(timespec="seconds")}
    while len(entries) > MAX_ENTRIES:
        entries.pop(next(iter(entries)))
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=False) + "\n")
    return path


def tune(force: bool = False, child: bool = True) -> dict[str, str]:
    """The plan for this machine: the cached one, else measured (in a child process unless
    ``child=False``) and cached. ``force`` measures again."""
    key = machine_key()
    if not force:
        plan = load_plan(key)
        if plan is not None:
            return plan
    if len(candidates()) < 2:  # nothing to choose
        return {c: (candidates() or ["reference"])[0] for c in CLASSES}
    print(f"onebit: timing the kernel variants once for this machine (a few seconds; cached in "
          f"{cache_path()})", file=sys.stderr)
    if child:
        code = "import json\nfrom onebit.kernels import wisdom\nprint(json.dumps(wisdom.measure()))"
        env = {**os.environ, "ONEBIT_TUNE": "0"}
        env.pop("ONEBIT_KERNELS", None)
        r = subprocess.run([sys.executable, "-c", code], env=env,
                           stdout=subprocess.PIPE, text=True, check=True, timeout=600)
        result = json.loads(r.stdout.strip().splitlines()[-1])
    else:
        result = measure()
    try:
        save(key, result)
    except (OSError, ValueError) as e:  # a read-only home: the plan still applies to this process
        import warnings

        warnings.warn(f"could not cache the kernel choice in {cache_path()} ({e}); set "
                      f"ONEBIT_CACHE_DIR to a writable folder to keep it", stacklevel=2)
    return dict(result["plan"])


def apply_plan(plan: dict[str, str] | None) -> None:
    """Make each class run its variant (None: every class follows ``kernels.isa()`` again)."""
    global _applied
    from . import _check_status, _lib

    lib = _lib()
    for i, cls in enumerate(CLASSES):
        name = plan.get(cls) if plan else None
        _check_status(lib.ob_set_isa_class(i, name.encode() if name else None), "apply_plan")
    _applied = dict(plan) if plan else None


def applied_plan() -> dict[str, str] | None:
    return _applied


def plan() -> dict[str, str]:
    """The variant each class runs now."""
    from . import _lib

    lib = _lib()
    return {cls: lib.ob_isa_class(i).decode() for i, cls in enumerate(CLASSES)}


def enabled() -> bool:
    return not os.environ.get("ONEBIT_KERNELS") and os.environ.get("ONEBIT_TUNE", "1") != "0"


def ensure_plan() -> dict[str, str] | None:
    """Apply this machine's plan (measured once if missing) unless ONEBIT_KERNELS forces a variant
    or ONEBIT_TUNE=0; a plan already applied in this process stays. Returns the applied plan."""
    if _applied is not None or not enabled():
        return _applied
    apply_plan(tune())
    return _applied


def plan_text(plan: dict) -> str:
    """``gemv avx2, gemm8/128/512 avx512vnni_zmm``: the kernel each shape class runs"""
    groups: dict[str, list[str]] = {}
    for cls, v in plan.items():
        groups.setdefault(v, []).append(cls)
    if len(groups) == 1:
        return f"{next(iter(groups))} (every shape class)"
    return ", ".join(("gemm" + "/".join(c[4:] for c in cs) if len(cs) > 1 and all(c.startswith("gemm") for c in cs)
                      else "/".join(cs)) + f" {v}" for v, cs in groups.items())
