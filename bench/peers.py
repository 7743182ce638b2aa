"""Peer benchmark: the onebit engine vs PyTorch fp32 / bf16 on the SAME weights, same machine, same
run. (llama.cpp TQ2_0 / TQ1_0 through llama-cpp-python join when the GGUF export exists.)

    .venv/bin/python bench/peers.py [--shapes 700m,2b4t] [--threads 2] [--tg 32] [--write-doc]

For each shape a random-ternary packed model (``onebit bench model --shape``'s cache) is run by
the engine; then its weights are unpacked (codes x scale, so PyTorch runs exactly the ternary
matrices the engine runs, as plain float linears: what transformers does with an unpacked
BitNet) into ``onebit.model.CausalLM(linear="fp")`` and timed in float32 and in bfloat16:
prefill of 128 tokens, then decode with a KV cache. Each runner is its own child process so peak
RSS is per runner. ``--write-doc`` rewrites the peers section of docs/results.md and
docs/peers.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from docsection import replace_section

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"700m": "bitnet-700m", "2b4t": "bitnet-2b4t"}


def torch_runner(folder: str, dtype: str, pp: int, tg: int, threads: int) -> dict:
    """Child process: PyTorch CausalLM (fp linears) holding the packed model's exact weights."""
    import numpy as np
    import torch

    from onebit import kernels
    from onebit.benchmarks.model import peak_rss_mb
    from onebit.config import ModelConfig
    from onebit.formats.packing import _read_declared
    from onebit.formats.safetensors_mmap import read_safetensors
    from onebit.model import CausalLM
    from onebit.nn import rope_cache

    torch.set_num_threads(threads)
    folder = Path(folder)
    raw = json.loads((folder / "config.json").read_text())
    cfg = ModelConfig.from_dict({**raw["model"], "linear": "fp"})
    layout = raw["packed"]["layout"]
    tensors, meta = read_safetensors(folder / "model.safetensors")
    declared = _read_declared(folder / "model.safetensors", meta)
    dt = torch.float32 if dtype == "fp32" else torch.bfloat16
    with torch.device("meta"):
        model = CausalLM(cfg)
    state = {}
    for name, (_, (_, k)) in declared.items():
        codes = kernels.unpack(tensors[name + ".qweight"], k, layout)
        w = torch.from_numpy(codes).to(dt) * float(tensors[name + ".scale"][0])
        state[name + ".weight"] = w
    for name, t in tensors.items():
        if name.endswith((".qweight", ".scale", ".row_scale")):
            continue
        a = np.asarray(t)
        if a.dtype == np.int8:  # int8 embeddings: widen with their row scales
            a = a.astype(np.float32) * np.asarray(tensors[name + ".row_scale"])[:, None]
        state[name] = torch.from_numpy(np.array(a, dtype=np.float32)).to(dt)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(f"weights do not match the model: missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}")
    cos, sin = rope_cache(cfg.resolved_head_dim, cfg.max_position_embeddings, cfg.rope_theta)
    model.register_buffer("rope_cos", cos, persistent=False)  # built on the meta device above
    model.register_buffer("rope_sin", sin, persistent=False)
    model.eval()
    ids = torch.randint(0, cfg.vocab_size, (1, pp))
    res = {"runner": f"PyTorch {dtype}", "threads": threads}
    with torch.no_grad():
        model(ids[:, :8])                        # warm-up
        best = float("inf")
        for _ in range(2):
            t = time.perf_counter()
            model(ids)
            best = min(best, time.perf_counter() - t)
        res["pp_tok_s"] = pp / best
        model.setup_cache(1, tg + 1, dtype=dt)
        tok = torch.tensor([[cfg.bos_token_id]])
        t = time.perf_counter()
        for i in range(tg):
            logits, _ = model(tok, pos=i)
            tok = logits[:, -1].argmax(-1, keepdim=True)
        res["tg_tok_s"] = tg / (time.perf_counter() - t)
        model.clear_cache()
    res["peak_rss_mb"] = peak_rss_mb()
    return res


