"""Which kernel variant wins where: every variant this CPU runs, per shape class, interleaved.

    .venv/bin/python bench/isa_shapes.py [--threads 1,2] [--m 1,8,128,512] [--reps 7]
                                         [--isas avx2,avx512vnni,...] [--shapes 2b4t,700m] [--json]

For each projection shape of the 2B4T and 700M models, each m (1 = GEMV, decode; 8/128/512 =
prefill GEMMs) and each thread count, the variants run in interleaved rounds (A B C A B C ...,
``ob_set_isa`` switched before each batch: the switch is a pointer store), each batch a few ms of
back-to-back raw ``ob_gemm_i2`` calls through ctypes (pointers computed once). Weights rotate over
copies totalling > 2x the L3, so a GEMV streams them from memory as in a decode step. Reported:
the median µs per call and, per variant, the range (min..max over rounds) of its time divided by
the baseline's (``--base``, default avx2) time in the same round: the ratio is what to trust on a
shared, noisy machine. Every variant's result is checked against the baseline's first (exact).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

from onebit import kernels as K

SHAPES = {"2b4t": ((2560, 2560), (640, 2560), (6912, 2560), (2560, 6912)),
          "700m": ((1536, 1536), (4096, 1536), (1536, 4096)),
          "3b": ((3200, 3200), (8640, 3200), (3200, 8640)),
          "8b": ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--m", default="1,8,128,512")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--isas", default=None, help="default: every variant this CPU runs but the reference")
    ap.add_argument("--base", default="avx2")
    ap.add_argument("--shapes", default="2b4t,700m")
    ap.add_argument("--layout", default="i2", choices=["i2", "t1_6"])
    ap.add_argument("--sample-ms", type=float, default=4.0)
    ap.add_argument("--json", default=None, help="write the rows to this file")
    a = ap.parse_args(argv)
    isas = a.isas.split(",") if a.isas else [v for v in K.available_isas() if v != "reference"]
    if a.base not in isas:
        isas.insert(0, a.base)
    lib = K._lib()
    fn = lib.ob_gemm_i2 if a.layout == "i2" else lib.ob_gemm_t1_6
    rng = np.random.default_rng(0)
    rows = []
    print(f"# {os.uname().nodename} load {os.getloadavg()[0]:.2f}; variants {isas}; base {a.base}",
          file=sys.stderr)
    for shp in a.shapes.split(","):
        for n, k in SHAPES[shp]:
            codes = rng.integers(-1, 2, size=(n, k), dtype=np.int8)
            w = K.pack(codes, a.layout)
            copies = [w] + [w.copy() for _ in range(max(0, (96 << 20) // w.nbytes))]
            ptrs = [c.ctypes.data for c in copies]
            for m in [int(v) for v in a.m.split(",")]:
                x = rng.integers(-127, 128, size=(m, k), dtype=np.int8)
                acc = np.empty((m, n), np.int32)
                want = None
                for v in isas:
                    K._lib().ob_set_isa(v.encode())
                    assert fn(ptrs[0], w.nbytes, n, k, x.ctypes.data, m, k, acc.ctypes.data) == 0
                    if want is None:
                        want = acc.copy()
                    elif not np.array_equal(acc, want):
                        raise SystemExit(f"{v} disagrees with {isas[0]} on {n}x{k} m={m}")
                for nt in [int(v) for v in a.threads.split(",")]:
                    K.set_num_threads(nt)
                    it = [0]

                    def call():
                        p = ptrs[it[0] % len(ptrs)]
                        it[0] += 1
                        return fn(p, w.nbytes, n, k, x.ctypes.data, m, k, acc.ctypes.data)

                    batch = {}
                    for v in isas:  # size the batches
                        K._lib().ob_set_isa(v.encode())
                        call()
                        t0 = time.perf_counter()
                        call()
                        batch[v] = max(1, round(a.sample_ms * 1e-3 / (time.perf_counter() - t0)))
                    times = {v: [] for v in isas}
                    for _ in range(a.reps):
                        for v in isas:
                            K._lib().ob_set_isa(v.encode())
                            time.sleep(0.002)
                            for _ in range(max(1, batch[v] // 4)):
                                call()
                            t0 = time.perf_counter()
                            for _ in range(batch[v]):
                                call()
                            times[v].append((time.perf_counter() - t0) / batch[v])
                    row = {"n": n, "k": k, "m": m, "threads": nt, "shape": shp, "load": os.getloadavg()[0]}
                    for v in isas:
                        r = [t / b for t, b in zip(times[v], times[a.base])]
                        row[v] = {"us": statistics.median(times[v]) * 1e6, "ratio_med": statistics.median(r),
                                  "ratio_min": min(r), "ratio_max": max(r)}
                    rows.append(row)
                    cells = "  ".join(f"{v} {row[v]['us']:8.1f}us x{row[v]['ratio_med']:.2f}"
                                      f"[{row[v]['ratio_min']:.2f}-{row[v]['ratio_max']:.2f}]" for v in isas)
                    print(f"{shp} {n}x{k} m={m} t={nt}: {cells}", flush=True)
    K._lib().ob_set_isa(b"")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
