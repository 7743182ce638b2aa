"""Regenerate the "C kernels" section of docs/results.md.

    .venv/bin/python bench/results_kernels.py                     # run the bench (2 threads, minutes), rewrite
    .venv/bin/python bench/results_kernels.py --report rows.json  # ... and save the rows as JSON
    .venv/bin/python bench/results_kernels.py --from rows.json    # rebuild the section from saved rows
    .venv/bin/python bench/results_kernels.py --quick --doc /tmp/results.md   # smoke test, not numbers

Runs `onebit bench kernels` (default shapes, both ops, 2 threads unless --threads) in this process and
writes a markdown table between the markers in docs/results.md: per shape and op our µs, GB/s, % of the
measured read bandwidth, GOPS, torch fp32/bf16 µs, the speed-ups, and ✓/✗ against the targets (GEMV on
the 2B4T shapes >= 80% of read bandwidth and >= 8x torch bf16; GEMM at m=128 >= 3x torch fp32).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from docsection import replace_section

from onebit.benchmarks import kernels as kb

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "results.md"
BEGIN, END = "<!-- results_kernels:begin -->", "<!-- results_kernels:end -->"
HEADING = "## C kernels: ternary GEMV/GEMM vs torch F.linear (inference)"


def section(rows: list[dict], *, command: str, bench_command: str, quick: bool = False,
            measured: datetime.date | None = None) -> str:
    """The markdown between (and including) the markers."""
    judged = [ok for r in rows for _, ok in kb.targets(r)]
    lines = [
        BEGIN,
        (f"Reproduce: `{command}` (runs `{bench_command}` in-process; `--report FILE` also saves the rows "
         f"as JSON, `--from FILE` rebuilds this section from them). Measured "
         f"{(measured or datetime.date.today()).isoformat()}."),
        "",
    ]
    if quick:
        lines += ["**`--quick` smoke test: tiny shapes and reps, small probe buffer; not numbers to quote.**",
                  ""]
    lines += [
        f"Machine: {kb.machine_line(rows)}.",
        "",
        (f"Targets: GEMV on the 2B4T shapes ≥ {kb.TARGET_GEMV_BW_FRAC:.0%} of the read bandwidth and "
         f"≥ {kb.TARGET_GEMV_VS_BF16:g}× torch bf16; GEMM at m={kb.TARGET_GEMM_M} ≥ {kb.TARGET_GEMM_VS_FP32:g}× "
         f"torch fp32. Judged on µs (`kernels.gemm` through the Python API, exact int32 out). "
         f"Met: **{sum(judged)} of {len(judged)}**."),
        "",
        kb.markdown(rows, with_targets=True),
        "",
        ("µs: `kernels.gemm` as a caller pays it; raw µs: the same C function through ctypes without the "
         "binding's argument checks (µs − raw µs is the per-call binding cost); linear µs: float32 out "
         "with the scales; e2e µs: `quantize_act_i8` + `linear` from the float32 x torch gets. GB/s: packed "
         "weight bytes / µs; % read BW: that over the measured read bandwidth. vs: torch µs / µs "
         "(in parentheses torch µs / e2e µs). Medians of interleaved rounds; every candidate cycles through "
         "weight copies totalling ≥ max(64 MiB, 2× L3) so no weight stays cache-resident (see "
         "`src/onebit/benchmarks/kernels.py`)."),
        END,
    ]
    return "\n".join(lines)


def write_section(doc: Path, text: str) -> None:
    """Replace the marked section of ``doc`` (appending one, with a heading, if it has no markers)."""
    inner = text.replace(BEGIN, "").replace(END, "")
    replace_section("results_kernels", inner, HEADING, doc)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="threads for both sides (default 2)")
    ap.add_argument("--layouts", default=None, help="e.g. i2,t1_6 (default: the bench's, i2)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test of this script")
    ap.add_argument("--doc", type=Path, default=DOC, help="markdown file to rewrite (default docs/results.md)")
    ap.add_argument("--report", type=Path, default=None, help="also write the rows as JSON here")
    ap.add_argument("--from", dest="from_json", type=Path, default=None,
                    help="do not run: rebuild the section from rows saved with --report")
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error("--threads must be >= 1")
    measured = None
    if args.from_json:
        if not args.from_json.is_file():
            ap.error(f"--from {args.from_json}: no such file; write one with --report FILE")
        rows = json.loads(args.from_json.read_text())
        measured = datetime.date.fromtimestamp(args.from_json.stat().st_mtime)
        if not isinstance(rows, list) or not rows or not isinstance(rows[0], dict):
            ap.error(f"--from {args.from_json}: expected a non-empty JSON list of rows written by --report")
        layouts = ",".join(dict.fromkeys(r["layout"] for r in rows))
        quick = any((r["n"], r["k"]) in kb.QUICK_SHAPES for r in rows)
        threads = rows[0]["threads"]
    else:
        layouts, quick, threads = args.layouts, args.quick, args.threads
    opts = ["--threads", str(threads)] + (["--layouts", layouts] if layouts and layouts != "i2" else [])
    opts += ["--quick"] if quick else []
    if not args.from_json:
        kp = kb.build_parser()
        rows = kb.run(kb.settings_from_args(kp.parse_args(opts), kp))
    if args.report:
        args.report.write_text(json.dumps(rows, indent=1) + "\n")
    text = section(rows, command=" ".join([".venv/bin/python bench/results_kernels.py", *opts]),
                   bench_command=" ".join(["onebit bench kernels", *opts]), quick=quick, measured=measured)
    write_section(args.doc, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
