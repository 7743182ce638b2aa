"""``onebit`` command line: a thin shell over the library (train, generate, eval, bench)."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_train(args: argparse.Namespace, rest: list[str]) -> int:
    from .train import load_run_config, train

    rc = load_run_config(args.config, rest)
    summary = train(rc, resume=args.resume)
    if summary.get("val_loss") is not None:
        print(f"done: step {summary['step']}, val loss {summary['val_loss']:.4f}, "
              f"ppl {summary['val_ppl']:.2f}, {summary['tok_s']:,.0f} tok/s -> {summary['out_dir']}")
    return 130 if summary.get("interrupted") else 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .checkpoint import load_model
    from .generate import generate_text

    model, tok, folder = load_model(args.model)
    if tok is None:
        raise ValueError(f"model folder '{folder}' has no tokenizer.json; copy the tokenizer it was "
                         f"trained with next to model.safetensors")
    cfg = model.config
    pieces = generate_text(model, tok, args.prompt, args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                           bos_id=cfg.bos_token_id, eos_id=cfg.eos_token_id)
    sys.stdout.write(args.prompt)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _cmd_eval_ppl(args: argparse.Namespace) -> int:
    import numpy as np

    from .checkpoint import load_model
    from .data import read_documents
    from .evaluate import perplexity

    model, tok, folder = load_model(args.model)
    if tok is None:
        raise ValueError(f"model folder '{folder}' has no tokenizer.json")
    cfg = model.config
    ids: list[int] = []
    for doc in read_documents(args.files):
        ids += [cfg.bos_token_id] + tok.encode(doc.text).ids + [cfg.eos_token_id]
    seq_len = args.seq_len or min(cfg.max_position_embeddings, 256)
    res = perplexity(model, np.asarray(ids, dtype=np.int64), seq_len, batch_size=args.batch_size,
                     max_tokens=args.max_tokens)
    if args.json:
        print(json.dumps({**res, "model": str(folder), "seq_len": seq_len}))
    else:
        print(f"{folder}: loss {res['loss']:.4f}  ppl {res['ppl']:.3f}  over {res['tokens']:,} tokens "
              f"(seq_len {seq_len})")
    return 0


def _cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    if args.what is None:  # `onebit bench [--help]`: the list of benchmarks
        if args.help:
            print(args.bench_help())
            return 0
        print(f"{args.bench_help()}\nonebit bench: error: name a benchmark, e.g. onebit bench kernels",
              file=sys.stderr)
        return 2
    if args.help:  # `onebit bench WHAT --help`: that benchmark's own options
        rest = ["--help", *rest]
    if args.what == "bitlinear":
        from .benchmarks import bitlinear
        return bitlinear.main(rest) or 0
    if args.what == "kernels":
        from .benchmarks import kernels
        return kernels.main(rest) or 0
    raise ValueError(f"unknown bench {args.what!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onebit", description="Train, evaluate and run 1-bit (ternary) LLMs.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a BitNet b1.58 model (or its fp twin) from scratch",
                       description="Train from a TOML config ([model], [data], [train] tables; a path or "
                                   "a built-in name such as 'demo') plus --section.key=value overrides, "
                                   "e.g. --model.linear=fp --train.steps=200. Ctrl-C saves a checkpoint.")
    t.add_argument("--config", default=None, help="TOML file or built-in config name")
    t.add_argument("--resume", action="store_true", help="continue the run in train.out_dir from its latest checkpoint")

    g = sub.add_parser("generate", help="generate text from a trained model (PyTorch path)")
    g.add_argument("prompt", nargs="?", default="", help="prompt text")
    g.add_argument("--model", required=True, help="run folder, model folder or checkpoint folder")
    g.add_argument("--max-new-tokens", type=int, default=100)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)

    e = sub.add_parser("eval", help="evaluate a model")
    esub = e.add_subparsers(dest="what", required=True, metavar="WHAT")
    ep = esub.add_parser("ppl", help="perplexity on text files or folders")
    ep.add_argument("files", nargs="+")
    ep.add_argument("--model", required=True)
    ep.add_argument("--seq-len", type=int, default=None)
    ep.add_argument("--batch-size", type=int, default=8)
    ep.add_argument("--max-tokens", type=int, default=None)
    ep.add_argument("--json", action="store_true")

    b = sub.add_parser("bench", help="benchmarks (ratios against a baseline measured in the same run)",
                       add_help=False)  # -h goes to the benchmark's own parser
    b.add_argument("-h", "--help", action="store_true", help="show this help, or WHAT's options")
    b.add_argument("what", nargs="?", choices=["bitlinear", "kernels"],
                   help="bitlinear: BitLinear fwd+bwd vs nn.Linear; kernels: the C ternary GEMV/GEMM "
                        "vs torch fp32/bf16 and the read bandwidth (options: onebit bench WHAT --help)")
    b.set_defaults(bench_help=b.format_help)
    return p


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        if args.cmd == "train":
            return _cmd_train(args, rest)
        if args.cmd == "bench":
            return _cmd_bench(args, rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        if args.cmd == "generate":
            return _cmd_generate(args)
        if args.cmd == "eval":
            return _cmd_eval_ppl(args)
    except (ConfigError, DataError, CheckpointError, ValueError) as e:
        print(f"onebit {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
