"""``onebit`` command line: a thin shell over the library (train, export, generate, chat, eval, bench).

Nothing here imports torch unless the command needs it: generate/chat on a packed model run on
the torch-free engine."""

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


def _cmd_finetune(args: argparse.Namespace, rest: list[str]) -> int:
    from .finetune import finetune
    from .train import load_run_config

    if any(a.startswith("--model.") for a in rest):
        raise ValueError("onebit finetune takes the architecture from --from; drop the --model.* overrides")
    extra = [f"--finetune.source={args.source}"]
    if args.tokenizer:
        extra.append(f"--finetune.tokenizer={args.tokenizer}")
    defaults = {"train": {"lr": 1e-4, "schedule": "constant", "out_dir": "runs/finetune"}}
    rc = load_run_config(args.config, extra + rest, defaults=defaults)
    summary = finetune(rc, resume=args.resume, export=args.export, layout=args.layout)
    if summary.get("val_loss") is not None:
        print(f"done: step {summary['step']}, val loss {summary['val_loss']:.4f}, "
              f"ppl {summary['val_ppl']:.2f} -> {summary['out_dir']}"
              + (f", packed -> {summary['export']}" if summary.get("export") else ""))
    return 130 if summary.get("interrupted") else 0


def _is_packed(path) -> bool:
    """A model the engine runs: an onebit packed folder, or a HF folder / GGUF file it imports."""
    from .formats.convert import detect_format

    try:
        return detect_format(path) in ("onebit", "hf", "gguf")
    except ValueError:
        return False


def _peak_rss_mb() -> float:
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def _engine_stats(m, n_prompt: int, times: list[float], t0: float) -> str:
    """One line: speeds, and the packed model's size next to what fp16 weights would need."""
    from pathlib import Path

    from .engine.stats import model_sizes

    sizes = model_sizes(m.runtime)
    n = len(times)
    pp = n_prompt / (times[0] - t0) if n else float("nan")
    tg = (n - 1) / (times[-1] - times[0]) if n > 1 else float("nan")
    disk = sum(f.stat().st_size for f in Path(m.runtime.folder).iterdir() if f.is_file())
    return (f"[onebit] {n_prompt} prompt tokens, prefill {pp:,.1f} tok/s; {n} generated, decode "
            f"{tg:,.1f} tok/s | model {disk / 1e6:.2f} MB on disk ({sizes['params'] / 1e6:.2f}M "
            f"params; fp16 weights would be {sizes['fp16_bytes'] / 1e6:.2f} MB, "
            f"{sizes['fp16_bytes'] / disk:.1f}x more) | peak RSS {_peak_rss_mb():.0f} MB")


def _timed(tokens, times: list[float]):
    import time

    for t in tokens:
        times.append(time.perf_counter())
        yield t


def _cmd_generate_engine(args: argparse.Namespace, path) -> int:
    import time

    import onebit

    from .streaming import stream_text

    m = onebit.load(path, kv_bits=args.kv_bits)
    ids = m.encode(args.prompt)
    times: list[float] = []
    t0 = time.perf_counter()
    gen = m.generate_ids(ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                         seed=args.seed)
    sys.stdout.write(args.prompt)
    for piece in stream_text(m.tokenizer, _timed(gen, times)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if not args.quiet:
        print(_engine_stats(m, len(ids), times, t0), file=sys.stderr)
    return 0


def _default_model():
    from .engine import default_model_path

    return default_model_path()


def _cmd_generate(args: argparse.Namespace) -> int:
    path = args.model or _default_model()
    if _is_packed(path):
        return _cmd_generate_engine(args, path)
    from .checkpoint import load_model  # the PyTorch path: a training run / checkpoint folder
    from .generate import generate_text

    if args.min_p is not None or args.repetition_penalty != 1.0 or args.kv_bits is not None:
        raise ValueError("--min-p, --repetition-penalty and --kv-bits need a packed model (the "
                         "engine); export this one with `onebit export`")
    model, tok, folder = load_model(path)
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


def _cmd_chat(args: argparse.Namespace) -> int:
    import onebit

    m = onebit.load(args.model or _default_model(), kv_bits=args.kv_bits)
    messages: list[dict] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("onebit chat: type a message; /reset clears the history, /exit or Ctrl-D quits.",
          file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        for piece in m.stream_chat(messages, args.max_new_tokens, temperature=args.temperature,
                                   top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                                   repetition_penalty=args.repetition_penalty, seed=args.seed):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})


