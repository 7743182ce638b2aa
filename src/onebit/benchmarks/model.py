"""`onebit bench model`: end-to-end engine speed, llama-bench style (torch-free).

Measures, for a packed model folder (``--model``) or a random-ternary model of a named shape
(``--shape 2b4t|700m|3b|8b``: BitNet b1.58 2B4T, bitnet_b1_58-large (700M), bitnet_b1_58-3B,
Llama3-8B-1.58 (untied head); written once into ``.cache/onebit/bench-models``):

- prefill tokens/s for each ``--pp`` prompt length (default 128 and 512, those that fit the
  model's context), from an empty cache;
- decode tokens/s over ``--tg`` tokens (default 128, or what the context holds), one token per
  step from position 0, and
  with ``--depth`` from deeper positions too (llama-bench's ``-d``): the cache is filled by a
  prefill of random tokens up to each depth, then ``--tg`` tokens are decoded from there (the
  attention then reads ``depth`` cached positions per layer and step);
- time to first token for the first prompt length (prefill + the first sampled token);
- peak RSS of the process from its start (interpreter, loading, setup and the runs: what
  /usr/bin/time reports), and separately that of the child processes: the read-bandwidth probe
  (its 512 MiB buffer) and, the first time, the writer of a random ``--shape`` model;
- the bytes one decode step reads (packed weights + LM head as the engine reads it + norms; the
  KV cache read is listed separately at the --tg context) and that traffic as a fraction of the
  read bandwidth measured in the same run: for a model of more than twice the L3, ``read_probe``
  over the model file's own pages (resident after the warm-up) in this process, before each of
  at least 3 decode rounds (best of each: the machine's other load only ever slows either);
  for a smaller one, a 512 MiB buffer in a child process (the file would time the cache);
- the KV cache at the model's ``kv_bits`` (docs/formats.md §10): bytes allocated for the run's
  context, and ``kv_cache_bytes`` at that context, 4k and 16k tokens.

Every figure states the embedding/head format, which moves decode speed as much as the kernels.
``--kv-bits`` runs the cache at 32 (float32), 16 (float16), 8, 4 or 3 bits whatever the model's
config says.
``--json`` prints one object: {"pp_tok_s", "pp512_tok_s", "tg_tok_s", "ttft_s", "peak_rss_mb",
"bytes_per_token", "read_gb_s", "bw_frac", "tg_depth": {depth: tok/s}, ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

SHAPES = {"2b4t": "bitnet-2b4t", "700m": "bitnet-700m", "3b": "bitnet-3b", "8b": "llama3-8b-1.58"}


def peak_rss_mb() -> float:
    """This process's peak RSS from its start, in MB."""
    from ..engine.stats import peak_rss_mb as peaks

    return peaks()["self"]


