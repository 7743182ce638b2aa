"""`onebit bench serve`: the HTTP server under concurrent load, against llama.cpp's llama-server.

For each shape (random ternary weights, as `onebit bench model --shape` builds them) and each
number of concurrent streams N (default 1, 2, 4, 8, 16): N clients send a streaming
/v1/completions request at once (``--prompt`` random token ids, ``--tg`` tokens, greedy,
``ignore_eos``), ``--rounds`` times. Reported per server and N:

- aggregate decode tok/s: the tokens that arrive while every stream is decoding (from the last
  stream's first token to the first stream's last token), per second of that window;
- TTFT p50 / p95: request sent -> first token, over all N x rounds requests;
- server overhead (N = 1): 1 - (HTTP decode tok/s) / (the same engine's decode tok/s in process).

The same weights run in `onebit serve --parallel 16` and in `llama-server -np N` (GGUF TQ2_0 with
F16 embeddings exported from the packed folder; one server per N, since -np is fixed at start),
each alone on the machine in turn, with the same thread count. llama-server is built once from the
llama.cpp source vendored in PyPI's llama-cpp-python sdist (``--llama-server auto``; cmake and a C++
compiler needed, ~15 min on 2 cores) into ``--cache-dir``; ``--llama-server none`` skips it.
``--json`` prints the rows; bench/results_serve.py writes the table and plot of docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np

LLAMA_CPP_PYTHON = "0.3.36"   # the sdist whose vendored llama.cpp builds llama-server
SHAPE_TOKENIZERS = {"2b4t": "llama3", "700m": "llama2"}  # llama-server needs a vocabulary


# -- models ---------------------------------------------------------------------------------------
def serve_model(shape: str, cache: Path, shared_tokenizers: Path | None) -> Path:
    """The random packed model of ``shape`` (i2, int8 embeddings/head) with a tokenizer.json of
    its vocabulary size when one is at hand (the 700M preset's 32002 becomes llama2's 32000)."""
    from ..config import ModelConfig
    from .model import SHAPES

    folder = cache / f"{shape}-serve-i2-i8"
    tok = shared_tokenizers / SHAPE_TOKENIZERS[shape] / "tokenizer.json" if shared_tokenizers else None
    if not (folder / "model.safetensors").is_file():
        over = {"vocab_size": 32000} if shape == "700m" else {}
        cfg = ModelConfig.preset(SHAPES[shape], **over)
        print(f"writing a random {shape} model to {folder} (once)...", file=sys.stderr)
        code = ("import sys, json; from onebit.config import ModelConfig; "
                "from onebit.engine.synth import write_random_model; "
                "write_random_model(sys.argv[1], ModelConfig.from_dict(json.loads(sys.argv[2])), 'i2', 'i8')")
        subprocess.run([sys.executable, "-c", code, str(folder), json.dumps(cfg.to_dict())], check=True)
    if tok is not None and tok.is_file() and not (folder / "tokenizer.json").is_file():
        shutil.copy(tok, folder / "tokenizer.json")
    return folder


def gguf_for(folder: Path) -> Path:
    from ..formats.gguf_export import export_gguf

    out = folder.parent / f"{folder.name}-tq2_0-f16.gguf"
    if not out.is_file():
        export_gguf(folder, out, "tq2_0", embedding="f16", allow_relu2=True)
    return out


def build_llama_server(cache: Path) -> Path:
    """llama-server built from the llama.cpp vendored in llama-cpp-python's sdist (PyPI), once."""
    exe = cache / "llama-server-build" / "bin" / "llama-server"
    if exe.is_file():
        return exe
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise ValueError(f"building llama-server needs {tool}; install it or pass --llama-server none")
    src = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    if not src.is_dir():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(cache), "-q"], check=True)
        with tarfile.open(cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz") as tf:
            tf.extractall(cache, filter="data")
    build = cache / "llama-server-build"
    print(f"building llama-server into {build} (once; ~15 min on 2 cores)...", file=sys.stderr)
    subprocess.run(["cmake", "-S", str(src / "vendor" / "llama.cpp"), "-B", str(build),
                    "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON",
                    "-DCMAKE_RUNTIME_OUTPUT_DIRECTORY=" + str(build / "bin")], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j",
                    str(os.cpu_count() or 2)], check=True, stdout=subprocess.DEVNULL)
    return exe


