"""Sparse decoding and a4.8 in the engine: decode speed, dense vs sparse, b1.58 vs a4.8.

Each row is `onebit bench model --json` in its own process; rows of one table alternate within
a round (dense, sparse, ...) and the best of ``--rounds`` is kept, so the ratios compare runs
taken minutes apart on this noisy machine, never across tables.

    .venv/bin/python bench/results_sparse.py [--threads 2] [--rounds 2] [--big] [--kernels]

- trained: the Gutenberg models of the a4.8 results (runs/a48-b158, runs/a48-a48; 4 layers,
  hidden 192, ReLU²), exported with f16 embeddings: real activation sparsity;
- ``--big``: the 2B4T shape with random ternary weights and i4 embeddings/head (ReLU² of a random
  model: ~50% of gate outputs <= 0; a4.8 runs its INT4/top-K activations on a8-trained weights,
  for speed only);
- ``--kernels``: the 2B4T layer's projections one by one (cold weights, the engine's C kernels
  called from Python), dense vs sparse at the activation sparsity the trained models measured
  (docs/results_a48.json), summed into a per-token projection with the i4 LM head: what the
  engine's sparse decoding gives on a model of that width whose sparsity is real.

Writes docs/results_sparse.json and the results_sparse section of docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from docsection import replace_section  # noqa: E402

PACKED = ROOT / ".cache" / "onebit" / "a48-packed"


def export(run: str) -> Path:
    dst = PACKED / run
    if not (dst / "model.safetensors").is_file():
        subprocess.run([sys.executable, "-m", "onebit", "export", str(ROOT / "runs" / run), str(dst),
                        "--embedding", "f16"], check=True, cwd=ROOT)
    return dst


def bench(args: list[str], threads: int, tg: int) -> dict:
    cmd = [sys.executable, "-m", "onebit", "bench", "model", "--json", "--threads", str(threads),
           "--tg", str(tg), "--pp", "64", "--reps", "2", *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def table(rows: dict[str, list[str]], threads: int, tg: int, rounds: int) -> dict[str, dict]:
    best: dict[str, dict] = {}
    for _ in range(rounds):
        for name, args in rows.items():
            r = bench(args, threads, tg)
            print(f"{name}: tg {r['tg_tok_s']:.1f} tok/s", file=sys.stderr)
            if name not in best or r["tg_tok_s"] > best[name]["tg_tok_s"]:
                best[name] = r
    return best


# the 2B4T layer: (out_features, in_features) per projection, and its 4-bit LM head
SHAPES_2B4T = {"q": (2560, 2560), "k": (640, 2560), "v": (640, 2560), "o": (2560, 2560),
               "gate": (6912, 2560), "up": (6912, 2560), "down": (2560, 6912)}
VOCAB_2B4T = 128256


def trained_sparsity() -> dict:
    models = json.loads((ROOT / "docs" / "results_a48.json").read_text())["models"]
    return {role: models[role]["sparsity"] for role in ("b158", "a48")}


def engine_min_zeros() -> float:
    import inspect

    from onebit.engine.runtime import Runtime
    return float(inspect.signature(Runtime.__init__).parameters["sparse_min_zeros"].default)


def kernel_times(threads: int, reps: int, sp: dict, min_zeros: float) -> dict:
    """Median seconds per call of each projection's kernel, dense and sparse, over ``copies``
    weight sets rotated so every call reads cold weights (more than the 32 MiB L3)."""
    import time

    import numpy as np

    from onebit import kernels
    from onebit.formats.packed_model import quantize_rows_i4

    rng = np.random.default_rng(0)
    copies = 8  # consecutive calls read different sets; a set recurs after ~8 calls (> the L3)
    sets = []
    for _ in range(copies):
        d = {}
        for name, (n, k) in SHAPES_2B4T.items():
            w = kernels.pack(rng.integers(-1, 2, size=(n, k), dtype=np.int8), "i2")
            d[name] = (w, kernels.transpose_packed_i2(w, k) if name in ("o", "down") else None)
        sets.append(d)
    head_q, head_s = quantize_rows_i4(rng.standard_normal((VOCAB_2B4T, 2560), dtype=np.float32))

    def codes(k: int, zeros: float) -> np.ndarray:
        x = rng.integers(1, 128, size=(1, k)).astype(np.int8) * rng.choice(np.array([-1, 1], np.int8), (1, k))
        x[0, rng.permutation(k)[: int(round(zeros * k))]] = 0
        return x

    # the C entry points with every buffer prepared once: the Python wrappers' argument checks
    # cost 5-30 µs a call, which the engine (whole layers in C) never pays
    lib = kernels._lib()
    xs = np.ones(1, np.float32)
    out = np.empty(VOCAB_2B4T, np.float32)
    calls = {}  # label -> fn(weights set)
    for name, (n, k) in SHAPES_2B4T.items():
        x = codes(k, 0.0)
        calls[f"{name} dense"] = lambda d, name=name, n=n, k=k, x=x: lib.ob_linear_i2_unchecked(
            d[name][0].ctypes.data, d[name][0].nbytes, n, k, x.ctypes.data, 1, k, 1.0, xs.ctypes.data,
            out.ctypes.data)

    def colsparse(proj: str, zeros: float):
        n, k = SHAPES_2B4T[proj]
        x = codes(k, zeros)
        return lambda d: lib.ob_linear_colsparse_i2(d[proj][1].ctypes.data, d[proj][1].nbytes, n, k,
                                                    x.ctypes.data, 1, k, 1.0, xs.ctypes.data,
                                                    out.ctypes.data)
    for role, key, proj in (("b158", "down", "down"), ("a48", "down", "down"), ("a48", "o", "o")):
        z = sp[role]["input_zeros"][key]
        calls[f"{proj} column-sparse ({role}: {z:.0%} zeros)"] = colsparse(proj, z)
    for z in (0.5, 0.65):  # the break-even region, for sparse_min_zeros
        calls[f"down column-sparse ({z:.0%} zeros)"] = colsparse("down", z)
    for role in ("b158", "a48"):
        skipped = sp[role]["gate_output_zeros"]
        rows = np.sort(rng.permutation(6912)[int(round(skipped * 6912)):]).astype(np.int64)
        x = codes(2560, 0.0)
        calls[f"up rows ({role}: {skipped:.0%} skipped)"] = (
            lambda d, rows=rows, x=x: lib.ob_linear_rows(0, d["up"][0].ctypes.data, d["up"][0].nbytes, 6912,
                                                         2560, x.ctypes.data, rows.ctypes.data, rows.size,
                                                         1.0, 1.0, out.ctypes.data))
    hx = codes(2560, 0.0)
    calls["LM head, i4"] = lambda d: lib.ob_linear_i4(head_q.ctypes.data, head_q.nbytes, head_s.ctypes.data,
                                                      VOCAB_2B4T, 2560, hx.ctypes.data, 1, 2560,
                                                      xs.ctypes.data, out.ctypes.data)
    for label, fn in calls.items():  # each entry point once through its checked status
        if fn(sets[0]) != 0:
            raise RuntimeError(f"{label}: kernel failed")
    times: dict[str, list[float]] = {label: [] for label in calls}
    ncall = 0
    with kernels.threads(threads):
        for _ in range(reps):
            for label, fn in calls.items():  # interleaved: drift hits every kernel alike
                d = sets[ncall % copies]
                ncall += 1
                t0 = time.perf_counter()
                fn(d)
                times[label].append(time.perf_counter() - t0)
    med = {label: float(np.median(t)) for label, t in times.items()}
    return {"threads": threads, "reps": reps, "median_s": med, "sparsity": sp, "min_zeros": min_zeros}


def kernel_section(kt: dict) -> list[str]:
    med, sp = kt["median_s"], kt["sparsity"]
    dense = {p: med[f"{p} dense"] for p in SHAPES_2B4T}

    def pick(label: str, proj: str, zeros: float) -> float:
        # the engine's rule: sparse kernels only from sparse_min_zeros percent zeros (rows off) on
        return med[label] if zeros * 100 >= kt["min_zeros"] else dense[proj]

    b_down = f"down column-sparse (b158: {sp['b158']['input_zeros']['down']:.0%} zeros)"
    a_down = f"down column-sparse (a48: {sp['a48']['input_zeros']['down']:.0%} zeros)"
    a_o = f"o column-sparse (a48: {sp['a48']['input_zeros']['o']:.0%} zeros)"
    b_up = f"up rows (b158: {sp['b158']['gate_output_zeros']:.0%} skipped)"
    a_up = f"up rows (a48: {sp['a48']['gate_output_zeros']:.0%} skipped)"
    head = med["LM head, i4"]
    layer_dense = sum(dense.values())
    up_b = pick(b_up, "up", sp["b158"]["gate_output_zeros"])
    up_a = pick(a_up, "up", sp["a48"]["gate_output_zeros"])
    layer_b = (dense["q"] + dense["k"] + dense["v"] + dense["o"] + dense["gate"] + up_b
               + pick(b_down, "down", sp["b158"]["input_zeros"]["down"]))
    layer_a = (dense["q"] + dense["k"] + dense["v"] + dense["gate"] + up_a
               + pick(a_o, "o", sp["a48"]["input_zeros"]["o"]) + pick(a_down, "down", sp["a48"]["input_zeros"]["down"]))
    lines = [f"**2B4T layer, kernel by kernel** (`--kernels`; {kt['threads']} thread(s), cold weights, "
             f"median of {kt['reps']} interleaved calls; sparsity as measured on the trained Gutenberg "
             "models, docs/results_a48.json)", "",
             "| kernel | µs | vs dense |", "|---|---:|---:|"]
    for label, t in med.items():
        proj = label.split()[0]
        ref = dense.get(proj)
        lines.append(f"| {label} | {t * 1e6:,.0f} | {'—' if ref is None or label.endswith('dense') else f'{ref / t:.2f}×'} |")
    tok = lambda layer: 1.0 / (30 * layer + head)  # noqa: E731
    lines += ["", "Per token, 30 such layers plus the i4 LM head (the engine's rule for the sparse kernels: "
              f"≥ {kt['min_zeros']:.0f}% zero inputs or up_proj rows off, else dense; attention, norms "
              "and quantizers not included):", "",
              "| decoding | layer µs | tok/s (kernels only) | vs b1.58 dense |", "|---|---:|---:|---:|",
              f"| b1.58, dense | {layer_dense * 1e6:,.0f} | {tok(layer_dense):.1f} | 1.00× |",
              f"| b1.58, sparse (ReLU² zeros of the trained model) | {layer_b * 1e6:,.0f} | {tok(layer_b):.1f} | "
              f"{tok(layer_b) / tok(layer_dense):.2f}× |",
              f"| a4.8, sparse (+ top-K o_proj input) | {layer_a * 1e6:,.0f} | {tok(layer_a):.1f} | "
              f"{tok(layer_a) / tok(layer_dense):.2f}× |", ""]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--big", action="store_true", help="also the 2B4T shape (random weights)")
    ap.add_argument("--kernels", action="store_true",
                    help="also the 2B4T layer kernel by kernel at the trained models' sparsity")
    ap.add_argument("--kernels-only", action="store_true",
                    help="re-measure only the kernel table, keep the JSON's model tables")
    ap.add_argument("--report", action="store_true", help="rebuild the section from the JSON")
    args = ap.parse_args()
    out_json = ROOT / "docs" / "results_sparse.json"
    if args.report or args.kernels_only:
        res = json.loads(out_json.read_text())
        if args.kernels_only:
            res["kernels"] = kernel_times(args.threads, 40, trained_sparsity(), engine_min_zeros())
            out_json.write_text(json.dumps(res, indent=1) + "\n")
    else:
        b158, a48 = export("a48-b158"), export("a48-a48")
        res = {"threads": args.threads, "tg": args.tg, "trained": table({
            "b1.58, dense": ["--model", str(b158), "--sparse", "off"],
            "b1.58, sparse": ["--model", str(b158), "--sparse", "on"],
            "a4.8, dense": ["--model", str(a48), "--sparse", "off"],
            "a4.8, sparse": ["--model", str(a48), "--sparse", "on"],
        }, args.threads, args.tg, args.rounds)}
        if args.big:
            big = ["--shape", "2b4t", "--embedding", "i4"]
            res["2b4t"] = table({
                "a8 (b1.58), dense": big + ["--sparse", "off"],
                "a8 (b1.58), sparse": big + ["--sparse", "on"],
                "a4.8, dense": big + ["--sparse", "off", "--activation-scheme", "a4.8"],
                "a4.8, sparse": big + ["--sparse", "on", "--activation-scheme", "a4.8"],
            }, args.threads, 32, args.rounds)
        if args.kernels:
            res["kernels"] = kernel_times(args.threads, 40, trained_sparsity(), engine_min_zeros())
        out_json.write_text(json.dumps(res, indent=1) + "\n")
    lines = [f"Reproduce: `.venv/bin/python bench/results_sparse.py --threads {res['threads']} --big` "
             f"(each row `onebit bench model --json` in its own process, best of the rounds; ratios "
             f"are within one table). Greedy decode from position 0, {res['threads']} threads.", ""]
    for key, title in (("trained", "Trained Gutenberg models (4 layers, hidden 192, FFN 512, ReLU², "
                                    "f16 embeddings/head): real activation sparsity"),
                       ("2b4t", "2B4T shape, random ternary weights, i4 embeddings/head "
                                "(a4.8 row: a4.8 activations on a8 weights, speed only)")):
        if key not in res:
            continue
        t = res[key]
        lines += [f"**{title}**", "", "| model / decoding | tg tok/s | vs b1.58 dense | vs its own dense | "
                  "transposed copies | peak RSS |", "|---|---:|---:|---:|---:|---:|"]
        names = list(t)
        base = t[names[0]]["tg_tok_s"]
        for name in names:
            r = t[name]
            own = t[name.replace("sparse", "dense")]["tg_tok_s"]
            lines.append(f"| {name} | {r['tg_tok_s']:.1f} | {r['tg_tok_s'] / base:.2f}× | "
                         f"{r['tg_tok_s'] / own:.2f}× | {r['sparse_copy_mb']:.1f} MB | {r['peak_rss_mb']:.0f} MB |")
        lines.append("")
    if "kernels" in res:
        lines += kernel_section(res["kernels"])
    replace_section("results_sparse", "\n".join(lines),
                    "## Sparse decoding and a4.8 in the engine: decode speed")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
