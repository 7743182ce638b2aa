"""The quality cost of storing the embeddings / LM head at 16, 8 and 4 bits (packed weights unchanged):
validation perplexity of the Gutenberg b1.58 model (runs/gutenberg-bitnet, the docs/results.md
training run) on the engine, and the PyTorch fake-quant model as the reference.

    .venv/bin/python bench/results_heads.py [--max-tokens 65536]

Needs the training run folder (``onebit train --config gutenberg``); rewrites the section between
the results_heads markers of docs/results.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from docsection import replace_section

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=str(ROOT / "runs" / "gutenberg-bitnet"))
    ap.add_argument("--max-tokens", type=int, default=65536)
    args = ap.parse_args(argv)

    import onebit
    from onebit.checkpoint import load_model
    from onebit.engine.evaluate import perplexity as engine_ppl
    from onebit.evaluate import perplexity as torch_ppl
    from onebit.formats.packed_model import export_packed
    from onebit.train import load_run_config
    from onebit.data import prepare_data

    run = Path(args.run)
    rc = load_run_config("gutenberg", [])  # the built-in config that run was trained from
    data = prepare_data(rc.data)
    L = rc.data.seq_len
    model, _, _ = load_model(run)
    ref = torch_ppl(model, data.val, L, max_tokens=args.max_tokens)
    rows = [("PyTorch fake-quant (float32 embeddings)", ref, None)]
    with tempfile.TemporaryDirectory() as d:
        for emb in ("f32", "f16", "i8", "i4"):
            folder = export_packed(run, Path(d) / emb, "i2", emb)
            size = sum(f.stat().st_size for f in folder.iterdir())
            rows.append((f"engine, {emb} embeddings/head", engine_ppl(onebit.load(folder), data.val, L,
                                                                     args.max_tokens), size))
    lines = [f"Reproduce: `.venv/bin/python bench/results_heads.py --max-tokens {args.max_tokens}` "
             f"(model `{run.name}`, its validation split, seq_len {L}, "
             f"{ref['tokens']:,} tokens).", "",
             "| runner / storage | val loss | val ppl | Δ ppl vs PyTorch | packed folder |",
             "|---|---:|---:|---:|---:|"]
    for name, r, size in rows:
        lines.append(f"| {name} | {r['loss']:.4f} | {r['ppl']:.3f} | "
                     f"{(r['ppl'] / ref['ppl'] - 1) * 100:+.2f}% | "
                     f"{'—' if size is None else f'{size / 1e6:.2f} MB'} |")
    replace_section("results_heads", "\n".join(lines),
                    "## Embedding / LM-head storage: quality cost on the engine")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