# -- servers --------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess on a free loopback port, healthy on entry, stopped on exit."""

    def __init__(self, argv: list[str], env: dict | None = None, port: int | None = None):
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [a.replace("{port}", str(self.port)) for a in argv]
        self.env = env

    def __enter__(self) -> "Server":
        import httpx

        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.argv[0]} did not become healthy")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _stream_one(url: str, prompt: list[int], tg: int, out: dict, go: threading.Event) -> None:
    import httpx

    body = {"prompt": prompt, "max_tokens": tg, "temperature": 0, "stream": True, "ignore_eos": True,
            "cache_prompt": False}
    times = []
    go.wait()
    t0 = time.perf_counter()
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            msg = json.loads(line[6:])
            for ch in msg.get("choices") or []:
                if ch.get("text"):
                    times.append(time.perf_counter())
    out.update(t0=t0, times=times)


def load_round(url: str, prompts: list[list[int]], tg: int) -> list[dict]:
    """One round: len(prompts) concurrent streaming requests; per request its send time and the
    arrival time of every token chunk."""
    outs = [dict() for _ in prompts]
    go = threading.Event()
    ts = [threading.Thread(target=_stream_one, args=(url, p, tg, o, go)) for p, o in zip(prompts, outs)]
    for t in ts:
        t.start()
    go.set()
    for t in ts:
        t.join()
    if any("times" not in o or len(o["times"]) < 2 for o in outs):
        raise RuntimeError(f"{url}: a stream ended without tokens")
    return outs


def summarize(rounds: list[list[dict]]) -> dict:
    agg, ttft = [], []
    for outs in rounds:
        start = max(o["times"][0] for o in outs)   # every stream is decoding from here...
        end = min(o["times"][-1] for o in outs)    # ...to here
        n = sum(sum(1 for t in o["times"] if start < t <= end) for o in outs)
        if end > start and n:
            agg.append(n / (end - start))
        ttft += [o["times"][0] - o["t0"] for o in outs]
    ttft.sort()
    return {"agg_tok_s": statistics.median(agg) if agg else float("nan"),
            "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p95_s": float(np.percentile(ttft, 95)),
            "requests": len(ttft)}


