"""``onebit`` command line: a thin shell over the library (train, export, generate, chat, eval, bench).

Nothing here imports torch unless the command needs it: generate/chat on a packed model run on
the torch-free engine."""

from __future__ import annotations

import argparse
import json
import sys


def _main_rank() -> bool:
    """Not a torchrun worker other than rank 0 (the one that prints the summary)."""
    import os

    return os.environ.get("RANK", "0") == "0"


def _cmd_train(args: argparse.Namespace, rest: list[str]) -> int:
    from .train import load_run_config, train

    rc = load_run_config(args.config, rest)
    summary = train(rc, resume=args.resume)
    if summary.get("val_loss") is not None and _main_rank():
        print(f"done: step {summary['step']}, val loss {summary['val_loss']:.4f}, "
              f"ppl {summary['val_ppl']:.2f}, {summary['tok_s']:,.0f} tok/s -> {summary['out_dir']}")
    return 130 if summary.get("interrupted") else 0


class _OptionsHelp(argparse.Action):
    """-h/--help of train and finetune: the usual help, then every --section.key=value option
    listed from the config dataclasses (imported only here: they need torch)."""

    def __init__(self, option_strings, dest, sections=(), defaults=None, **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="show this help and every --section.key=value option", **kw)
        self.sections, self.defaults = sections, defaults

    def __call__(self, parser, namespace, values, option_string=None):
        from .config import PRESETS, options_help
        from .train import SECTIONS

        notes = {"model": f"--model.preset=NAME first sets one of {', '.join(PRESETS)}"}
        try:
            parser.print_help()
            print("\n" + options_help({k: SECTIONS[k] for k in self.sections}, self.defaults, notes))
        except BrokenPipeError:  # `onebit train --help | head`
            pass
        parser.exit()


FINETUNE_DEFAULTS = {"train": {"lr": 1e-4, "schedule": "constant", "out_dir": "runs/finetune"}}


def _cmd_finetune(args: argparse.Namespace, rest: list[str]) -> int:
    from .finetune import finetune
    from .train import load_run_config

    if any(a.startswith("--model.") for a in rest):
        raise ValueError("onebit finetune takes the architecture from --from; drop the --model.* overrides")
    extra = [f"--finetune.source={args.source}"]
    if args.tokenizer:
        extra.append(f"--finetune.tokenizer={args.tokenizer}")
    rc = load_run_config(args.config, extra + rest, defaults=FINETUNE_DEFAULTS)
    summary = finetune(rc, resume=args.resume, export=args.export, layout=args.layout, force=args.force)
    if summary.get("val_loss") is not None and _main_rank():
        print(f"done: step {summary['step']}, val loss {summary['val_loss']:.4f}, "
              f"ppl {summary['val_ppl']:.2f} -> {summary['out_dir']}"
              + (f", packed -> {summary['export']}" if summary.get("export") else ""))
    _print_replaced(summary.get("export"), summary.get("replaced"))
    return 130 if summary.get("interrupted") else 0


def _rate(n: float, seconds: float) -> str:
    return f"{n / seconds:,.1f} tok/s" if n > 0 and seconds > 0 else "- tok/s"


def _engine_stats(m, n_prompt: int, times: list[float], t0: float) -> str:
    """One line: speeds, and the packed model's size next to what fp16 weights would need."""
    from pathlib import Path

    from .engine.stats import model_sizes

    from .engine.stats import peak_rss_text

    sizes = model_sizes(m.runtime)
    n = len(times)  # speeds need a measured span: "-" for none (e.g. --max-new-tokens 0)
    pp = _rate(n_prompt, times[0] - t0) if n else "- tok/s"
    tg = _rate(n - 1, times[-1] - times[0]) if n > 1 else "- tok/s"
    disk = sum(f.stat().st_size for f in Path(m.runtime.folder).iterdir() if f.is_file())
    return (f"[onebit] {n_prompt} prompt tokens, prefill {pp}; {n} generated, decode "
            f"{tg} | model {disk / 1e6:.2f} MB on disk ({sizes['params'] / 1e6:.2f}M "
            f"params; fp16 weights would be {sizes['fp16_bytes'] / 1e6:.2f} MB, "
            f"{sizes['fp16_bytes'] / disk:.1f}x more) | {peak_rss_text()}")


def _timed(tokens, times: list[float]):
    import time

    for t in tokens:
        times.append(time.perf_counter())
        yield t