def _cmd_export(args: argparse.Namespace) -> int:
    from .formats.packed_model import export_packed

    out = export_packed(args.src, args.dst, layout=args.layout, embedding=args.embedding)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"packed {args.src} -> {out} ({args.layout}, embeddings {args.embedding}, {size / 1e6:.2f} MB)")
    return 0


def _cmd_eval_ppl(args: argparse.Namespace) -> int:
    import numpy as np

    from .data import read_documents

    if _is_packed(args.model):  # packed / HF / GGUF: the torch-free engine
        import onebit
        from .engine.evaluate import perplexity as engine_ppl

        m = onebit.load(args.model, kv_bits=args.kv_bits)
        if m.tokenizer is None:
            raise ValueError(f"model '{args.model}' has no tokenizer.json; copy the model's tokenizer "
                             f"beside it")
        cfg, folder = m.config, args.model
        encode = lambda text: m.tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
        run = lambda ids, L: engine_ppl(m, ids, L, max_tokens=args.max_tokens)  # noqa: E731
    else:  # a training run / checkpoint folder: PyTorch
        from .checkpoint import load_model
        from .evaluate import perplexity

        model, tok, folder = load_model(args.model)
        if tok is None:
            raise ValueError(f"model folder '{folder}' has no tokenizer.json")
        if args.kv_bits is not None:  # PyTorch: 32 and 16 both mean not quantized
            model.set_kv_bits(min(args.kv_bits, 16))
        cfg = model.config
        encode = lambda text: tok.encode(text).ids  # noqa: E731
        run = lambda ids, L: perplexity(model, ids, L, batch_size=args.batch_size,  # noqa: E731
                                        max_tokens=args.max_tokens)
    ids: list[int] = []
    for doc in read_documents(args.files):
        ids += [cfg.bos_token_id] + encode(doc.text) + [cfg.eos_token_id]
    seq_len = args.seq_len or min(cfg.max_position_embeddings, 256)
    res = run(np.asarray(ids, dtype=np.int64), seq_len)
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
        print(f"{args.bench_help()}\nonebit bench: error: name a benchmark, e.g. onebit bench model",
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
    if args.what == "model":
        from .benchmarks import model
        return model.main(rest) or 0
    if args.what == "serve":
        from .benchmarks import serve
        return serve.main(rest) or 0
    raise ValueError(f"unknown bench {args.what!r}")


def _cmd_serve(args: argparse.Namespace) -> int:
    import os

    from .serve import ServeConfig, serve

    serve(ServeConfig(model=args.model, host=args.host, port=args.port,
                      api_key=args.api_key or os.environ.get("ONEBIT_API_KEY") or None,
                      parallel=args.parallel, max_queue=args.max_queue, ctx=args.ctx,
                      kv_bits=args.kv_bits, prefill_chunk=args.prefill_chunk,
                      model_name=args.model_name))
    return 0


def _serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching and a web chat",
                       description="Serve a model over the OpenAI API (/v1/chat/completions, "
                                   "/v1/completions, /v1/models, /health, /metrics, /tokenize, "
                                   "/detokenize) and a chat page at /. Loopback only unless --host says "
                                   "otherwise. Needs pip install 'onebit[serve]'.")
    s.add_argument("--model", default=None, help="packed model folder (or HF folder / GGUF file); "
                                                 "default: the built-in model")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every endpoint "
                                                   "but /health (or set ONEBIT_API_KEY)")
    s.add_argument("--parallel", type=int, default=8, help="sequences decoded at once (KV cache slots)")
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 503")
    s.add_argument("--ctx", type=int, default=None, help="context per slot (default: the model's)")
    s.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens prefilled per step beside the others' decoding")
    s.add_argument("--model-name", default=None, help="the model id clients send (default: the folder name)")
    s.add_argument("--kv-bits", type=int, default=None, choices=[32, 16, 8, 4, 3],
                   help="KV cache bits per value (default: the model's config)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onebit", description="Train, evaluate and run 1-bit (ternary) LLMs.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a BitNet b1.58 model (or its fp twin) from scratch",
                       description="Train from a TOML config ([model], [data], [train] tables; a path or "
                                   "a built-in name such as 'demo') plus --section.key=value overrides, "
                                   "e.g. --model.linear=fp --train.steps=200. Ctrl-C saves a checkpoint.")
    t.add_argument("--config", default=None, help="TOML file or built-in config name")
    t.add_argument("--resume", action="store_true", help="continue the run in train.out_dir from its latest checkpoint")

    f = sub.add_parser("finetune", help="fine-tune a full-precision model to 1.58 bits (λ warm-up)",
                       description="Convert --from (a transformers Llama/Mistral/Qwen2/Phi-3 folder, an onebit "
                                   "run or checkpoint, or a llama2.c .bin) to BitNet b1.58 and fine-tune it with "
                                   "the λ warm-up of the HF blog (default: linear over 1000 steps, lr 1e-4), "
                                   "with every option of `onebit train` as --section.key=value, e.g. "
                                   "--data.paths=DIR --train.steps=2000 --finetune.lambda_schedule=sigmoid "
                                   "--finetune.distill_weight=1.")
    f.add_argument("--from", dest="source", required=True, help="HF folder, onebit run folder or llama2.c .bin")
    f.add_argument("--tokenizer", default=None, help="tokenizer.json or llama2.c tok*.bin (default: "
                                                     "found beside the source)")
    f.add_argument("--config", default=None, help="TOML file ([data], [train], [finetune] tables)")
    f.add_argument("--resume", action="store_true", help="continue the run in train.out_dir")
    f.add_argument("--export", default=None, metavar="DIR", help="also write the packed model for the engine")
    f.add_argument("--layout", default="i2", choices=["i2", "t1_6"], help="packed layout for --export")

    def kv_bits_arg(a: argparse.ArgumentParser, what: str) -> None:
        a.add_argument("--kv-bits", type=int, choices=[32, 16, 8, 4, 3], default=None,
                       help=f"{what} with the KV cache at 32 (float32), 16 (float16), 8, 4 or 3 "
                            f"bits per value (default: the model's; unquantized models: float32; "
                            f"PyTorch keeps 32 and 16 unquantized)")

    def sampling_args(a: argparse.ArgumentParser, max_new: int) -> None:
        a.add_argument("--max-new-tokens", type=int, default=max_new)
        a.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
        a.add_argument("--top-k", type=int, default=None)
        a.add_argument("--top-p", type=float, default=None)
        a.add_argument("--min-p", type=float, default=None, help="engine only")
        a.add_argument("--repetition-penalty", type=float, default=1.0, help="engine only; 1 = off")
        a.add_argument("--seed", type=int, default=None)

    g = sub.add_parser("generate", help="generate text (packed model: the C engine; training "
                                        "folder: PyTorch)")
    g.add_argument("prompt", nargs="?", default="", help="prompt text")
    g.add_argument("--model", default=None, help="packed model folder (`onebit export`), or a run / "
                                                 "model / checkpoint folder; default: the built-in model")
    sampling_args(g, 100)
    kv_bits_arg(g, "engine only: generate")
    g.add_argument("--quiet", action="store_true", help="no speed/memory line on stderr")

    c = sub.add_parser("chat", help="interactive chat with a packed model (streaming)")
    c.add_argument("--model", default=None, help="packed model folder; default: the built-in model")
    c.add_argument("--system", default=None, help="system message")
    kv_bits_arg(c, "chat")
    sampling_args(c, 256)

    x = sub.add_parser("export", help="pack a trained model for the engine")
    x.add_argument("src", help="run, model or checkpoint folder of a ternary model")
    x.add_argument("dst", help="packed model folder to write (replaced atomically)")
    x.add_argument("--layout", default="i2", choices=["i2", "t1_6"], help="i2: 2 bits/weight (fast), "
                                                                          "t1_6: 1.6 bits/weight (small)")
    x.add_argument("--embedding", default="f32", choices=["f32", "f16", "i8", "i4"],
                   help="embedding / LM head storage (f32 lossless)")

    cv = sub.add_parser("convert", help="convert between onebit, Hugging Face and GGUF formats "
                                        "(checked: logits vs the source after every conversion)")
    cv.add_argument("src", help="onebit packed folder, Hugging Face checkpoint folder (2B4T packed or "
                                "-bf16, HF1BitLLM, 1bitLLM) or GGUF file")
    cv.add_argument("dst", help="folder or file to write (replaced atomically, only if the check passes)")
    cv.add_argument("--to", required=True, choices=["onebit", "hf", "gguf-tq2_0", "gguf-tq1_0",
                                                   "gguf-i2_s"],
                    help="onebit: packed folder for the engine; hf: transformers BitNet packed; "
                         "gguf-tq2_0 / gguf-tq1_0: llama.cpp (2.06 / 1.69 bpw); gguf-i2_s: bitnet.cpp")
    cv.add_argument("--layout", default="i2", choices=["i2", "t1_6"], help="--to onebit: 2 or 1.6 bits/weight")
    cv.add_argument("--embedding", default="auto", choices=["auto", "f32", "f16", "i8", "i4"],
                    help="embedding / LM head type; auto keeps the source's (never widened)")
    cv.add_argument("--scales", default="tensor", choices=["tensor", "block"],
                    help="GGUF TQ types: tensor = exact f32 per-tensor scale tensors (default); block = "
                         "fp16 d per block (as llama.cpp's converter; refused unless exact)")
    cv.add_argument("--allow-relu2", action="store_true",
                    help="GGUF TQ types: write a ReLU² model anyway (stock llama.cpp computes SiLU in "
                         "its bitnet graph; only for builds patched to ReLU²)")
    cv.add_argument("--no-verify", action="store_true", help="skip the logits parity check")

    e = sub.add_parser("eval", help="evaluate a model")
    esub = e.add_subparsers(dest="what", required=True, metavar="WHAT")
    ep = esub.add_parser("ppl", help="perplexity on text files or folders")
    ep.add_argument("files", nargs="+")
    ep.add_argument("--model", required=True)
    ep.add_argument("--seq-len", type=int, default=None)
    ep.add_argument("--batch-size", type=int, default=8)
    ep.add_argument("--max-tokens", type=int, default=None)
    kv_bits_arg(ep, "evaluate (the quality cost of a quantized cache)")
    ep.add_argument("--json", action="store_true")

    b = sub.add_parser("bench", help="benchmarks (ratios against a baseline measured in the same run)",
                       add_help=False)  # -h goes to the benchmark's own parser
    b.add_argument("-h", "--help", action="store_true", help="show this help, or WHAT's options")
    b.add_argument("what", nargs="?", choices=["model", "kernels", "bitlinear", "serve"],
                   help="model: engine prefill/decode tok/s, TTFT, memory (llama-bench style); "
                        "kernels: the C ternary GEMV/GEMM vs torch fp32/bf16 and the read bandwidth; "
                        "bitlinear: BitLinear fwd+bwd vs nn.Linear; serve: `onebit serve` under 1-16 "
                        "concurrent streams vs llama-server (options: onebit bench WHAT --help)")
    b.set_defaults(bench_help=b.format_help)
    _serve_parser(sub)
    return p


