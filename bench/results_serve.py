"""docs/results.md's serving section: `onebit bench serve` (onebit serve vs llama-server -np N on the
same random-ternary 700M / 2B4T weights, 1-16 concurrent streams) as a table and a plot.

    .venv/bin/python bench/results_serve.py [--threads N] [--tg 64] [--prompt 64] [--rounds 2]
    .venv/bin/python bench/results_serve.py --report      # rebuild from docs/results_serve.json

Builds llama-server once from the llama-cpp-python sdist (cmake, ~15 min on 2 cores) into
.cache/onebit/bench-models; run it on an otherwise idle machine (each server runs alone in turn).
"""

from __future__ import annotations

import argparse
import os
import datetime
import json
import subprocess
import sys
from pathlib import Path

from docsection import replace_section

ROOT = Path(__file__).resolve().parent.parent
JSON_OUT = ROOT / "docs" / "results_serve.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tg", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--streams", default="1,2,4,8,16")
    ap.add_argument("--shapes", default="700m,2b4t")
    ap.add_argument("--report", action="store_true",
                    help="rebuild the section and plot from docs/results_serve.json (no run)")
    args = ap.parse_args(argv)
    if args.report:
        return report(json.loads(JSON_OUT.read_text()))
    cmd = [sys.executable, "-m", "onebit", "bench", "serve", "--json", "--tg", str(args.tg),
           "--prompt", str(args.prompt), "--rounds", str(args.rounds), "--streams", args.streams,
           "--shapes", args.shapes] + (["--threads", str(args.threads)] if args.threads else [])
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)  # progress on stderr
    if out.returncode != 0:
        print(f"results_serve: {' '.join(cmd)} failed (exit {out.returncode}); its output is above",
              file=sys.stderr)
        return out.returncode
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["date"] = datetime.date.today().isoformat()
    res["cpu"] = cpu_line()
    JSON_OUT.write_text(json.dumps(res, indent=1) + "\n")
    return report(res)


def cpu_line() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512vbmi") if f in flags]
    return f"{name}, {os.cpu_count()} CPUs, {' '.join(isa)}"


def report(res: dict) -> int:
    from onebit.benchmarks.serve import targets

    rows = res["rows"]
    tg = targets(rows)
    lines = [f"Reproduce: `.venv/bin/python bench/results_serve.py` (runs `onebit bench serve --json "
             f"--prompt {res['prompt']} --tg {res['tg']} --rounds {res['rounds']}`; {res['threads']} threads). "
             f"Random ternary weights (the 700M shape with a tied LM head and a 32000 vocabulary, as "
             f"llama.cpp's bitnet graph needs; int8 embeddings/head for onebit; the same codes as GGUF TQ2_0 "
             f"with F16 embeddings for llama-server -np N, built from the llama-cpp-python sdist), "
             f"N concurrent streaming /v1/completions requests of {res['prompt']} prompt tokens and "
             f"{res['tg']} greedy tokens. Aggregate decode = tokens arriving while all N streams "
             f"decode, per second; per-stream decode = the median request's (tokens - 1) / (last - first token). "
             f"Measured {res.get('date', '?')} on {res.get('cpu', '?')}.", "",
             "| shape | server | streams | aggregate decode tok/s | per-stream decode tok/s | TTFT p50 | TTFT p95 |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['server']} | {r['streams']} | {r['agg_tok_s']:,.1f} | "
                     f"{r['stream_tok_s']:,.1f} | {r['ttft_p50_s'] * 1e3:,.0f} ms | {r['ttft_p95_s'] * 1e3:,.0f} ms |")
    lines += ["", "| shape | agg@8 / single-stream decode (target >= 5) | onebit@8 / llama-server@8 (>= 2) | "
                  "TTFT p95@8 / unloaded (<= 3) | server overhead (<= 5%) |", "|---|---:|---:|---:|---:|"]
    for shape, t in tg.items():
        lines.append(f"| {shape} | {t['agg8_over_stream1']:.2f} | {t['agg8_over_llama8']:.2f} | "
                     f"{t['ttft95_8_over_ttft_1']:.2f} | {t['overhead']:.1%} |")
    lines += ["", "![onebit serve vs llama-server](serve.png)"]
    text = "\n".join(lines)
    print(text)
    replace_section("results_serve", text, "## Serving: onebit serve vs llama-server under concurrent load")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({r["shape"] for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 3.4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for server, color in (("onebit", "tab:blue"), ("llama-server", "tab:gray")):
            pts = [(r["streams"], r["agg_tok_s"]) for r in rows if r["shape"] == shape and r["server"] == server]
            if pts:
                ax.plot(*zip(*pts), marker="o", color=color, label=server)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel("aggregate decode tok/s")
        ax.set_title(f"{shape} shape", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "serve.png", dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
