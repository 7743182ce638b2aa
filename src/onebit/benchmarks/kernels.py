"""Benchmark: onebit's C ternary kernels (GEMV m=1, GEMM m=128) vs torch F.linear fp32 and bf16.

    onebit bench kernels                          # markdown table (or: python bench/kernels_vs_torch.py)
    onebit bench kernels --json                   # JSON list of row dicts (each carries read_gb_s)
    onebit bench kernels --threads 2 --layouts i2,t1_6 --shapes 2560x2560,6912x2560
    onebit bench kernels --quick                  # tiny shapes, few reps (smoke test, not numbers)

Everything is measured in one process, in one run:

* **Read bandwidth**: ``kernels.read_probe`` reads a buffer much larger than the last-level cache
  (``--probe-mib``, default 512 MiB, allocated and touched once) on the thread count in use; the
  best of 5 passes, in GB/s (1e9 bytes/s). A GEMV has to stream its packed weights
  from memory once, so ``bw_frac = weight_gb_s / read_gb_s`` says how close a GEMV gets to the
  machine's limit.
* **Per shape N×K** (N outputs, K inputs; W is [N, K]) and op (``gemv``: m=1; ``gemm``:
  m=``--m-gemm``), these candidates run interleaved (A B C ... A B C ...) after ``--warmup`` untimed
  rounds, so drift and neighbours hit all of them alike (with a 10 ms pause before each timed batch,
  so no candidate runs against the previous one's still-spinning worker threads: torch's OpenMP
  pool spins for milliseconds after an operator); the median of ``--reps`` rounds is kept:
  ``kernels.gemm`` (exact int32 accumulators, the core: the ``us`` column), the same C function
  called straight through ctypes with pointers computed once (``raw_us``: no argument checks or
  output allocation; ``us - raw_us`` is the binding's per-call cost), ``kernels.linear``
  (float32 out, with the scales: ``linear_us``), ``quantize_act_i8`` + ``linear`` from the same
  float32 x torch gets (``e2e_us``), and torch ``F.linear(x, W)`` on x [m, K], W [N, K] in float32
  and in bfloat16. A round of a fast candidate times a batch of back-to-back calls (sized in the
  warm-up so one batch takes ~2 ms) and reports time / calls; every time includes the
  Python call (argument checks, ctypes or torch dispatch), as a caller pays it.
* **Weights are not left cache-resident.** A 2B4T matrix is 0.4-4.4 MB packed and the L3 here is
  32 MiB, so a loop over one matrix would time L3 bandwidth, not memory bandwidth. Every candidate
  cycles through distinct copies of its weights whose total is at least ``--rotate-mib`` (default:
  the larger of 64 MiB and twice the L3 size): consecutive calls of one candidate touch different
  memory, and the other candidates run in between. torch's fp32 and bf16 weights are rotated the
  same way (copies totalling the same budget; a matrix larger than the budget is a single copy), so
  neither side is flattered. The activations (at most m×K) stay in cache, as in a real forward.
  GEMM rows use the same rotation, which matters little there (m=128 makes them compute-bound).

Derived columns: ``weight_gb_s`` = packed weight bytes / ``us``; ``bw_frac`` = weight_gb_s /
read_gb_s (``raw_bw_frac``: the same from ``raw_us``); ``gops`` = 2·m·N·K / ``us``; ``vs_fp32`` /
``vs_bf16`` = torch time / ``us`` (the int core); ``vs_fp32_e2e`` / ``vs_bf16_e2e`` = torch time /
``e2e_us`` (from the same float32 input as torch).
``--threads N`` sets both onebit's and torch's intra-op threads (both restored afterwards). Before
timing, each shape's gemv output is checked against numpy (a fast wrong kernel is not a result).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from onebit import kernels as K
from onebit.benchmarks.model import l3_bytes
from onebit.formats.packing import LAYOUTS
from onebit.kernels.wisdom import plan_text

# N x K (out_features x in_features) of each model's linear layers.
SHAPES_2B4T: tuple[tuple[int, int], ...] = ((2560, 2560), (640, 2560), (6912, 2560), (2560, 6912))
SHAPES_700M: tuple[tuple[int, int], ...] = ((1536, 1536), (4096, 1536), (1536, 4096))
SHAPES = SHAPES_2B4T + SHAPES_700M
QUICK_SHAPES: tuple[tuple[int, int], ...] = ((256, 512), (512, 256))
OPS = ("gemv", "gemm")
MIB = 1 << 20

# Targets (per row): GEMV on the 2B4T shapes >= 80% of the read bandwidth and >= 8x torch bf16;
# GEMM at m=128 >= 3x torch fp32. Judged on the int core (``us``).
TARGET_GEMV_BW_FRAC = 0.80
TARGET_GEMV_VS_BF16 = 8.0
TARGET_GEMM_VS_FP32 = 3.0
TARGET_GEMM_M = 128


@dataclass(frozen=True)
class Settings:
    shapes: tuple[tuple[int, int], ...] = SHAPES
    layouts: tuple[str, ...] = ("i2",)
    ops: tuple[str, ...] = OPS
    m_gemm: int = 128
    reps: int = 15
    warmup: int = 3
    threads: int | None = None       # None: kernels.get_num_threads()
    isa: str | None = None           # None: this machine's per-class plan (kernels.wisdom)
    tune: bool = False               # measure the per-class plan again first
    rotate_bytes: int | None = None  # None: max(64 MiB, 2 x L3)
    probe_bytes: int = 512 * MIB
    probe_reps: int = 5
    sample_s: float = 2e-3
    seed: int = 0


QUICK = Settings(shapes=QUICK_SHAPES, m_gemm=16, reps=3, warmup=1, rotate_bytes=4 * MIB,
                 probe_bytes=16 * MIB, probe_reps=2, sample_s=2e-4)


def model_of(n: int, k: int) -> str:
    """Which model a shape comes from ("2B4T", "700M"), or "" for another shape."""
    return "2B4T" if (n, k) in SHAPES_2B4T else "700M" if (n, k) in SHAPES_700M else ""


def default_rotate_bytes() -> int:
    l3 = l3_bytes()
    return max(64 * MIB, 2 * l3) if l3 else 64 * MIB


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------

def read_bandwidth(nbytes: int, nthreads: int, reps: int) -> float:
    """Best-of-``reps`` read bandwidth in GB/s of ``kernels.read_probe`` over ``nbytes``."""
    buf = np.ones(nbytes, dtype=np.uint8)  # written once: every page is mapped before timing
    K.read_probe(buf, nthreads)  # warm-up pass
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        K.read_probe(buf, nthreads)
        best = min(best, time.perf_counter() - t0)
    return buf.nbytes / best / 1e9


def _copies(one, nbytes: int, budget: int) -> list:
    """``one`` (numpy array or torch tensor) plus distinct copies, totalling at least ``budget``."""
    count = max(1, math.ceil(budget / nbytes))
    return [one] + [one.copy() if isinstance(one, np.ndarray) else one.clone() for _ in range(count - 1)]


def _rotating(copies: list, call: Callable) -> Callable[[], object]:
    """A no-argument callable that runs ``call(w)`` on the next copy of the weights each time."""
    it = itertools.cycle(copies)
    return lambda: call(next(it))


SETTLE_S = 0.01  # pause before each timed batch: the previous candidate's threads go idle


def interleaved(cands: dict[str, Callable[[], object]], *, reps: int, warmup: int,
                sample_s: float) -> dict[str, float]:
    """Median seconds per call of each candidate, timed in rounds A B C ... A B C.

    One round of a candidate is a batch of calls sized (from the warm-up) to last ~``sample_s``.
    Each batch starts after a ``SETTLE_S`` pause: torch's OpenMP workers spin for up to a few ms
    after an operator (and onebit's pool for 50 µs), and a candidate timed right after another
    would otherwise share the two cores with those spinning threads. Then a quarter batch runs
    untimed, so the candidate's own threads are awake again (waking a sleeping vCPU costs up to
    milliseconds here): each candidate is timed in its steady state, as inside a model's forward.
    """
    last = {}
    for _ in range(max(1, warmup)):
        for name, fn in cands.items():
            t0 = time.perf_counter()
            fn()
            last[name] = time.perf_counter() - t0
    batch = {name: max(1, min(10_000, round(sample_s / max(t, 1e-9)))) for name, t in last.items()}
    times: dict[str, list[float]] = {name: [] for name in cands}
    for _ in range(reps):
        for name, fn in cands.items():
            b = batch[name]
            time.sleep(SETTLE_S)
            for _ in range(max(2, b // 4)):  # untimed: wake this candidate's threads back up
                fn()
            t0 = time.perf_counter()
            for _ in range(b):
                fn()
            times[name].append((time.perf_counter() - t0) / b)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _raw_gemm(copies: list[np.ndarray], k: int, layout: str, x: np.ndarray) -> Callable[[], object]:
    """The C GEMM called straight through ctypes with pointers computed once: no argument checks,
    no output allocation. Times the kernel without the binding's per-call cost (which is the
    difference ``us - raw_us``); checked against ``kernels.gemm`` before use."""
    fn = K._lib().ob_gemm_i2 if layout == "i2" else K._lib().ob_gemm_t1_6
    n, m = copies[0].shape[0], x.shape[0]
    acc = np.empty((m, n), dtype=np.int32)
    xp, accp = x.ctypes.data, acc.ctypes.data
    ptrs = [w.ctypes.data for w in copies]
    nbytes = copies[0].nbytes  # every copy has the same shape
    st = fn(ptrs[0], nbytes, n, k, xp, m, k, accp)
    if st != 0 or not np.array_equal(acc, K.gemm(copies[0], k, layout, x)):
        raise RuntimeError(f"the raw ob_gemm_{layout} call disagrees with kernels.gemm (status {st}): "
                           f"the bench's ctypes call is out of date with the ABI; update _raw_gemm")

    def call(p: int, _alive=(acc, x, copies)) -> int:  # the pointers are valid while these live
        return fn(p, nbytes, n, k, xp, m, k, accp)
    return _rotating(ptrs, call)


def _candidates(x: torch.Tensor, packed: dict[str, list[np.ndarray]], w_scale: float,
                w_fp32: list[torch.Tensor], w_bf16: list[torch.Tensor]) -> dict[str, Callable[[], object]]:
    """The timed callables for float32 activations ``x`` [m, K]; each cycles through its copies."""
    k = x.shape[1]
    xn = x.numpy()
    xc, xs = K.quantize_act_i8(xn)
    xb = x.bfloat16()
    cands: dict[str, Callable[[], object]] = {}
    for layout, ws in packed.items():
        cands[f"{layout}/gemm"] = _rotating(ws, lambda w, lay=layout: K.gemm(w, k, lay, xc))
        cands[f"{layout}/raw"] = _raw_gemm(ws, k, layout, xc)
        cands[f"{layout}/linear"] = _rotating(ws, lambda w, lay=layout: K.linear(w, k, lay, w_scale, xc, xs))
        cands[f"{layout}/e2e"] = _rotating(
            ws, lambda w, lay=layout: K.linear(w, k, lay, w_scale, *K.quantize_act_i8(xn)))
    cands["torch_fp32"] = _rotating(w_fp32, lambda w: F.linear(x, w))
    cands["torch_bf16"] = _rotating(w_bf16, lambda w: F.linear(xb, w))
    return cands


def bench_shape(n: int, k: int, s: Settings, *, read_gb_s: float, rotate_bytes: int,
                threads: int, rng: np.random.Generator) -> list[dict]:
    """Rows (one per op x layout) for the N x K shape; see the module docstring."""
    codes = rng.integers(-1, 2, size=(n, k), dtype=np.int8)
    w_scale = 0.02
    w32 = torch.from_numpy(codes.astype(np.float32) * w_scale)
    w_fp32 = _copies(w32, w32.numel() * 4, rotate_bytes)
    w_bf16 = _copies(w32.bfloat16(), w32.numel() * 2, rotate_bytes)
    del w32
    packed = {}
    for layout in s.layouts:
        p = K.pack(codes, layout)
        x1 = rng.integers(-127, 128, size=(1, k), dtype=np.int8)
        want = codes.astype(np.int32) @ x1[0].astype(np.int32)
        if not np.array_equal(K.gemm(p, k, layout, x1)[0], want):
            raise RuntimeError(f"kernels.gemm ({K.isa()}, layout {layout}) gives wrong results on "
                               f"{n}x{k}; run the kernel tests (pytest tests/test_kernels.py) first")
        packed[layout] = _copies(p, p.nbytes, rotate_bytes)
    del codes
    rows = []
    for op in s.ops:
        m = 1 if op == "gemv" else s.m_gemm
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(s.seed + m))
        cands = _candidates(x, packed, w_scale, w_fp32, w_bf16)
        with torch.inference_mode():
            t = interleaved(cands, reps=s.reps, warmup=s.warmup, sample_s=s.sample_s)
        for layout, ws in packed.items():
            us = t[f"{layout}/gemm"] * 1e6
            raw = t[f"{layout}/raw"] * 1e6
            e2e = t[f"{layout}/e2e"] * 1e6
            fp32, bf16 = t["torch_fp32"] * 1e6, t["torch_bf16"] * 1e6
            nbytes = ws[0].nbytes
            gb_s = nbytes / us / 1e3
            rows.append({
                "op": op, "m": m, "n": n, "k": k, "layout": layout, "model": model_of(n, k),
                "us": round(us, 3), "raw_us": round(raw, 3),
                "linear_us": round(t[f"{layout}/linear"] * 1e6, 3), "e2e_us": round(e2e, 3),
                "torch_fp32_us": round(fp32, 3), "torch_bf16_us": round(bf16, 3),
                "weight_gb_s": round(gb_s, 4), "read_gb_s": round(read_gb_s, 4),
                "bw_frac": round(gb_s / read_gb_s, 4),
                "raw_bw_frac": round(nbytes / raw / 1e3 / read_gb_s, 4),
                "gops": round(2 * m * n * k / us / 1e3, 3),
                "vs_fp32": round(fp32 / us, 3), "vs_bf16": round(bf16 / us, 3),
                "vs_fp32_e2e": round(fp32 / e2e, 3), "vs_bf16_e2e": round(bf16 / e2e, 3),
                "packed_bytes": nbytes, "weight_copies": len(ws),
                "torch_fp32_copies": len(w_fp32), "torch_bf16_copies": len(w_bf16), "threads": threads,
                "isa": K.isa_for(m), "kernel_plan": K.plan(), "reps": s.reps,
            })
    return rows


def run(s: Settings = Settings()) -> list[dict]:
    """All rows of the benchmark (shape-major, then op, then layout) under settings ``s``.

    Sets onebit's and torch's thread counts (and the kernel variant, if ``s.isa``) for the run and
    restores them afterwards.
    """
    threads = s.threads or K.get_num_threads()
    prev_torch = torch.get_num_threads()
    rotate = s.rotate_bytes or default_rotate_bytes()
    rng = np.random.default_rng(s.seed)
    torch.set_num_threads(threads)
    if not s.isa:  # kernel choice by measurement: cached per machine, measured once (or --tune)
        from onebit.kernels import wisdom

        if s.tune:
            K.apply_plan(K.tune(force=True))
        else:
            wisdom.ensure_plan()
    try:
        with K.threads(threads), (K.use(s.isa) if s.isa else contextlib.nullcontext()):
            read_gb_s = read_bandwidth(s.probe_bytes, threads, s.probe_reps)
            rows = []
            for n, k in s.shapes:
                rows += bench_shape(n, k, s, read_gb_s=read_gb_s, rotate_bytes=rotate,
                                    threads=threads, rng=rng)
    finally:
        torch.set_num_threads(prev_torch)
    return rows


# ---------------------------------------------------------------------------------------------
# Targets and tables
# ---------------------------------------------------------------------------------------------

def targets(row: dict) -> list[tuple[str, bool]]:
    """The targets that apply to a row, as (description, met) pairs (empty: no target)."""
    if row["op"] == "gemv" and row["model"] == "2B4T":
        return [(f"≥{TARGET_GEMV_BW_FRAC:.0%} BW", row["bw_frac"] >= TARGET_GEMV_BW_FRAC),
                (f"≥{TARGET_GEMV_VS_BF16:g}× bf16", row["vs_bf16"] >= TARGET_GEMV_VS_BF16)]
    if row["op"] == "gemm" and row["m"] == TARGET_GEMM_M:
        return [(f"≥{TARGET_GEMM_VS_FP32:g}× fp32", row["vs_fp32"] >= TARGET_GEMM_VS_FP32)]
    return []


def _target_cell(row: dict) -> str:
    t = targets(row)
    return ", ".join(f"{'✓' if ok else '✗'} {name}" for name, ok in t) if t else "—"


def markdown(rows: list[dict], *, with_targets: bool = False) -> str:
    """Markdown table, one line per row; speed-ups are "core (from fp32 x)"."""
    head = ("| N×K | model | op | m | layout | µs | raw µs | linear µs | e2e µs | GB/s | % read BW | "
            "GOPS | torch fp32 µs | torch bf16 µs | vs fp32 | vs bf16 |")
    align = "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    if with_targets:
        head += " targets |"
        align += "---|"
    lines = [head, align]
    for r in rows:
        line = (f"| {r['n']}×{r['k']} | {r['model'] or '—'} | {r['op']} | {r['m']} | {r['layout']} | "
                f"{r['us']:.1f} | {r['raw_us']:.1f} | {r['linear_us']:.1f} | {r['e2e_us']:.1f} | "
                f"{r['weight_gb_s']:.2f} | {r['bw_frac']:.0%} | {r['gops']:.1f} | {r['torch_fp32_us']:.1f} | "
                f"{r['torch_bf16_us']:.1f} | {r['vs_fp32']:.2f}× ({r['vs_fp32_e2e']:.2f}×) | "
                f"{r['vs_bf16']:.2f}× ({r['vs_bf16_e2e']:.2f}×) |")
        if with_targets:
            line += f" {_target_cell(r)} |"
        lines.append(line)
    return "\n".join(lines)


def machine_line(rows: list[dict]) -> str:
    r = rows[0]
    return (f"{cpu_model()} ({platform.machine()}), onebit kernels {plan_text(r['kernel_plan'])}, {r['threads']} "
            f"thread{'s' if r['threads'] != 1 else ''} (torch too), read bandwidth {r['read_gb_s']:.1f} GB/s (read_probe), torch {torch.__version__}")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def _positive_int(name: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = 0
        if v < 1:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1 (e.g. {name} 4)")
        return v
    return parse


def parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    """``"2560x2560,640x2560"`` -> ((2560, 2560), (640, 2560)); N (outputs) x K (inputs)."""
    shapes = []
    for part in text.split(","):
        a, sep, b = part.strip().lower().replace("×", "x").partition("x")
        if not (sep and a.isdigit() and b.isdigit() and int(a) >= 1 and int(b) >= 1):
            raise argparse.ArgumentTypeError(
                f"{part.strip()!r} is not NxK: give comma-separated out x in features, e.g. "
                f"--shapes 2560x2560,6912x2560")
        shapes.append((int(a), int(b)))
    return tuple(shapes)


def _choices(option: str, allowed: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(t.strip() for t in text.split(",") if t.strip())
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{', '.join(map(repr, bad)) or 'nothing'} given; "
                                             f"{option} takes a comma-separated subset of "
                                             f"{','.join(allowed)}")
        return tuple(dict.fromkeys(items))
    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="onebit bench kernels", description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=_positive_int("--threads"), default=None,
                    help="threads for onebit's kernels AND torch (default: kernels.get_num_threads())")
    ap.add_argument("--shapes", type=parse_shapes, default=None,
                    help="comma-separated NxK (out x in features); default: the 2B4T and 700M layers")
    ap.add_argument("--layouts", type=_choices("--layouts", tuple(LAYOUTS)), default=None,
                    help="packed layouts, e.g. i2,t1_6 (default: i2)")
    ap.add_argument("--ops", type=_choices("--ops", OPS), default=None,
                    help="gemv (m=1) and/or gemm (m=--m-gemm); default: both")
    ap.add_argument("--m-gemm", type=_positive_int("--m-gemm"), default=None,
                    help="rows of x for the gemm op (default 128)")
    ap.add_argument("--reps", type=_positive_int("--reps"), default=None,
                    help="timed interleaved rounds (median; default 15)")
    ap.add_argument("--warmup", type=_positive_int("--warmup"), default=None,
                    help="untimed rounds first (default 3)")
    ap.add_argument("--isa", default=None, help="kernel variant to force for every shape class "
                                                "(default: this machine's measured per-class "
                                                "choice); one of kernels.available_isas()")
    ap.add_argument("--tune", action="store_true",
                    help="measure the per-class kernel choice again (kernels.wisdom) and cache it")
    ap.add_argument("--rotate-mib", type=_positive_int("--rotate-mib"), default=None,
                    help="MiB of distinct weight copies each candidate cycles through "
                         "(default: max(64, 2 x L3))")
    ap.add_argument("--probe-mib", type=_positive_int("--probe-mib"), default=None,
                    help="MiB read by the bandwidth probe (default 512; keep it >> L3)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny shapes, few reps, small probe: a smoke test, not numbers to quote")
    ap.add_argument("--json", action="store_true", help="print only a JSON list of row dicts")
    return ap


def settings_from_args(args: argparse.Namespace, ap: argparse.ArgumentParser) -> Settings:
    """Settings from parsed options: ``--quick`` picks the defaults, explicit options win."""
    s = QUICK if args.quick else Settings()
    over = {"shapes": args.shapes, "layouts": args.layouts, "ops": args.ops, "m_gemm": args.m_gemm,
            "reps": args.reps, "warmup": args.warmup, "threads": args.threads, "isa": args.isa,
            "tune": args.tune or None}
    if args.rotate_mib:
        over["rotate_bytes"] = args.rotate_mib * MIB
    if args.probe_mib:
        over["probe_bytes"] = args.probe_mib * MIB
    s = replace(s, **{key: v for key, v in over.items() if v is not None})
    if s.isa is not None and s.isa not in K.available_isas():
        ap.error(f"argument --isa: {s.isa!r} does not run here; use one of {K.available_isas()}")
    return s


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    s = settings_from_args(args, ap)
    rows = run(s)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"onebit kernels vs torch F.linear: {machine_line(rows)}; median of {s.reps} interleaved "
          f"rounds after {s.warmup} warm-up; weights rotated over >= "
          f"{(s.rotate_bytes or default_rotate_bytes()) // MIB} MiB per candidate"
          + (" [--quick: smoke test, not numbers to quote]" if args.quick else "") + "\n")
    print(markdown(rows))
    print("\nµs: kernels.gemm (int32 core); raw: the same C call without the binding's checks; "
          "linear: with scales; e2e: quantize_act_i8 + linear from fp32 x. GB/s: packed weight "
          "bytes / µs. vs: torch µs / µs (torch µs / e2e µs).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
