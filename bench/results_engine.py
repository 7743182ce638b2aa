"""Regenerate the engine section of docs/results.md: `onebit bench model` on the built-in model and
on random-ternary models of the 2B4T and 700M shapes (written once into .cache/onebit/bench-models).

    .venv/bin/python bench/results_engine.py [--threads 2] [--report FILE] [--from FILE]

Each model is benchmarked in its own child process (`onebit bench model --json`), so one model's
pages and peak RSS never count against another's.
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
TARGETS = {"2b4t": (180, 48), "700m": (500, 110)}  # the engine issue's goals (pp128, tg128)
PEERS = {"2b4t": "bitnet.cpp I2_S (F16 emb.) 91 / 26.1; llama.cpp TQ2_0 58 / 25.7–28.5",
         "700m": "bitnet.cpp I2_S 235 / 75.4; llama.cpp TQ2_0 185 / 69"}


def run(args_extra: list[str], threads: int) -> dict:
    cmd = [sys.executable, "-m", "onebit", "bench", "model", "--json", "--threads", str(threads),
           *args_extra]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def section(rows: list[dict], threads: int) -> str:
    day = datetime.date.today().isoformat()
    lines = [
        f"Reproduce: `.venv/bin/python bench/results_engine.py --threads {threads}` (each row is "
        f"`onebit bench model --json` in its own process). Measured {day}, {threads} threads, "
        f"isa {rows[0]['isa']}. pp = prefill tok/s from an empty cache (best of 2), tg = decode "
        f"tok/s over 128 tokens from position 0, TTFT = the 128-token prefill plus the first "
        f"token. 'reads' = bytes one decode step must read (packed weights + the LM head as the "
        f"engine reads it + norms), '% BW' = reads x tg / the read bandwidth measured in the same "
        f"process. Random-ternary weights (same speed as trained ones: the kernels are "
        f"data-independent); int8 or 4-bit embeddings/LM head for the big shapes, as stated per row "
        f"(their quality cost: the storage table below).",
        "",
        "| model | params | weights / emb.+head | pp128 | pp512 | tg128 | TTFT | peak RSS | reads/token | % BW | goal pp/tg | peers (pp128 / tg128, the issue's figures) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        shape = r.get("shape", "built-in")
        goal = TARGETS.get(shape)
        goal_s = "—" if goal is None else (
            f"{goal[0]} {'✓' if r['pp_tok_s'] >= goal[0] else '✗'} / "
            f"{goal[1]} {'✓' if r['tg_tok_s'] >= goal[1] else '✗'}")
        pp512 = r.get("pp512_tok_s")
        lines.append(
            f"| {shape} | {r['params'] / 1e6:,.0f}M | {r['layout']} / {r['embedding']} | "
            f"{r['pp_tok_s']:,.1f} | {'—' if pp512 is None else f'{pp512:,.1f}'} | "
            f"{r['tg_tok_s']:,.1f} | {r['ttft_s'] * 1000:,.0f} ms | {r['peak_rss_mb']:,.0f} MB | "
            f"{r['bytes_per_token'] / 1e6:,.1f} MB | {r['bw_frac'] * 100:.0f}% of "
            f"{r['read_gb_s']:.1f} GB/s | {goal_s} | {PEERS.get(shape, '—')} |")
    lines += ["", "The peers' figures are the ones the engine issue measured on this machine type "
              "(at a read bandwidth of ~46 GB/s; this VM's bandwidth moves between ~26 and ~46 GB/s "
              "from one hour to the next, see the % BW column). Same-run comparisons on the same "
              "weights: the two Peers sections below (PyTorch: bench/peers.py; llama.cpp: "
              "bench/peers_llamacpp.py)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report", default=None, help="also save the rows as JSON here")
    ap.add_argument("--from", dest="src", default=None, help="rebuild the section from saved JSON")
    args = ap.parse_args(argv)
    if args.src:
        rows = json.loads(Path(args.src).read_text())
    else:
        rows = []
        for shape, emb in ((None, None), ("700m", "i8"), ("700m", "i4"), ("2b4t", "i8"), ("2b4t", "i4")):
            extra = ["--pp", "128" if shape is None else "128,512"]
            if shape:
                extra += ["--shape", shape, "--embedding", emb]
            r = run(extra, args.threads)
            r["shape"] = shape or "built-in"
            rows.append(r)
            print(f"{r['shape']}: pp {r['pp_tok_s']:.1f} tg {r['tg_tok_s']:.1f}", file=sys.stderr)
    if args.report:
        Path(args.report).write_text(json.dumps(rows, indent=1))
    replace_section("results_engine", section(rows, args.threads),
                    "## Engine: end-to-end generation speed and memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