def _cmd_generate_engine(args: argparse.Namespace, path, m=None) -> int:
    """Generate on ``m`` (default: ``path`` loaded on the engine); the speed/memory line is the
    engine's (a PyTorch model, from resolve.load_runnable, prints none)."""
    import time

    import onebit

    from .streaming import stream_text

    engine = m is None
    if m is None:
        m = onebit.load(path, kv_bits=args.kv_bits)
    _set_threads(m, args.threads)
    ids = m.encode(args.prompt)  # raises on non-UTF-8 prompt bytes
    times: list[float] = []
    t0 = time.perf_counter()
    gen = m.generate_ids(ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                         seed=args.seed)
    sys.stdout.write(args.prompt)
    for piece in stream_text(m.tokenizer, _timed(gen, times), context=ids):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if not args.quiet and engine:
        print(_engine_stats(m, len(ids), times, t0), file=sys.stderr)
    return 0


def _default_model():
    from .engine import default_model_path

    return default_model_path()


def _cmd_generate(args: argparse.Namespace) -> int:
    from .engine.api import check_text
    from .resolve import classify, load_runnable

    check_text(args.prompt)  # argv bytes that are not UTF-8 arrive as lone surrogates
    src = classify(args.model or _default_model())
    if src.engine:
        return _cmd_generate_engine(args, src.path)
    # a training run / checkpoint, a full-precision HF folder or a llama2.c .bin: PyTorch
    m = load_runnable(src, kv_bits=args.kv_bits)
    if m.tokenizer is None:
        raise ValueError(f"model folder '{m.runtime.folder}' has no tokenizer.json; copy the tokenizer "
                         f"it was trained with next to model.safetensors")
    return _cmd_generate_engine(args, src.path, m)


def _set_threads(m, threads: int | None) -> None:
    """--threads for the engine's kernels, or the PyTorch decode threads (default: 1 for a small
    model, generate.decode_threads)."""
    from .resolve import TorchRuntime

    if isinstance(m.runtime, TorchRuntime):
        import torch

        from .generate import decode_threads

        torch.set_num_threads(threads or decode_threads(m.runtime.model))
    elif threads:
        from . import kernels

        kernels.set_num_threads(threads)


def _read_chat_line() -> str | None:
    """One line of chat input; None at end of input. Bytes that are not UTF-8 arrive as lone
    surrogates (stdin decodes with surrogateescape), which the caller reports."""
    if hasattr(sys.stdin, "reconfigure") and sys.stdin.errors != "surrogateescape":
        sys.stdin.reconfigure(errors="surrogateescape")
    try:
        return input("> ")
    except EOFError:
        return None


def _cmd_chat(args: argparse.Namespace) -> int:
    from .resolve import load_runnable

    from .engine.api import check_text
    from .sampling import validate_sampling

    if args.system:
        check_text(args.system, "--system")
    validate_sampling(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: a reply needs at least 1 token")
    m = load_runnable(args.model or _default_model(), kv_bits=args.kv_bits)  # engine or PyTorch
    _set_threads(m, None)
    messages: list[dict] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("onebit chat: type a message; /reset clears the history, /exit or Ctrl-D quits.",
          file=sys.stderr)
    while True:
        line = _read_chat_line()
        if line is None:
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        try:  # a bad message is reported and dropped; the conversation goes on
            check_text(line, "the message")
            fit = m.fit_chat(messages + [{"role": "user", "content": line}], args.max_new_tokens)
        except ValueError as e:
            print(f"onebit chat: error: {e}", file=sys.stderr)
            continue
        if fit.dropped:
            print(f"onebit chat: the conversation outgrew the model's "
                  f"{m.config.max_position_embeddings}-token context: dropped the oldest "
                  f"{fit.dropped} message(s)" + (" (kept the system message)" if args.system else ""),
                  file=sys.stderr)
        messages = fit.messages
        reply = []
        for piece in m.stream(fit.ids, fit.max_new_tokens, heal=True, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                              repetition_penalty=args.repetition_penalty, seed=args.seed):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})


def _print_replaced(dst, replaced) -> None:
    if replaced:
        print(f"replaced the earlier onebit output at {dst} ({', '.join(replaced)})")


def _cmd_export(args: argparse.Namespace) -> int:
    from .destination import check_destination
    from .formats.packed_model import export_packed

    replaced = check_destination(args.dst, "model", [args.src], force=args.force)  # for the message
    out = export_packed(args.src, args.dst, layout=args.layout, embedding=args.embedding,
                        force=args.force)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"packed {args.src} -> {out} ({args.layout}, embeddings {args.embedding}, {size / 1e6:.2f} MB)")
    _print_replaced(out, replaced)
    return 0


