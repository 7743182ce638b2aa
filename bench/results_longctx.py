"""Regenerate the long-context section of docs/results.md: decode speed of the 2B4T shape after
0, 1k and 4k cached positions, for each KV cache storage (float32, float16, 8, 4, 3 bits) and for a4.8
(its activations + the 3-bit cache, as the paper defines it) against b1.58.

    .venv/bin/python bench/results_longctx.py [--threads 2] [--depth 1024,4032] [--rounds 3]
                                              [--report FILE] [--from FILE]

All configurations live in one process (one mmap of the random-ternary 2B4T weights with 4-bit
embeddings/head, one Runtime and cache per configuration) and are timed in interleaved rounds:
at each depth every cache is first filled by a prefill of the same random tokens, then each
round decodes 32 greedy tokens from that depth with every configuration in turn; the table
keeps each one's best round. This VM's speed drifts by tens of percent over minutes, so only
interleaved rounds give comparable rows. About 8 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from docsection import replace_section

ROOT = Path(__file__).resolve().parent.parent
# (label, activation scheme, kv bits): b1.58 as the engine runs it by default (float32 cache),
# the same weights with float16 (llama.cpp's default) and quantized caches, and a4.8 = a4.8
# activations + 3-bit cache
CONFIGS = (("b1.58", "a8", 32), ("b1.58", "a8", 16), ("b1.58", "a8", 8), ("b1.58", "a8", 4),
           ("b1.58", "a8", 3), ("a4.8", "a4.8", 3))
TG = 32


def measure(depths: list[int], rounds: int, threads: int) -> list[dict]:
    from onebit import kernels
    from onebit.benchmarks.model import model_for_shape, prefill
    from onebit.engine import Runtime
    from onebit.engine.stats import kv_cache_bytes

    kernels.set_num_threads(threads)
    folder = model_for_shape("2b4t", "i2", "i4", ROOT / ".cache" / "onebit" / "bench-models")
    need = max(depths) + TG + 1
    rts = []
    for label, scheme, kv in CONFIGS:
        with warnings.catch_warnings():  # a4.8 activations on a8 weights: speed only
            warnings.simplefilter("ignore")
            rt = Runtime(folder, activation_scheme=scheme, kv_bits=kv)
        rt.reset(need)
        rts.append(rt)
    cfg = rts[0].config
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.vocab_size, max(depths))
    rows = [{"label": label, "scheme": scheme, "kv_bits": kv, "tg_depth": {},
             "kv_bytes": {str(d): kv_cache_bytes(cfg, kv, d) for d in (*depths, 4096)}}
            for label, scheme, kv in CONFIGS]
    filled = [0] * len(rts)
    for d in sorted(depths):
        for i, rt in enumerate(rts):  # the same prompt into every cache
            prefill(rt, prompt[filled[i]:d], filled[i])
            filled[i] = d
        best = [float("inf")] * len(rts)
        for _ in range(rounds):
            for i, rt in enumerate(rts):
                tok = cfg.bos_token_id
                t = time.perf_counter()
                for p in range(d, d + TG):
                    tok = int(np.argmax(rt.forward([tok], p)))
                best[i] = min(best[i], time.perf_counter() - t)
        for row, b in zip(rows, best):
            row["tg_depth"][str(d)] = TG / b
        print(f"depth {d}: " + ", ".join(f"{r['label']}/{r['kv_bits']} {r['tg_depth'][str(d)]:.1f}"
                                         for r in rows), file=sys.stderr)
    return rows


def section(rows: list[dict], meta: dict) -> str:
    depths = list(rows[0]["tg_depth"])
    base = rows[0]["tg_depth"]
    kv_name = {32: "float32", 16: "float16", 8: "8-bit", 4: "4-bit", 3: "3-bit (row 0: 4-bit)"}
    lines = [
        f"Reproduce: `.venv/bin/python bench/results_longctx.py --threads {meta['threads']} --depth "
        f"{','.join(d for d in depths if d != '0')} --rounds {meta['rounds']}` (rows saved in "
        f"`docs/results_longctx.json`; "
        f"`--from` rebuilds this section from them). Measured {meta['day']}, {meta['threads']} "
        f"threads, isa {meta['isa']}. 2B4T shape (30 layers, 20 query / 5 kv heads of 128), random "
        f"ternary weights, i2 + 4-bit embeddings/head, all configurations in one process. tg = "
        f"greedy decode tok/s over {TG} tokens starting after `depth` cached positions (every cache "
        f"filled by a prefill of the same random tokens), best of {meta['rounds']} interleaved "
        f"rounds. 'KV read' = the cache bytes one decode step reads at the deepest depth (all "
        f"layers, K and V).",
        "",
        "| activations | KV cache | KV at 4k | KV read/token at "
        f"{depths[-1]} | " + " | ".join(f"tg @ {d}" for d in depths) + " | vs b1.58 float32 KV @ "
        + " / ".join(depths) + " |",
        "|---|---|---:|---:|" + "---:|" * len(depths) + "---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {kv_name[r['kv_bits']]} | {r['kv_bytes']['4096'] / 2**20:,.1f} MiB | "
            f"{r['kv_bytes'][depths[-1]] / 1e6:,.0f} MB | "
            + " | ".join(f"{r['tg_depth'][d]:,.1f}" for d in depths) + " | "
            + " / ".join(f"{r['tg_depth'][d] / base[d]:.2f}×" for d in depths) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--depth", default="1024,4032", help="cached positions besides 0")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--report", default=None, help="also save the rows as JSON here")
    ap.add_argument("--from", dest="src", default=None, help="rebuild the section from saved JSON")
    args = ap.parse_args(argv)
    if args.src:
        saved = json.loads(Path(args.src).read_text())
        rows, meta = saved["rows"], saved["meta"]
    else:
        from onebit import kernels

        depths = [0] + [int(v) for v in args.depth.split(",") if v.strip()]
        rows = measure(depths, args.rounds, args.threads)
        meta = {"day": datetime.date.today().isoformat(), "threads": args.threads,
                "rounds": args.rounds, "isa": kernels.isa()}
    if args.report:
        Path(args.report).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    replace_section("results_longctx", section(rows, meta),
                    "## Long context: decode speed with float32, float16 and quantized KV caches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