def _child(code: str, *argv: str) -> dict:
    """Run ``code`` in a child Python (its memory never counts in this process's peak) and return
    the JSON object it prints last, with its own ``peak_rss_mb`` added."""
    import subprocess

    tail = ("\nimport json as _j\nfrom onebit.engine.stats import peak_rss_mb as _p\n"
            "print(_j.dumps({**(_out or {}), 'peak_rss_mb': _p()['self']}))")
    r = subprocess.run([sys.executable, "-c", "_out = None\n" + code + tail, *argv], check=True,
                       stdout=subprocess.PIPE, text=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def read_bandwidth_gb_s(nthreads: int, mib: int = 512, reps: int = 5) -> float:
    """Best-of-``reps`` read bandwidth over a buffer far larger than the last-level cache."""
    from .. import kernels

    buf = np.ones(mib << 20, dtype=np.uint8)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        kernels.read_probe(buf, nthreads)
        best = min(best, time.perf_counter() - t)
    return buf.size / best / 1e9


def prefill(rt, ids, pos: int, chunk: int = 512) -> None:
    """Feed token ids into rt's cache at positions pos.. in chunks of ``chunk`` (bounded scratch)."""
    for i in range(0, len(ids), chunk):
        rt.forward(ids[i:i + chunk], pos + i)


def _file_mapping(rt) -> np.ndarray | None:
    """The whole model file as one uint8 array: the read-only mapping its tensors are views of."""
    for t in rt._tensors.values():
        while isinstance(t.base, np.ndarray):
            t = t.base
        if t.base is not None:
            return np.frombuffer(t.base, dtype=np.uint8)
    return None


def l3_bytes() -> int | None:
    """Size of the largest cache level cpu0 reports (Linux sysfs), or None if unknown."""
    best = None
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            v = (d / "size").read_text().strip().upper()
            n = int(v.rstrip("KMG")) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(v[-1:], 1)
        except (OSError, ValueError):
            continue
        best = n if best is None else max(best, n)
    return best


def read_bandwidth_child(nthreads: int) -> dict:
    """``{"read_gb_s", "peak_rss_mb"}``: ``read_bandwidth_gb_s`` measured in a child process."""
    code = ("import sys\nfrom onebit.benchmarks.model import read_bandwidth_gb_s\n"
            "_out = {'read_gb_s': read_bandwidth_gb_s(int(sys.argv[1]))}")
    return _child(code, str(nthreads))


def fit_lengths(ctx: int, pp: list[int] | None, tg: int | None, depths: list[int]
                ) -> tuple[list[int], int]:
    """The prompt lengths and decode count to run in a ``ctx``-token context: given ones are
    checked (ValueError naming the option and the largest that fits), missing ones default to
    128 and 512 prompt tokens and 128 decoded, cut to what fits (a prompt needs one more position
    for its sampled token; decoding at depth d needs d + tg + 1)."""
    deepest = max(depths, default=0)
    if pp is None:
        pp = [n for n in (128, 512) if n + 1 <= ctx] or [max(1, (ctx - 1) // 2)]
    if tg is None:
        tg = max(1, min(128, ctx - 1 - deepest))
    for n in pp:
        if n + 1 > ctx:
            raise ValueError(f"--pp {n} needs {n + 1} positions but the model's context is {ctx}: "
                             f"use prompt lengths up to {ctx - 1}")
    if tg + 1 > ctx:
        raise ValueError(f"--tg {tg} needs {tg + 1} positions but the model's context is {ctx}: use "
                         f"--tg {ctx - 1} or less")
    if deepest + tg + 1 > ctx:
        raise ValueError(f"--depth {deepest} with --tg {tg} needs {deepest + tg + 1} positions but "
                         f"the model's context is {ctx}: use --depth {max(ctx - 1 - tg, 0)} or less "
                         f"(or a smaller --tg)")
    return pp, tg


def bench_model(folder: Path, pp: list[int] | None, tg: int | None, reps: int, threads: int,
                sparse: bool | None = None, activation_scheme: str | None = None,
                depths: list[int] | None = None, kv_bits: int | None = None) -> dict:
    import onebit

    from .. import kernels
    from ..engine.stats import kv_cache_bytes, model_sizes

    kernels.set_num_threads(threads)
    t0 = time.perf_counter()
    # token ids only: no tokenizer (Llama 3's tokenizer.json alone peaks at ~190 MB of RSS)
    m = onebit.load(folder, sparse=sparse, activation_scheme=activation_scheme, kv_bits=kv_bits,
                    tokenizer=False)
    load_s = time.perf_counter() - t0
    rt, cfg = m.runtime, m.config
    depths = sorted(set(depths or []))
    pp, tg = fit_lengths(cfg.max_position_embeddings, pp, tg, depths)
    need = max(max(pp), tg, max(depths, default=0) + tg) + 1
    rt.reset(need)
    rng = np.random.default_rng(0)
    res: dict = {"model": str(folder), "threads": threads, "isa": kernels.isa(),
                 "kernel_plan": kernels.plan(),  # per shape class, measured (kernels.wisdom)
                 "layout": rt.packed["layout"], "embedding": rt.packed["embedding"],
                 "params": model_sizes(rt)["params"], "load_s": load_s,
                 "activation_scheme": rt.activation_scheme, "sparse": rt.sparse,
                 "sparse_copy_mb": rt.sparse_bytes / 1e6}
    rt.forward([cfg.bos_token_id], 0)  # warm-up: page in the weights, start the pool
    pp_res = {}
    ttft = None
    for n in pp:
        ids = rng.integers(0, cfg.vocab_size, n)
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            logits = rt.forward(ids, 0)
            tok = int(np.argmax(logits))
            dt = time.perf_counter() - t
            best = min(best, dt)
        pp_res[n] = n / best
        if ttft is None:
            ttft = best
        del tok
    mapping = _file_mapping(rt)
    in_process = mapping is not None and mapping.nbytes >= 2 * (l3_bytes() or 32 << 20)
    probes: list[float] = []

    def decode_from(pos: int, probe: bool = False) -> float:  # best tok/s of tg greedy steps at pos...
        best = float("inf")
        for _ in range(max(reps, 3) if probe else reps):
            if probe:  # the read bandwidth, interleaved with the decode rounds it is compared to
                t = time.perf_counter()
                kernels.read_probe(mapping, threads)
                probes.append(mapping.nbytes / (time.perf_counter() - t) / 1e9)
            tok = cfg.bos_token_id
            t = time.perf_counter()
            for i in range(pos, pos + tg):
                tok = int(np.argmax(rt.forward([tok], i)))
            best = min(best, time.perf_counter() - t)
        return tg / best

    tg_tok_s = decode_from(0, probe=in_process)
    tg_depth, filled = {}, 0
    for d in depths:  # fill the cache up to d, then decode from d
        prefill(rt, rng.integers(0, cfg.vocab_size, d - filled), filled)
        tg_depth[str(d)] = tg_tok_s if d == 0 else decode_from(d)
        filled = d  # decoding overwrote positions d.. with its own rows
    sizes = model_sizes(rt)
    kv_bytes = kv_cache_bytes(cfg, rt.kv_bits, tg // 2)  # the mean cache read of a decode step
    if in_process:  # the model's own pages (resident now): no buffer of its own in this process
        read, probe = max(probes), {"peak_rss_mb": 0.0}
    else:  # a model about the L3's size: its pages would time the cache; a child reads 512 MiB
        probe = read_bandwidth_child(threads)  # (a child: that buffer is not the model's memory)
        read = probe["read_gb_s"]
    rss = peak_rss_mb()  # this process's real peak, from its start
    per_tok = sizes["weight_bytes_per_token"]
    res.update({
        "pp_tok_s": pp_res[pp[0]], "pp": {str(k): v for k, v in pp_res.items()},
        "tg_tok_s": tg_tok_s, "tg": tg, "ttft_s": ttft, "peak_rss_mb": rss,
        "probe_peak_rss_mb": probe["peak_rss_mb"],
        "read_probe": "model file pages, in this process, interleaved with the decode rounds"
        if in_process else "512 MiB buffer in a child process",
        "bytes_per_token": per_tok, "kv_bytes_per_token_avg": kv_bytes,
        "read_gb_s": read, "bw_frac": per_tok * tg_tok_s / (read * 1e9),
        # the same with the KV cache a step reads too (its mean over the tg steps from 0)
        "bw_frac_kv": (per_tok + kv_bytes) * tg_tok_s / (read * 1e9),
        "packed_mb": sizes["packed_bytes"] / 1e6, "head_mb": sizes["head_bytes"] / 1e6,
        "fp16_mb": sizes["fp16_bytes"] / 1e6,
        "kv_bits": rt.kv_bits, "kv_alloc_bytes": rt.cache_bytes,
        "kv_context": need,
        "kv_bytes": {str(n): kv_cache_bytes(cfg, rt.kv_bits, n)
                     for n in sorted({need, 4096, 16384, *depths})},
        "tg_depth": tg_depth,
    })
    if 512 in pp_res:
        res["pp512_tok_s"] = pp_res[512]
    return res


def model_for_shape(shape: str, layout: str, embedding: str, cache: Path,
                    info: dict | None = None) -> Path:
    """The random model's folder, written once by a child process (so that its ~GB of
    temporary arrays never count in this process's peak RSS; that child's peak goes into
    ``info["writer_peak_rss_mb"]`` when it runs)."""
    folder = cache / f"{shape}-{layout}-{embedding}"
    if not (folder / "model.safetensors").is_file():
        print(f"writing a random {shape} model to {folder} (once)...", file=sys.stderr)
        code = ("import sys; from onebit.engine.synth import write_random_model; "
                "write_random_model(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4])")
        r = _child(code, str(folder), SHAPES[shape], layout, embedding)
        if info is not None:
            info["writer_peak_rss_mb"] = r["peak_rss_mb"]
    return folder


def main(argv: list[str] | None = None) -> int:
    from .. import kernels
    from ..kernels.wisdom import plan_text

    ap = argparse.ArgumentParser(prog="onebit bench model", description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="packed model folder (default: the built-in model)")
    src.add_argument("--shape", choices=sorted(SHAPES), default=None,
                     help="benchmark a random-ternary model of this shape instead")
    ap.add_argument("--layout", default="i2", choices=["i2", "t1_6"], help="with --shape")
    ap.add_argument("--embedding", default="i8", choices=["f32", "f16", "i8", "i4"], help="with --shape")
    ap.add_argument("--pp", default=None, help="prompt lengths, comma-separated (default: 128,512, "
                                               "those that fit the model's context)")
    ap.add_argument("--tg", type=int, default=None, help="tokens to decode (default: 128, or what "
                                                         "fits the context)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="default: physical cores")
    ap.add_argument("--cache-dir", default=os.path.join(".cache", "onebit", "bench-models"))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--sparse", choices=["auto", "on", "off"], default="auto",
                    help="sparse decoding (skip weight reads of zero activations); auto: up_proj "
                         "row skipping for ReLU² models, column-sparse o/down (extra RAM) only for "
                         "a4.8 activations; on: everything (i2 weights only)")
    ap.add_argument("--activation-scheme", choices=["a8", "a4.8"], default=None,
                    help="run these activations instead of the model's own (warns: quality cost)")
    ap.add_argument("--depth", default="",
                    help="also decode --tg tokens after this many cached positions, comma-separated "
                         "(llama-bench -d), e.g. --depth 1024,4000")
    ap.add_argument("--kv-bits", type=int, choices=[32, 16, 8, 4, 3], default=None,
                    help="KV cache storage, bits per value (32 float32, 16 float16, 8/4/3 "
                         "quantized) instead of the model's")
    args = ap.parse_args(argv)
    pp = None
    if args.pp is not None:
        try:
            pp = [int(v) for v in args.pp.split(",") if v.strip()]
        except ValueError:
            pp = []
        if not pp or min(pp) < 1:
            ap.error(f"--pp {args.pp!r}: give positive prompt lengths, e.g. --pp 128,512")
    if (args.tg is not None and args.tg < 1) or args.reps < 1:
        ap.error("--tg and --reps must be >= 1")
    try:
        depths = [int(v) for v in args.depth.split(",") if v.strip()]
    except ValueError:
        depths = [-1]
    if depths and min(depths) < 0:
        ap.error(f"--depth {args.depth!r}: give cached-position counts >= 0, e.g. --depth 1024,4000")
    threads = args.threads or kernels.get_num_threads()
    children: dict = {}
    if args.shape:
        folder = model_for_shape(args.shape, args.layout, args.embedding, Path(args.cache_dir),
                                 children)
    else:
        from ..engine import default_model_path

        folder = Path(args.model) if args.model else default_model_path()
        if args.model:  # one line for what the engine cannot run (resolve.py)
            from ..resolve import require_engine
            require_engine(folder, "bench model")
    sparse = {"auto": None, "on": True, "off": False}[args.sparse]
    r = bench_model(folder, pp, args.tg, args.reps, threads, sparse, args.activation_scheme,
                    depths, args.kv_bits)
    r.update(children)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"model {r['model']} ({r['params'] / 1e6:.1f}M params, {r['layout']} weights, "
          f"{r['embedding']} embeddings/head, {r['activation_scheme']} activations, sparse decoding "
          f"{'on' if r['sparse'] else 'off'}) | kernels {plan_text(r['kernel_plan'])}, {threads} threads")
    for n, v in r["pp"].items():
        print(f"  pp{n:<5} {v:10.1f} tok/s")
    print(f"  tg{r['tg']:<5} {r['tg_tok_s']:10.1f} tok/s   ttft {r['ttft_s'] * 1000:.1f} ms")
    for d, v in r["tg_depth"].items():
        print(f"  tg{r['tg']} @ d{d:<6} {v:10.1f} tok/s")
    print(f"  reads {r['bytes_per_token'] / 1e6:.1f} MB/token (packed weights {r['packed_mb']:.1f}, "
          f"head stored as {r['head_mb']:.1f}) = {r['bw_frac'] * 100:.0f}% of the measured "
          f"{r['read_gb_s']:.1f} GB/s ({r['bw_frac_kv'] * 100:.0f}% with the KV cache it reads)"
          f" (read probe: {r['read_probe']})"
          f" | peak RSS {r['peak_rss_mb']:.0f} MB (fp16 weights alone: {r['fp16_mb']:.0f} MB; child "
          f"processes: bandwidth probe {r['probe_peak_rss_mb']:.0f} MB"
          + (f", random model writer {r['writer_peak_rss_mb']:.0f} MB" if "writer_peak_rss_mb" in r
             else "") + ")")
    kv = r["kv_bytes"]
    store = {32: "float32", 16: "float16"}.get(r["kv_bits"], f"{r['kv_bits']}-bit")
    print(f"  KV cache ({store}, kv_bits={r['kv_bits']}): {r['kv_alloc_bytes'] / 2**20:.2f} MiB "
          f"allocated for {r['kv_context']} positions; "
          + ", ".join(f"{int(n) // 1024}k: {b / 2**20:.1f} MiB" if int(n) >= 1024 and int(n) % 1024 == 0
                      else f"{n}: {b / 2**20:.2f} MiB" for n, b in kv.items()))
    return 0