def _cmd_convert(args: argparse.Namespace) -> int:
    from .formats.convert import convert

    try:
        rep = convert(args.src, args.dst, args.to, layout=args.layout,
                      embedding=None if args.embedding == "auto" else args.embedding,
                      verify=not args.no_verify, allow_relu2=args.allow_relu2, scales=args.scales)
    except ImportError as e:
        print(f"onebit convert: error: {e}", file=sys.stderr)
        return 2
    par = rep["parity"]
    check = ("parity not checked (--no-verify)" if par is None else
             f"parity ok: max |logit diff| {par['max_rel_err']:.2e} of range, top-1 agreement "
             f"{par['top1_agree']:.0%} over {par['positions']} positions")
    print(f"wrote {rep['output']} ({rep['bytes'] / 1e6:.2f} MB, {args.to}) in {rep['seconds']:.1f} s; {check}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        if args.cmd == "train":
            return _cmd_train(args, rest)
        if args.cmd == "finetune":
            return _cmd_finetune(args, rest)
        if args.cmd == "bench":
            return _cmd_bench(args, rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        if args.cmd == "generate":
            return _cmd_generate(args)
        if args.cmd == "chat":
            return _cmd_chat(args)
        if args.cmd == "export":
            return _cmd_export(args)
        if args.cmd == "eval":
            return _cmd_eval_ppl(args)
        if args.cmd == "convert":
            return _cmd_convert(args)
        if args.cmd == "serve":
            return _cmd_serve(args)
    except (ConfigError, ValueError) as e:  # every onebit error is a ValueError subclass
        print(f"onebit {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:
        if e.name != "torch":
            raise
        print(f"onebit {args.cmd}: error: this command needs PyTorch (training extras): "
              f"pip install 'onebit[train]'", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
