"""Regenerate the long-context section of docs/results.md: decode speed of the 2B4T shape after
0, 1k and 4k cached positions, for each KV cache storage (float32, 8, 4, 3 bits) and for a4.8
(its activations + the 3-bit cache, as the paper defines it) against b1.58.

    .venv/bin/python bench/results_longctx.py [--threads 2] [--depth 1024,4032] [--report FILE] [--from FILE]

Each row is `onebit bench model --json --depth ...` in its own process (random-ternary 2B4T
weights, 4-bit embeddings/head; the cache is filled by a prefill of random tokens up to each
depth, then 32 tokens are decoded from there, best of 2). About 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

from docsection import replace_section

ROOT = Path(__file__).resolve().parent.parent
# (label, activation scheme, kv bits): b1.58 as the engine runs it by default (float32 cache),
# the same weights with quantized caches, and a4.8 = a4.8 activations + 3-bit cache
ROWS = (("b1.58", "a8", 16), ("b1.58", "a8", 8), ("b1.58", "a8", 4), ("b1.58", "a8", 3),
        ("a4.8", "a4.8", 3))


def run(scheme: str, kv: int, depths: str, threads: int) -> dict:
    cmd = [sys.executable, "-W", "ignore", "-m", "onebit", "bench", "model", "--json", "--shape", "2b4t",
           "--embedding", "i4", "--pp", "128", "--tg", "32", "--threads", str(threads),
           "--depth", depths, "--kv-bits", str(kv), "--activation-scheme", scheme]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def section(rows: list[dict], threads: int, day: str) -> str:
    depths = list(rows[0]["tg_depth"])
    base = rows[0]["tg_depth"]
    kv_name = {16: "float32", 8: "8-bit", 4: "4-bit", 3: "3-bit (row 0: 4-bit)"}
    lines = [
        f"Reproduce: `.venv/bin/python bench/results_longctx.py --threads {threads} --depth "
        f"{','.join(d for d in depths if d != '0')}` (rows saved in `docs/results_longctx.json`; "
        f"`--from` rebuilds this section from them; each row `onebit bench model --json --depth ... "
        f"--kv-bits ... --activation-scheme ...` in its own process). Measured {day}, {threads} "
        f"threads, isa {rows[0]['isa']}. 2B4T shape (30 layers, 20 query / 5 kv heads of 128), "
        f"random ternary weights, i2 + 4-bit embeddings/head. tg = greedy decode tok/s over 32 "
        f"tokens starting after `depth` cached positions (the cache filled by a prefill of random "
        f"tokens), best of 2. 'KV read' = the cache bytes one decode step reads at the deepest "
        f"depth (all layers, K and V).",
        "",
        "| activations | KV cache | KV at 4k | KV read/token at "
        f"{depths[-1]} | " + " | ".join(f"tg @ {d}" for d in depths) + " | vs b1.58 float32 KV @ "
        + " / ".join(depths) + " |",
        "|---|---|---:|---:|" + "---:|" * len(depths) + "---|",
    ]
    for r in rows:
        kv = r["kv_bits"]
        kv4k = r["kv_bytes"]["4096"]
        read = r["kv_bytes"][depths[-1]]
        lines.append(
            f"| {r['label']} | {kv_name[kv]} | {kv4k / 2**20:,.1f} MiB | {read / 1e6:,.0f} MB | "
            + " | ".join(f"{r['tg_depth'][d]:,.1f}" for d in depths) + " | "
            + " / ".join(f"{r['tg_depth'][d] / base[d]:.2f}×" for d in depths) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--depth", default="1024,4032", help="cached positions besides 0")
    ap.add_argument("--report", default=None, help="also save the rows as JSON here")
    ap.add_argument("--from", dest="src", default=None, help="rebuild the section from saved JSON")
    args = ap.parse_args(argv)
    if args.src:
        saved = json.loads(Path(args.src).read_text())
        rows, day = saved["rows"], saved["day"]
    else:
        rows, day = [], datetime.date.today().isoformat()
        for label, scheme, kv in ROWS:
            r = run(scheme, kv, "0," + args.depth, args.threads)
            r["label"] = label
            rows.append(r)
            print(f"{label} kv {kv}: " + ", ".join(f"d{d} {v:.1f}" for d, v in r["tg_depth"].items()),
                  file=sys.stderr)
    if args.report:
        Path(args.report).write_text(json.dumps({"day": day, "rows": rows}, indent=1))
    replace_section("results_longctx", section(rows, args.threads, day),
                    "## Long context: decode speed with float32 and quantized KV caches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