class _Progress:
    """``[onebit] eval: 2,048/8,192 tokens, 1,530 tok/s`` on stderr: rewritten in place on a
    terminal (at most 4 times a second), a line every 10 s into a log; the final line always."""

    def __init__(self, what: str):
        import time

        self.what, self.clock = what, time.perf_counter
        self.t0 = self.last = self.clock()
        self.tty = sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        final = done >= total
        if not final and now - self.last < (0.25 if self.tty else 10.0):
            return
        self.last = now
        rate = done / (now - self.t0) if now > self.t0 else 0.0
        line = f"[onebit] {self.what}: {done:,}/{total:,} tokens, {rate:,.0f} tok/s"
        end = "\n" if final or not self.tty else ""
        print(("\r" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (0 or a negative count is refused, never replaced)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be >= 1")
    return v


def _cmd_eval_ppl(args: argparse.Namespace) -> int:
    from .data import corpus_tokens

    from .resolve import classify, load_torch

    src = classify(args.model or _default_model())
    if src.engine:  # packed / HF / GGUF: the torch-free engine
        import onebit
        from .engine.evaluate import perplexity as engine_ppl

        m = onebit.load(src.path, kv_bits=args.kv_bits)
        if m.tokenizer is None:
            raise ValueError(f"model '{src.path}' has no tokenizer.json; copy the model's tokenizer "
                             f"beside it")
        # each document as a prompt (BOS by the tokenizer's convention), then EOS as in training
        cfg, folder, tok, bos = m.config, src.path, m.tokenizer, m.bos_convention.bos_id
        run = lambda ids, L, progress: engine_ppl(m, ids, L, max_tokens=args.max_tokens,  # noqa: E731
                                                  progress=progress)
    else:  # a training run / checkpoint, full-precision HF folder, llama2.c .bin: PyTorch
        from .evaluate import perplexity

        model, tok, folder, conv = load_torch(src)
        if tok is None:
            raise ValueError(f"model folder '{folder}' has no tokenizer.json")
        folder = folder if src.kind == "run" else src.path
        if args.kv_bits is not None:  # PyTorch: 32 and 16 both mean not quantized
            model.set_kv_bits(min(args.kv_bits, 16))
        cfg = model.config
        bos = None if conv is None else conv.bos_id
        run = lambda ids, L, progress: perplexity(model, ids, L, batch_size=args.batch_size,  # noqa: E731
                                                  max_tokens=args.max_tokens, progress=progress)
    seq_len = args.seq_len or min(cfg.max_position_embeddings, 256)
    if seq_len > cfg.max_position_embeddings:
        raise ValueError(f"--seq-len {seq_len} exceeds the context of '{folder}' "
                         f"({cfg.max_position_embeddings} tokens): use --seq-len "
                         f"{cfg.max_position_embeddings} or less")
    # with --max-tokens only the windows scored are read and tokenized (+1: the last target)
    need = None if args.max_tokens is None else max(1, args.max_tokens // seq_len) * seq_len + 1
    ids = corpus_tokens(args.files, tok, bos, cfg.eos_token_id, max_tokens=need)
    res = run(ids, seq_len, None if args.json and not sys.stderr.isatty() else _Progress("eval"))
    if args.json:
        print(json.dumps({**res, "model": str(folder), "seq_len": seq_len}))
    else:
        print(f"{folder}: loss {res['loss']:.4f}  ppl {res['ppl']:.3f}  over {res['tokens']:,} tokens "
              f"(seq_len {seq_len})")
    return 0


def _cmd_eval_tasks(args: argparse.Namespace) -> int:
    from .eval.run import evaluate_tasks, format_report, load_scorer
    from .eval.tasks import resolve_tasks

    resolve_tasks(args.tasks)  # unknown names fail before the model loads
    path = args.model or _default_model()
    backend = args.backend
    if backend == "auto":  # packed / HF / GGUF: the engine; a training folder: PyTorch
        from .resolve import classify

        backend = "engine" if classify(path).engine else "torch"
    if args.threads is not None:
        from . import kernels

        kernels.set_num_threads(args.threads)
        if backend == "torch":
            import torch

            torch.set_num_threads(args.threads)
    scorer = load_scorer(path, backend, kv_bits=args.kv_bits, batch_size=args.batch_size)
    report = evaluate_tasks(scorer, args.tasks, limit=args.limit, data_dir=args.data_dir,
                            show_progress=not args.quiet, keep_samples=args.samples)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
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


FORCE_HELP = ("replace an earlier onebit output at the destination (atomically: the old one stays "
              "until the new one is complete); never the source, never files onebit did not write")
MODEL_HELP = ("packed model folder, Hugging Face folder, GGUF file (ternary: the C engine), or an "
              "onebit run / checkpoint folder, full-precision Hugging Face folder or llama2.c .bin "
              "(PyTorch); default: the built-in model")
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
                                   "e.g. --model.linear=fp --train.steps=200. Ctrl-C saves a checkpoint.",
                       add_help=False)
    t.add_argument("-h", "--help", action=_OptionsHelp, sections=("model", "data", "train"))
    t.add_argument("--config", default=None, help="TOML file or built-in config name")
    t.add_argument("--resume", action="store_true", help="continue the run in train.out_dir from its latest checkpoint")

    f = sub.add_parser("finetune", help="fine-tune a full-precision model to 1.58 bits (λ warm-up)",
                       description="Convert --from (a transformers Llama/Mistral/Qwen2/Phi-3 folder, an onebit "
                                   "run or checkpoint, or a llama2.c .bin) to BitNet b1.58 and fine-tune it with "
                                   "the λ warm-up of the HF blog (default: linear over 1000 steps, lr 1e-4), "
                                   "with every option of `onebit train` as --section.key=value, e.g. "
                                   "--data.paths=DIR --train.steps=2000 --finetune.lambda_schedule=sigmoid "
                                   "--finetune.distill_weight=1.", add_help=False)
    f.add_argument("-h", "--help", action=_OptionsHelp, sections=("data", "train", "finetune"),
                   defaults=FINETUNE_DEFAULTS)
    f.add_argument("--from", dest="source", required=True, help="HF folder, onebit run folder or llama2.c .bin")
    f.add_argument("--tokenizer", default=None, help="tokenizer.json or llama2.c tok*.bin (default: "
                                                     "found beside the source)")
    f.add_argument("--config", default=None, help="TOML file ([data], [train], [finetune] tables)")
    f.add_argument("--resume", action="store_true", help="continue the run in train.out_dir")
    f.add_argument("--export", default=None, metavar="DIR", help="also write the packed model for the engine")
    f.add_argument("--layout", default="i2", choices=["i2", "t1_6"], help="packed layout for --export")
    f.add_argument("--force", action="store_true", help=FORCE_HELP.replace("the destination", "--export"))

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
        a.add_argument("--min-p", type=float, default=None)
        a.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
        a.add_argument("--seed", type=int, default=None)

    g = sub.add_parser("generate", help="generate text (ternary model: the C engine; training "
                                        "folder or full-precision model: PyTorch)")
    g.add_argument("prompt", nargs="?", default="", help="prompt text")
    g.add_argument("--model", default=None, help=MODEL_HELP)
    sampling_args(g, 100)
    kv_bits_arg(g, "generate")
    g.add_argument("--quiet", action="store_true", help="no speed/memory line on stderr")
    g.add_argument("--threads", type=_positive_int, default=None,
                   help="threads (engine default: the physical cores; PyTorch default: 1 for "
                        "models under 200M parameters, where more threads only add overhead, "
                        "torch's default above)")

    c = sub.add_parser("chat", help="interactive chat with a model (streaming)")
    c.add_argument("--model", default=None, help=MODEL_HELP)
    c.add_argument("--system", default=None, help="system message")
    kv_bits_arg(c, "chat")
    sampling_args(c, 256)

    x = sub.add_parser("export", help="pack a trained model for the engine")
    x.add_argument("src", help="run, model or checkpoint folder of a ternary model")
    x.add_argument("dst", help="packed model folder to write: new or empty (an earlier onebit output "
                               "only with --force)")
    x.add_argument("--force", action="store_true", help=FORCE_HELP)
    x.add_argument("--layout", default="i2", choices=["i2", "t1_6"], help="i2: 2 bits/weight (fast), "
                                                                          "t1_6: 1.6 bits/weight (small)")
    x.add_argument("--embedding", default="f32", choices=["f32", "f16", "i8", "i4"],
                   help="embedding / LM head storage (f32 lossless)")

    cv = sub.add_parser("convert", help="convert between onebit, Hugging Face and GGUF formats "
                                        "(checked: logits vs the source after every conversion)")
    cv.add_argument("src", help="onebit packed folder, Hugging Face checkpoint folder (2B4T packed or "
                                "-bf16, HF1BitLLM, 1bitLLM) or GGUF file")
    cv.add_argument("dst", help="folder or file to write, only if the check passes: new or empty (an "
                                "earlier onebit output only with --force)")
    cv.add_argument("--force", action="store_true", help=FORCE_HELP)
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
    ep.add_argument("files", nargs="+", help="UTF-8 text files or folders of *.txt files")
    ep.add_argument("--model", default=None, help=MODEL_HELP)
    ep.add_argument("--seq-len", type=_positive_int, default=None,
                    help="tokens per window (default: the model's context, at most 256)")
    ep.add_argument("--batch-size", type=_positive_int, default=8, help="windows per batch (PyTorch)")
    ep.add_argument("--max-tokens", type=_positive_int, default=None,
                    help="score only the first N tokens (reads and tokenizes only those)")
    kv_bits_arg(ep, "evaluate (the quality cost of a quantized cache)")
    ep.add_argument("--json", action="store_true")
    et = esub.add_parser("tasks", help="zero-shot tasks (ARC, HellaSwag, PIQA, WinoGrande, BoolQ, "
                                       "OpenBookQA) with lm-eval's prompts and metrics",
                         description="Zero-shot accuracy (acc, acc_norm with standard errors) on the "
                                     "local eval files, prompted and scored as lm-evaluation-harness "
                                     "does; batched log-likelihoods on the engine.")
    et.add_argument("--model", default=None, help="packed folder (engine), training run/checkpoint "
                                                  "(PyTorch); default: the built-in model")
    et.add_argument("--tasks", default="all", help="comma-separated: arc_easy, arc_challenge, "
                                                   "hellaswag, piqa, winogrande, boolq, openbookqa "
                                                   "(default: all)")
    et.add_argument("--limit", type=int, default=None, help="first N items of each task")
    et.add_argument("--backend", default="auto", choices=["auto", "engine", "torch"],
                    help="auto: the engine for packed/HF/GGUF models, PyTorch for training folders")
    et.add_argument("--data-dir", default=None, help="the eval data folder (default: "
                                                     "$ONEBIT_EVAL_DATA, else ../shared/data/eval)")
    et.add_argument("--batch-size", type=int, default=16, help="torch backend: sequences per forward")
    et.add_argument("--threads", type=int, default=None, help="CPU threads (engine and torch; "
                                                              "default: theirs)")
    kv_bits_arg(et, "engine only: score")
    et.add_argument("--json", action="store_true", help="print the JSON report")
    et.add_argument("--samples", action="store_true", help="with --json: per-item log-likelihoods "
                                                          "and predictions")
    et.add_argument("--quiet", action="store_true", help="no progress line on stderr")

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
    for a in (*sub.choices.values(), ep):  # an unknown flag is reported with its command's usage
        a.set_defaults(cmd_parser=a)
    return p


def _cmd_convert(args: argparse.Namespace) -> int:
    from .formats.convert import convert

    try:
        rep = convert(args.src, args.dst, args.to, layout=args.layout,
                      embedding=None if args.embedding == "auto" else args.embedding,
                      verify=not args.no_verify, allow_relu2=args.allow_relu2, scales=args.scales,
                      force=args.force)
    except ImportError as e:
        print(f"onebit convert: error: {e}", file=sys.stderr)
        return 2
    par = rep["parity"]
    check = ("parity not checked (--no-verify)" if par is None else
             f"parity ok: max |logit diff| {par['max_rel_err']:.2e} of range, top-1 agreement "
             f"{par['top1_agree']:.0%} over {par['positions']} positions")
    emb = rep.get("embedding")
    if emb:  # --embedding changed the stored values: what the storage allows, and what it costs
        check += (f"; embeddings {emb['source_type']} -> {emb['type']}: max |error| "
                  f"{emb['max_abs_err']:.2e} ({emb['of_bound']:.0%} of what {emb['type']} allows), "
                  f"logits vs the {emb['source_type']} source: max |diff| "
                  f"{emb['logits']['max_rel_err']:.2e} of range, top-1 {emb['logits']['top1_agree']:.0%}")
    print(f"wrote {rep['output']} ({rep['bytes'] / 1e6:.2f} MB, {args.to}) in {rep['seconds']:.1f} s; {check}")
    _print_replaced(rep["output"], rep.get("replaced"))
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
            getattr(args, "cmd_parser", parser).error(f"unrecognized arguments: {' '.join(rest)}")
        if args.cmd == "generate":
            return _cmd_generate(args)
        if args.cmd == "chat":
            return _cmd_chat(args)
        if args.cmd == "export":
            return _cmd_export(args)
        if args.cmd == "eval":
            return _cmd_eval_tasks(args) if args.what == "tasks" else _cmd_eval_ppl(args)
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
    except BrokenPipeError:  # `onebit generate ... | head`: the reader left; stop quietly as cat does
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141  # 128 + SIGPIPE, what a shell reports for a killed writer
    except ModuleNotFoundError as e:
        if e.name != "torch":
            raise
        print(f"onebit {args.cmd}: error: this command needs PyTorch (training extras): "
              f"pip install 'onebit[train]'", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
