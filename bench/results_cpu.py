"""The engine table for one CPU (issue 18): per shape and head format, prefill and decode speed at 1
and 2 threads, the kernels chosen per shape class, decode against the read bandwidth measured in
the same process, and the process's peak RSS against its file + KV cache.

    .venv/bin/python bench/results_cpu.py [--rows 700m:i8,2b4t:i8,2b4t:f16,3b:i8,8b:i8]
                                          [--threads 1,2] [--report FILE] [--from FILE] [--write-doc]

Each row is `onebit bench model --json --shape S --embedding E` in its own process (pp128, pp512,
tg128, best of 2; the read probe runs over the model file's own pages before each decode round);
its peak RSS is that process's VmHWM. The section is written under a heading naming the CPU and
its vector ISA (docs/results.md, "Engine on <cpu>").
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from docsection import replace_section

ROOT = Path(__file__).resolve().parent.parent


def cpu_line() -> tuple[str, str]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                       "avx512vbmi", "avx512_bf16", "avx_vnni") if f in flags]
    return model, " ".join(isa)


def run(shape: str, emb: str, threads: int) -> dict:
    cmd = [sys.executable, "-m", "onebit", "bench", "model", "--json", "--threads", str(threads),
           "--shape", shape, "--embedding", emb, "--pp", "128,512", "--tg", "128"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    r = json.loads(out.strip().splitlines()[-1])
    r.update(shape=shape, head=emb, file_bytes=(Path(r["model"]) / "model.safetensors").stat().st_size,
             load=os.getloadavg()[0])
    return r


def section(rows: list[dict]) -> str:
    from onebit.kernels.wisdom import plan_text

    model, isa = cpu_line()
    day = datetime.date.today().isoformat()
    plans = {plan_text(r["kernel_plan"]) for r in rows}
    lines = [
        f"CPU: {model} ({os.cpu_count()} vCPUs; {isa}). Measured {day}; reproduce: `.venv/bin/python "
        f"bench/results_cpu.py --write-doc` (each row `onebit bench model --json --shape S --embedding E "
        f"--threads T` in its own process, best of 2). Kernels (per shape class, measured once on this "
        f"machine by onebit.kernels.wisdom): {'; '.join(sorted(plans))}. '% BW' = bytes a decode step "
        f"reads (packed weights + head as stored + norms) x tg128 / read_probe over the model file's "
        f"own pages in the same process, before each decode round (best of each); in brackets with the "
        f"KV cache a step reads as well (its mean over the 128 steps). 'budget' = file + "
        f"KV cache allocated for the run (513 positions) + 10%; peak RSS is the process's VmHWM. Load "
        f"= the 1-minute load average after the row (2 vCPUs shared with other jobs: every figure "
        f"here moves with it).",
        "",
        "| shape | head | threads | pp128 | pp512 | tg128 | reads/token | % BW (with KV) | peak RSS | file + KV | ≤ budget | load |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        fkv = r["file_bytes"] + r["kv_alloc_bytes"]
        ok = r["peak_rss_mb"] * 2**20 <= 1.10 * fkv
        lines.append(
            f"| {r['shape']} | {r['head']} | {r['threads']} | {r['pp']['128']:.1f} | {r['pp']['512']:.1f} | "
            f"{r['tg_tok_s']:.1f} | {r['bytes_per_token'] / 1e6:,.0f} MB | {r['bw_frac'] * 100:.0f}% "
            f"({(r['bytes_per_token'] + r['kv_bytes_per_token_avg']) * r['tg_tok_s'] / (r['read_gb_s'] * 1e9) * 100:.0f}%) of {r['read_gb_s']:.1f} GB/s | {r['peak_rss_mb']:,.0f} MB | {fkv / 2**20:,.0f} MB | "
            f"{'✓' if ok else '✗'} | {r['load']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="700m:i8,2b4t:i8,2b4t:f16,3b:i8,8b:i8")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--report", default=None, help="also save the rows as JSON here")
    ap.add_argument("--from", dest="src", default=None, help="rebuild the section from saved JSON")
    ap.add_argument("--write-doc", action="store_true")
    a = ap.parse_args(argv)
    if a.src:
        rows = json.loads(Path(a.src).read_text())
    else:
        rows = []
        for item in a.rows.split(","):
            shape, emb = item.split(":")
            for t in [int(v) for v in a.threads.split(",")]:
                rows.append(run(shape, emb, t))
                r = rows[-1]
                print(f"{shape}/{emb} t{t}: pp128 {r['pp']['128']:.1f} pp512 {r['pp']['512']:.1f} "
                      f"tg {r['tg_tok_s']:.1f} ({r['bw_frac']:.0%} BW) rss {r['peak_rss_mb']:.0f} MB",
                      file=sys.stderr, flush=True)
                if a.report:
                    Path(a.report).write_text(json.dumps(rows, indent=1))
    text = section(rows)
    print(text)
    if a.write_doc:
        model, _ = cpu_line()
        replace_section("results_cpu_zen4" if "EPYC" in model else "results_cpu",
                        text, f"## Engine on {model} (issue 18)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
