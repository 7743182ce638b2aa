"""llama.cpp (through llama-cpp-python) on the same random-ternary 2B4T-shaped weights as the engine:
pp128 and decode speed for TQ2_0 and TQ1_0 exports with F16 embeddings, and the engine's speed in
the same run (a child process each).

Run with a Python that has llama-cpp-python and gguf (their build takes ~15 min on 2 cores, so CI
does not install them):

    PYTHONPATH=src /work/peers-venv/bin/python bench/peers_llamacpp.py [--tg 32] [--write-doc]

The 2B4T shape has ReLU² FFNs, which stock llama.cpp's `bitnet` graph computes as SiLU (see the
GGUF section of docs/results.md): for *speed* that changes nothing (one elementwise op per FFN),
so the export uses ``allow_relu2``; the outputs are not compared here. The packed model gets the
Llama-3 tokenizer (vocab 128256, as 2B4T) so that llama.cpp has a vocabulary.

``--shape`` picks another random model (onebit bench model --shape). Only 2b4t exports today:
the exporter writes llama.cpp's ``bitnet`` graph, which ties the LM head to token_embd and has
the SubLN norms, so 700m and 3b (untied heads) and 8b (Llama's norms, untied head) stop with
GGUFExportError naming that; comparing those needs an exporter for llama.cpp's ``llama`` graph
with TQ2_0 weights (not written yet). ik_llama.cpp: bench/peers_ik.py.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from docsection import replace_section

ROOT = Path(__file__).resolve().parent.parent


def llama_runner(gguf: str, pp: int, tg: int, threads: int) -> dict:
    import numpy as np
    from llama_cpp import Llama

    from onebit.benchmarks.model import peak_rss_mb

    llm = Llama(model_path=gguf, n_ctx=pp + tg + 8, n_batch=pp, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    rng = np.random.default_rng(0)
    ids = [int(t) for t in rng.integers(1000, 100000, pp)]
    llm.eval(ids[:8])                                   # warm-up
    best = float("inf")
    for _ in range(2):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        best = min(best, time.perf_counter() - t)
    llm.reset()
    llm.eval([ids[0]])
    t = time.perf_counter()
    for i in range(tg):
        llm.eval([ids[(i + 1) % pp]])
    tg_s = tg / (time.perf_counter() - t)
    return {"pp_tok_s": pp / best, "tg_tok_s": tg_s, "peak_rss_mb": peak_rss_mb()}


def child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], check=True,
                         capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tg", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shape", default="2b4t", choices=["2b4t", "700m", "3b", "8b"],
                    help="the random model's shape (onebit bench model --shape)")
    ap.add_argument("--write-doc", action="store_true")
    ap.add_argument("--child", nargs="*", default=None)
    args = ap.parse_args(argv)
    if args.child is not None:
        kind, path, pp, tg, th = args.child
        if kind == "llama":
            r = llama_runner(path, int(pp), int(tg), int(th))
        else:
            from onebit.benchmarks.model import bench_model

            b = bench_model(Path(path), [int(pp)], int(tg), 2, int(th))
            r = {k: b[k] for k in ("pp_tok_s", "tg_tok_s", "peak_rss_mb")}
        print(json.dumps(r))
        return 0

    from onebit.benchmarks.model import model_for_shape
    from onebit.formats.gguf_export import export_gguf

    cache = ROOT / ".cache" / "onebit" / "bench-models"
    rows = []
    for emb in ("i8", "i4"):
        folder = model_for_shape(args.shape, "i2", emb, cache)
        r = child(["engine", str(folder), "128", str(args.tg), str(args.threads)])
        rows.append((f"onebit engine (i2, {emb} embeddings/head)", r))
        print(rows[-1], file=sys.stderr)
    folder = model_for_shape(args.shape, "i2", "i8", cache)
    vocab = {"2b4t": "llama3", "8b": "llama3"}.get(args.shape, "llama2")  # 700M/3B: 32002 ids
    tok = ROOT.parent / "shared" / "data" / "tokenizers" / vocab / "tokenizer.json"
    if not (folder / "tokenizer.json").is_file():
        shutil.copy(tok, folder / "tokenizer.json")
    for qtype in ("tq2_0", "tq1_0"):
        out = cache / f"{args.shape}-{qtype}-f16.gguf"
        if not out.is_file():
            export_gguf(folder, out, qtype, embedding="f16", allow_relu2=True)
        r = child(["llama", str(out), "128", str(args.tg), str(args.threads)])
        rows.append((f"llama.cpp {qtype.upper()} (F16 embeddings), {out.stat().st_size / 1e6:,.0f} MB", r))
        print(rows[-1], file=sys.stderr)
    lines = [f"Reproduce: `PYTHONPATH=src /work/peers-venv/bin/python bench/peers_llamacpp.py --write-doc "
             f"--tg {args.tg} --shape {args.shape}` (llama-cpp-python 0.3.36 built from PyPI's sdist). {args.shape} shape, random "
             f"ternary weights (same codes for every runner), {args.threads} threads, pp = 128-token "
             f"prefill, tg = {args.tg} decode steps.", "",
             "| runner | pp128 tok/s | tg tok/s | peak RSS |", "|---|---:|---:|---:|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['pp_tok_s']:,.1f} | {r['tg_tok_s']:,.2f} | {r['peak_rss_mb']:,.0f} MB |")
    lines += ["", f"![onebit vs llama.cpp](peers_llamacpp{'' if args.shape == '2b4t' else '_' + args.shape}.png)"]
    text = "\n".join(lines)
    print(text)
    if args.write_doc:
        suffix = "" if args.shape == "2b4t" else f"_{args.shape}"
        replace_section(f"results_peers_llamacpp{suffix}", text,
                        f"## Peers: llama.cpp on the same weights{suffix.replace('_', ' (') + ')' if suffix else ''}")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
        names = [n.replace("onebit engine (i2, ", "onebit i2, ").replace(" embeddings/head)", " head")
                  .split(" (F16")[0] for n, _ in rows]
        for ax, key, title in ((axes[0], "pp_tok_s", "2B4T shape: prefill 128 tokens, tok/s"),
                               (axes[1], "tg_tok_s", "2B4T shape: decode, tok/s")):
            ax.barh(range(len(rows)), [r[key] for _, r in rows],
                    color=["tab:blue" if n.startswith("onebit") else "tab:gray" for n in names])
            ax.set_yticks(range(len(rows)), names, fontsize=7)
            ax.invert_yaxis()
            ax.set_title(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(ROOT / "docs" / f"peers_llamacpp{suffix}.png", dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
