"""Benchmark: BitLinear (fake-quant training form) vs nn.Linear, forward + backward, fp32.

Both layers run on the same shapes, inputs and weights in the same process, alternating rep by rep,
so the ratio BitLinear/nn.Linear is measured under the same conditions. Reports the median of
``--reps`` timed repetitions after ``--warmup`` untimed ones.

    onebit bench bitlinear                    # markdown table (or: python bench/bitlinear.py)
    onebit bench bitlinear --json             # list of dicts
    onebit bench bitlinear --threads 1 --reps 9
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch import nn

from onebit.nn import BitLinear

# (tokens = B*T, in_features, out_features): the "small" preset's FFN both ways, then wider layers;
# the 2B4T FFN shape (2560 -> 6912) with fewer tokens to keep a default run short.
SHAPES: list[tuple[int, int, int]] = [
    (2048, 256, 688),
    (2048, 688, 256),
    (2048, 512, 1376),
    (2048, 1024, 2752),
    (256, 2560, 6912),
]


def _step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    layer.weight.grad = None
    x.grad = None
    layer(x).backward(grad)


def bench_shape(tokens: int, in_f: int, out_f: int, *, reps: int = 5, warmup: int = 2,
                act: str = "int8", seed: int = 0) -> dict:
    """Median ms of one forward+backward of nn.Linear and BitLinear on ``[tokens, in_f]``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, in_f, generator=g).requires_grad_()
    grad = torch.randn(tokens, out_f, generator=g)
    lin = nn.Linear(in_f, out_f, bias=False)
    bit = BitLinear(in_f, out_f, act=act)
    with torch.no_grad():
        bit.weight.copy_(lin.weight)
    times: dict[str, list[float]] = {"linear": [], "bitlinear": []}
    layers = {"linear": lin, "bitlinear": bit}
    for i in range(warmup + reps):
        for name, layer in layers.items():  # alternate so drift hits both equally
            t0 = time.perf_counter()
            _step(layer, x, grad)
            dt = (time.perf_counter() - t0) * 1e3
            if i >= warmup:
                times[name].append(dt)
    lin_ms = statistics.median(times["linear"])
    bit_ms = statistics.median(times["bitlinear"])
    flops = 3 * 2 * tokens * in_f * out_f  # fwd + grad_input + grad_weight matmuls
    return {
        "tokens": tokens, "in_features": in_f, "out_features": out_f, "act": act,
        "linear_ms": round(lin_ms, 3), "bitlinear_ms": round(bit_ms, 3),
        "ratio": round(bit_ms / lin_ms, 3),
        "linear_gflops": round(flops / lin_ms / 1e6, 1),
        "reps": reps, "threads": torch.get_num_threads(),
    }


def run(shapes=SHAPES, *, reps: int = 5, warmup: int = 2, act: str = "int8") -> list[dict]:
    return [bench_shape(t, i, o, reps=reps, warmup=warmup, act=act) for t, i, o in shapes]


def markdown(rows: list[dict]) -> str:
    head = ("| tokens | in → out | nn.Linear ms | BitLinear ms | BitLinear / nn.Linear | "
            "nn.Linear GFLOP/s |\n|---:|---|---:|---:|---:|---:|")
    lines = [f"| {r['tokens']} | {r['in_features']} → {r['out_features']} | {r['linear_ms']:.2f} | "
             f"{r['bitlinear_ms']:.2f} | {r['ratio']:.2f}x | {r['linear_gflops']:.1f} |" for r in rows]
    return "\n".join([head, *lines])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per layer (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed repetitions first")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--act", default="int8", choices=["int8", "int4", "topk_int8"],
                    help="BitLinear activation quantizer")
    ap.add_argument("--json", action="store_true", help="print a JSON list of dicts")
    args = ap.parse_args(argv)
    if args.reps < 1 or args.warmup < 0:
        ap.error("--reps must be >= 1 and --warmup >= 0")
    if args.threads is not None:
        if args.threads < 1:
            ap.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    rows = run(reps=args.reps, warmup=args.warmup, act=args.act)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"BitLinear (act={args.act}, ternary weights, STE) vs nn.Linear, forward+backward, fp32; "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"{platform.machine()}; median of {args.reps} after {args.warmup} warm-up\n")
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
