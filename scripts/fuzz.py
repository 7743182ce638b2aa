#!/usr/bin/env python3
"""The long fuzz run of onebit's loaders (the harness is onebit.testing.fuzz; tests/test_fuzz.py
runs 20 cases per format).

    .venv/bin/python scripts/fuzz.py --cases 2000 --format all --seed 0
    .venv/bin/python scripts/fuzz.py --cases 50 --format packed,gguf --keep fuzz-failures

Prints the counts per format and outcome as a markdown table (the one in docs/results.md) and
each failure; ``--json FILE`` writes every case's result, ``--keep DIR`` the inputs of the
failing cases (rebuild one alone with ``--replay FORMAT:INDEX --keep DIR``). Exit status 1 if
any case failed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path


def _isa() -> str:
    """The CPU model and its SIMD flags that matter to the kernels (from /proc/cpuinfo)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
                 platform.machine())
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    simd = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni")
            if f in flags]
    return f"{model} ({' '.join(simd) or 'no AVX2'})"


def main(argv: list[str] | None = None) -> int:
    from onebit.testing import fuzz

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=200, help="cases per format (default 200)")
    ap.add_argument("--format", default="all", help=f"'all' or a comma list of {', '.join(fuzz.FORMATS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per case (default 120)")
    ap.add_argument("--mem-gib", type=float, default=4.0, help="address space per worker (RLIMIT_AS)")
    ap.add_argument("--keep", help="copy the inputs of failing cases into this folder")
    ap.add_argument("--json", help="write every case's result to this file")
    ap.add_argument("--replay", help="FORMAT:INDEX: only rebuild that case into --keep (no run)")
    args = ap.parse_args(argv)
    formats = list(fuzz.FORMATS) if args.format == "all" else args.format.split(",")

    if args.replay:
        fmt, index = args.replay.split(":")
        out = Path(args.keep or "fuzz-replay")
        seeds = fuzz.build_seeds(out / "seeds", [fmt])
        case = fuzz.make_case(fmt, int(index), args.seed, seeds, out / f"{fmt}-{index}")
        print(f"{case.path}  ({case.kind}): {case.what}")
        return 0

    t0 = time.perf_counter()
    last = [0.0]

    def progress(done: int, total: int) -> None:
        if time.perf_counter() - last[0] > 30 or done == total:
            last[0] = time.perf_counter()
            print(f"[fuzz] {done}/{total} cases, {last[0] - t0:.0f} s", file=sys.stderr, flush=True)

    report = fuzz.run(formats, cases=args.cases, seed=args.seed, workers=args.workers,
                      timeout=args.timeout, mem_gib=args.mem_gib, keep=args.keep, progress=progress)
    print(f"onebit loader fuzz: {args.cases} cases per format, seed {args.seed}, {args.workers} workers, "
          f"timeout {args.timeout:.0f} s, RLIMIT_AS {args.mem_gib:g} GiB; {report.seconds / 60:.1f} min "
          f"on {_isa()}\n")
    print(report.table())
    for r in report.failures:
        print(f"\nFAILURE {r.fmt}#{r.index} {r.outcome}: {r.what}\n  {r.detail[-800:]}")
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in report.results], indent=1))
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