def engine_runner(folder: str, pp: int, tg: int, threads: int) -> dict:
    from onebit.benchmarks.model import bench_model

    r = bench_model(Path(folder), [pp], tg, 2, threads)
    return {"runner": f"onebit engine ({r['layout']}, {r['embedding']} head)", "threads": threads,
            "pp_tok_s": r["pp_tok_s"], "tg_tok_s": r["tg_tok_s"], "peak_rss_mb": r["peak_rss_mb"]}


def child(kind: str, folder: Path, pp: int, tg: int, threads: int) -> dict:
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import peers; "
            "k, f, pp, tg, th = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]); "
            "r = peers.engine_runner(f, pp, tg, th) if k == 'engine' else peers.torch_runner(f, k, pp, tg, th); "
            "print(json.dumps(r))")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "bench"), kind, str(folder), str(pp),
                          str(tg), str(threads)], check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_doc(rows: list[dict], threads: int, tg: int) -> None:
    import datetime

    lines = [f"Reproduce: `.venv/bin/python bench/peers.py --write-doc --threads {threads} --tg {tg}`. "
             f"Measured {datetime.date.today().isoformat()}. Same random-ternary weights for every "
             f"runner (PyTorch gets them unpacked as float linears); pp = prefill of 128 tokens, "
             f"tg = greedy decode of {tg} tokens with a KV cache; peak RSS per runner process.",
             "", "| shape | runner | pp128 tok/s | tg tok/s | peak RSS | engine speed-up pp / tg |",
             "|---|---|---:|---:|---:|---|"]
    for r in rows:
        eng = next(e for e in rows if e["shape"] == r["shape"] and e["runner"].startswith("onebit"))
        sp = "—" if r is eng else f"{eng['pp_tok_s'] / r['pp_tok_s']:.1f}× / {eng['tg_tok_s'] / r['tg_tok_s']:.1f}×"
        lines.append(f"| {r['shape']} | {r['runner']} | {r['pp_tok_s']:,.1f} | {r['tg_tok_s']:,.2f} | "
                     f"{r['peak_rss_mb']:,.0f} MB | {sp} |")
    lines += ["", "llama.cpp (TQ2_0 / TQ1_0 via llama-cpp-python, our GGUF export of the same weights): "
              "its own section below (bench/peers_llamacpp.py). ![peers](peers.png)"]
    replace_section("results_peers", "\n".join(lines),
                    "## Peers: onebit engine vs PyTorch on the same weights")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({r["shape"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, title in ((axes[0], "pp_tok_s", "prefill (128 tokens), tok/s"),
                           (axes[1], "tg_tok_s", f"decode ({tg} tokens), tok/s")):
        runners = list(dict.fromkeys(r["runner"] for r in rows))
        width = 0.8 / len(runners)
        for i, run in enumerate(runners):
            vals = [next((r[key] for r in rows if r["shape"] == s and r["runner"] == run), 0) for s in shapes]
            ax.bar([x + i * width for x in range(len(shapes))], vals, width, label=run)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(shapes))], shapes)
        ax.set_yscale("log")
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "peers.png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="700m,2b4t")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tg", type=int, default=32)
    ap.add_argument("--runners", default="engine,fp32,bf16")
    ap.add_argument("--write-doc", action="store_true")
    ap.add_argument("--report", default=None)
    args = ap.parse_args(argv)
    from onebit.benchmarks.model import model_for_shape

    rows = []
    for shape in args.shapes.split(","):
        folder = model_for_shape(shape, "i2", "i8", ROOT / ".cache" / "onebit" / "bench-models")
        for kind in args.runners.split(","):
            r = child(kind, folder, 128, args.tg, args.threads)
            r["shape"] = shape
            rows.append(r)
            print(f"{shape:5} {r['runner']:32} pp {r['pp_tok_s']:9.1f}  tg {r['tg_tok_s']:8.2f}  "
                  f"rss {r['peak_rss_mb']:7.0f} MB", file=sys.stderr)
    if args.report:
        Path(args.report).write_text(json.dumps(rows, indent=1))
    if args.write_doc:
        write_doc(rows, args.threads, args.tg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
