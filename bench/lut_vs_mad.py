"""Lookup-table ("avx2_lut") vs multiply-add ("avx2") i2 GEMV, exact int32, through onebit.kernels.gemm.

For each shape N x K, m and thread count the variants run in alternating short batches (ABBA
order, so drift and the neighbours' load hit both alike); every call is timed on its own. The
machine is shared, so the table gives the *minimum* per-call time (the least disturbed run) and
the ratio of minima; "med" is the ratio of medians, as a noise check. Columns:

  mad     use("avx2")      multiply-add row kernel (vpmaddubsw)
  lut     use("avx2_lut")  table lookup on the on-disk i2 bytes (16x16 transposition in the call)
  lut/mad                  < 1 means the table lookup wins
  --repacked adds, both called through the library handle with ctypes (no Python-side checks,
  so compare them with each other, not with the columns above):
  madc    ob_gemm_i2 with "avx2" active
  pre     the LUT inner loop on weights transposed once ahead of time (ob_avx2lut_repack_i2, not
          timed): what a load-time repack would give. Not public API.

Every variant's result is checked against the "avx2" one before timing.

    PYTHONPATH=src python bench/lut_vs_mad.py [--seconds 0.2] [--rounds 6] [--repacked]
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import statistics
import time

import numpy as np

from onebit import kernels as K
from onebit.formats import pack

SHAPES = [(2560, 2560), (640, 2560), (6912, 2560), (2560, 6912), (1536, 1536), (4096, 1536), (1536, 4096)]


def _batch(fn, reps: int, isa: str | None) -> list[float]:
    out = []
    ctx = K.use(isa) if isa else contextlib.nullcontext()
    with ctx:
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return out


def _repacked_fn(packed: np.ndarray, k: int, x: np.ndarray):
    lib = K._lib()
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.ob_avx2lut_repacked_bytes.restype, lib.ob_avx2lut_repacked_bytes.argtypes = i64, [i64, i64]
    lib.ob_avx2lut_repack_i2.restype, lib.ob_avx2lut_repack_i2.argtypes = ctypes.c_int, [p, i64, i64, p]
    lib.ob_avx2lut_gemv_repacked.restype = ctypes.c_int
    lib.ob_avx2lut_gemv_repacked.argtypes = [p, i64, i64, p, i64, i64, p]
    n = packed.shape[0]
    raw = np.empty(lib.ob_avx2lut_repacked_bytes(n, k) + 64, np.uint8)
    off = (-raw.ctypes.data) % 64
    wr = raw[off:off + lib.ob_avx2lut_repacked_bytes(n, k)]
    assert lib.ob_avx2lut_repack_i2(packed.ctypes.data, n, k, wr.ctypes.data) == 0
    m = x.shape[0]
    acc = np.empty((m, n), np.int32)

    def call():
        st = lib.ob_avx2lut_gemv_repacked(wr.ctypes.data, n, k, x.ctypes.data, m, k, acc.ctypes.data)
        assert st == 0, st
        return acc

    return call, raw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=0.2, help="time per variant per round")
    ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds per case")
    ap.add_argument("--repacked", action="store_true", help="also time the LUT on pre-transposed weights")
    ap.add_argument("--m", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    lib = K._lib()
    print(f"avx2 (multiply-add) vs avx2_lut (table lookup), i2 GEMV, exact int32: min µs per call over "
          f"{args.rounds} interleaved rounds of ~{args.seconds}s per variant")
    hdr = f"{'N x K':>11} {'m':>2} {'thr':>3} {'mad':>8} {'lut':>8} {'lut/mad':>8} {'(med)':>6}"
    if args.repacked:
        hdr += f" {'madc':>8} {'pre':>8} {'pre/madc':>8} {'(med)':>6}"
    print(hdr)
    for n, k in SHAPES:
        w = rng.integers(-1, 2, size=(n, k), dtype=np.int8)
        packed = pack(w, "i2")
        for m in args.m:
            x = rng.integers(-128, 128, size=(m, k), dtype=np.int8)
            with K.use("avx2"):
                want = K.gemm(packed, k, "i2", x)
            with K.use("avx2_lut"):
                assert np.array_equal(K.gemm(packed, k, "i2", x), want), "avx2_lut differs"

            def public():
                K.gemm(packed, k, "i2", x)

            fns = {"mad": (public, "avx2"), "lut": (public, "avx2_lut")}
            if args.repacked:
                acc = np.empty((m, n), np.int32)

                def direct():
                    lib.ob_gemm_i2(packed.ctypes.data, packed.nbytes, n, k, x.ctypes.data, m, k,
                                   acc.ctypes.data)

                pre, _keep = _repacked_fn(packed, k, x)
                assert np.array_equal(pre(), want), "repacked LUT differs"
                fns["madc"] = (direct, "avx2")
                fns["pre"] = (pre, None)
            for nt in args.threads:
                with K.threads(nt):
                    reps = {}
                    for name, (f, isa) in fns.items():  # warm up, size the batches
                        _batch(f, 2, isa)
                        reps[name] = max(3, int(args.seconds / max(min(_batch(f, 5, isa)), 1e-7)))
                    times: dict[str, list[float]] = {name: [] for name in fns}
                    for r in range(args.rounds):
                        order = list(fns) if r % 2 == 0 else list(fns)[::-1]  # ABBA
                        for name in order:
                            times[name] += _batch(fns[name][0], reps[name], fns[name][1])
                best = {name: min(t) * 1e6 for name, t in times.items()}
                med = {name: statistics.median(t) * 1e6 for name, t in times.items()}
                line = (f"{n:>5}x{k:<5} {m:>2} {nt:>3} {best['mad']:>8.1f} {best['lut']:>8.1f} "
                        f"{best['lut'] / best['mad']:>8.2f} {med['lut'] / med['mad']:>6.2f}")
                if args.repacked:
                    line += (f" {best['madc']:>8.1f} {best['pre']:>8.1f} {best['pre'] / best['madc']:>8.2f}"
                             f" {med['pre'] / med['madc']:>6.2f}")
                print(line, flush=True)


if __name__ == "__main__":
    main()