def engine_decode_tok_s(folder: Path, prompt: list[int], tg: int, threads: int) -> float:
    """The in-process engine's single-stream decode rate (first token -> last), the reference of
    the server overhead. Run in a child process with the same thread count as the servers."""
    code = f"""
import sys, time, json, onebit
from onebit import kernels
from onebit.engine import SamplingParams
kernels.set_num_threads({threads})
eng = onebit.load(sys.argv[1]).batch(slots=1, max_len={len(prompt) + tg + 8})
ids = json.loads(sys.argv[2])
eng.generate([ids], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm
best = 0
for _ in range(2):
    times = []
    eng.submit(ids, SamplingParams(max_tokens={tg}, temperature=0, ignore_eos=True), sink=lambda e: times.append(time.perf_counter()))
    while eng.step():
        pass
    best = max(best, (len(times) - 2) / (times[-2] - times[0]))
print(best)
"""
    out = subprocess.run([sys.executable, "-c", code, str(folder), json.dumps(prompt)], check=True,
                         capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def bench_serve(shapes: list[str], streams: list[int], prompt_len: int, tg: int, rounds: int,
                threads: int, cache: Path, llama_server: str, tokenizers: Path | None) -> list[dict]:
    rows = []
    ctx = prompt_len + tg + 8
    exe = None
    if llama_server == "auto":
        exe = build_llama_server(cache)
    elif llama_server != "none":
        exe = Path(llama_server)
    for shape in shapes:
        folder = serve_model(shape, cache, tokenizers)
        rng = np.random.default_rng(0)
        V = json.loads((folder / "config.json").read_text())["model"]["vocab_size"]

        def prompts(n: int, r: int) -> list[list[int]]:
            return [[int(t) for t in rng.integers(100, V - 100, prompt_len)] for _ in range(n)]

        ref = engine_decode_tok_s(folder, prompts(1, 0)[0], tg, threads)
        env = {**os.environ, "ONEBIT_NUM_THREADS": str(threads)}
        ob = [sys.executable, "-m", "onebit", "serve", "--model", str(folder), "--port", "{port}",
              "--parallel", str(max(streams)), "--ctx", str(ctx), "--max-queue", "64", "--model-name", "bench"]
        with Server(ob, env=env) as s:
            load_round(s.url, prompts(2, 0), 4)                               # warm-up
            for n in streams:
                r = summarize([load_round(s.url, prompts(n, i), tg) for i in range(rounds)])
                rows.append({"shape": shape, "server": "onebit", "streams": n, **r})
                if n == 1:
                    rows[-1]["engine_tok_s"] = ref
                    rows[-1]["overhead"] = 1 - r["agg_tok_s"] / ref
                print(json.dumps(rows[-1]), file=sys.stderr)
        if exe is None:
            continue
        gguf = gguf_for(folder)
        for n in streams:
            argv = [str(exe), "-m", str(gguf), "--host", "127.0.0.1", "--port", "{port}", "-np", str(n),
                    "-c", str(ctx * n), "-t", str(threads), "-tb", str(threads), "--no-webui",
                    "-b", "2048", "-ub", "512"]
            with Server(argv) as s:
                load_round(s.url, prompts(1, 0), 4)
                r = summarize([load_round(s.url, prompts(n, i), tg) for i in range(rounds)])
            rows.append({"shape": shape, "server": "llama-server", "streams": n, **r})
            print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def targets(rows: list[dict]) -> dict:
    """The issue's targets from one run: 2B4T aggregate at 8 streams vs 1 and vs llama-server,
    TTFT p95 at 8 streams vs unloaded, server overhead."""
    def get(shape, server, n, key):
        return next((r[key] for r in rows if r["shape"] == shape and r["server"] == server
                     and r["streams"] == n), float("nan"))
    out = {}
    for shape in sorted({r["shape"] for r in rows}):
        out[shape] = {
            "agg8_over_agg1": get(shape, "onebit", 8, "agg_tok_s") / get(shape, "onebit", 1, "agg_tok_s"),
            "agg8_over_llama8": get(shape, "onebit", 8, "agg_tok_s") / get(shape, "llama-server", 8, "agg_tok_s"),
            "ttft95_8_over_ttft_1": get(shape, "onebit", 8, "ttft_p95_s") / get(shape, "onebit", 1, "ttft_p50_s"),
            "overhead": get(shape, "onebit", 1, "overhead"),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="onebit bench serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="700m,2b4t", help="comma-separated: 700m, 2b4t")
    ap.add_argument("--streams", default="1,2,4,8,16", help="concurrent streams, comma-separated")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per request")
    ap.add_argument("--tg", type=int, default=64, help="tokens generated per request")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of N concurrent requests")
    ap.add_argument("--threads", type=int, default=None, help="default: physical cores")
    ap.add_argument("--llama-server", default="auto",
                    help="'auto' (build it from the llama-cpp-python sdist), a path, or 'none'")
    ap.add_argument("--cache-dir", default=os.path.join(".cache", "onebit", "bench-models"))
    ap.add_argument("--tokenizers", default=None, help="folder with llama3/ and llama2/ tokenizer.json "
                                                       "(for llama-server's GGUF); default: ../shared/data/tokenizers")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from .. import kernels

    shapes = [s for s in args.shapes.split(",") if s]
    for s in shapes:
        if s not in SHAPE_TOKENIZERS:
            raise ValueError(f"--shapes: unknown shape {s!r}; use 700m and/or 2b4t")
    streams = sorted({int(x) for x in args.streams.split(",") if x})
    if not streams or streams[0] < 1:
        raise ValueError("--streams: give positive integers, e.g. 1,2,4,8,16")
    threads = args.threads or kernels.get_num_threads()
    tok = Path(args.tokenizers) if args.tokenizers else Path.cwd().parent / "shared" / "data" / "tokenizers"
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    rows = bench_serve(shapes, streams, args.prompt, args.tg, args.rounds, threads, cache.resolve(),
                       args.llama_server, tok if tok.is_dir() else None)
    if args.json:
        print(json.dumps({"rows": rows, "targets": targets(rows), "threads": threads,
                          "prompt": args.prompt, "tg": args.tg, "rounds": args.rounds}))
        return 0
    print(f"{'shape':6} {'server':13} {'N':>3} {'agg tok/s':>10} {'TTFT p50':>9} {'TTFT p95':>9}")
    for r in rows:
        print(f"{r['shape']:6} {r['server']:13} {r['streams']:>3} {r['agg_tok_s']:>10.1f} "
              f"{r['ttft_p50_s'] * 1e3:>7.0f}ms {r['ttft_p95_s'] * 1e3:>7.0f}ms")
    print(json.dumps(targets(rows), indent=1))
    return 0
