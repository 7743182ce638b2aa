"""Engine speed per kernel variant (or per-class plan), one model loaded once, interleaved rounds.

    .venv/bin/python bench/isa_engine.py MODEL_FOLDER [--isas avx2,avx512vnni_zmm,tuned]
                                         [--pp 128,512] [--tg 32] [--rounds 5] [--threads 2]

Each round runs, for every variant in turn (A B C A B C ...), a prefill of each --pp length from
an empty cache and --tg decode steps; "tuned" is the per-shape-class plan of onebit.kernels.tune
(the cached choice, measured first if missing). Prints tok/s medians and, per variant, the range
over rounds of its time / the first variant's time in the same round (the ratio to trust on a
shared machine), with the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

import onebit
from onebit import kernels as K


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--isas", default="avx2,avx512vnni_zmm")
    ap.add_argument("--pp", default="128")
    ap.add_argument("--tg", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    K.set_num_threads(a.threads)
    m = onebit.load(a.model)
    rt, cfg = m.runtime, m.config
    pps = [int(v) for v in a.pp.split(",") if v]
    rt.reset(max(pps + [a.tg]) + 1)
    rng = np.random.default_rng(0)
    isas = a.isas.split(",")

    def select(v: str) -> None:
        if v == "tuned":
            K.apply_plan(K.tune())
        else:
            K._lib().ob_set_isa(v.encode())

    rt.forward([cfg.bos_token_id], 0)
    t: dict = {(v, w): [] for v in isas for w in [f"pp{n}" for n in pps] + ["tg"]}
    for _ in range(a.rounds):
        for v in isas:
            select(v)
            for n in pps:
                ids = rng.integers(0, cfg.vocab_size, n)
                rt.forward(ids[:8], 0)  # untimed: threads awake
                t0 = time.perf_counter()
                rt.forward(ids, 0)
                t[(v, f"pp{n}")].append(time.perf_counter() - t0)
            tok = cfg.bos_token_id
            t0 = time.perf_counter()
            for i in range(a.tg):
                tok = int(np.argmax(rt.forward([tok], i)))
            t[(v, "tg")].append(time.perf_counter() - t0)
    K._lib().ob_set_isa(b"")
    print(f"{a.model}: {a.threads} threads, {a.rounds} interleaved rounds, load {os.getloadavg()}")
    for w in [f"pp{n}" for n in pps] + ["tg"]:
        count = int(w[2:]) if w.startswith("pp") else a.tg
        base = t[(isas[0], w)]
        cells = []
        for v in isas:
            ts = t[(v, w)]
            r = [x / b for x, b in zip(ts, base)]
            cells.append(f"{v} {count / statistics.median(ts):7.1f} tok/s (time x{statistics.median(r):.2f} "
                         f"[{min(r):.2f}-{max(r):.2f}])")
        print(f"  {w:6} " + " | ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
