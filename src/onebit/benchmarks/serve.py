"""`onebit bench serve`: the HTTP server under concurrent load, against llama.cpp's llama-server.

For each shape (random ternary weights, as `onebit bench model --shape` builds them) and each
number of concurrent streams N (default 1, 2, 4, 8, 16), N closed-loop clients each send
``--rounds`` streaming /v1/completions requests one after another (``--prompt`` random token
ids, max_tokens drawn from [tg/2, 3tg/2], greedy, ``ignore_eos``). Reported per server and N:

- aggregate decode tok/s: the tokens that arrive while all N clients are active (from the last
  client's first token to the first client's last token), per second of that window;
- TTFT p50 / p95: request sent -> first token, over the requests after each client's first (they
  arrive among running streams; the first ones are a burst of N at once, reported as its max);
- per-stream decode tok/s (median over requests of (tokens - 1) / (last - first token));
- server overhead (N = 1): 1 - (best single-stream decode tok/s over HTTP, of max(3, rounds)
  requests) / (the same engine's best single-stream decode tok/s in process, no HTTP, measured
  just before and just after those requests: the mean of the two). The client runs on the same
  machine, so its share of the CPU counts as overhead too.

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
    its vocabulary size when one is at hand (the 700M preset's 32002 becomes llama2's 32000, and
    its LM head is tied to the embeddings, as llama.cpp's bitnet graph requires)."""
    from ..config import ModelConfig
    from .model import SHAPES

    folder = cache / f"{shape}-serve-tied-i2-i8"
    tok = shared_tokenizers / SHAPE_TOKENIZERS[shape] / "tokenizer.json" if shared_tokenizers else None
    if not (folder / "model.safetensors").is_file():
        # llama.cpp's bitnet graph has no separate LM head: the 700M shape ties it (both servers)
        over = {"vocab_size": 32000, "tie_word_embeddings": True} if shape == "700m" else {}
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


def sse_lines(r):
    """The lines of an SSE response, split at "\n" only: httpx's iter_lines() also splits at
    U+2028, U+0085 and the other str.splitlines() boundaries, which llama-server leaves unescaped
    inside its JSON strings (random weights emit such tokens)."""
    buf = b""
    for chunk in r.iter_bytes():
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode("utf-8", errors="replace")
    if buf:
        yield buf.rstrip(b"\r").decode("utf-8", errors="replace")


def _stream_one(url: str, prompt: list[int], tg: int) -> dict:
    import httpx

    body = {"prompt": prompt, "max_tokens": tg, "temperature": 0, "stream": True, "ignore_eos": True,
            "cache_prompt": False}
    times = []
    t0 = time.perf_counter()
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in sse_lines(r):
            if not line.startswith("data: {"):
                continue
            msg = json.loads(line[6:])
            for ch in msg.get("choices") or []:
                if ch.get("text"):
                    times.append(time.perf_counter())
    if len(times) < 2:
        raise RuntimeError(f"{url}: a stream ended with {len(times)} tokens")
    return {"t0": t0, "times": times}


def load_run(url: str, n: int, prompt, tg: int, rounds: int, seed: int = 0) -> list[list[dict]]:
    """``n`` closed-loop clients, each sending ``rounds`` streaming requests one after another
    (``prompt()`` ids each, max_tokens drawn from [tg/2, 3tg/2] so the clients drift apart as
    real ones do); per client and request its send time and every token's arrival time."""
    rng = np.random.default_rng(seed)
    plan = [[(prompt(), int(rng.integers(max(tg // 2, 2), tg * 3 // 2 + 1))) for _ in range(rounds)]
            for _ in range(n)]
    outs: list[list[dict]] = [[] for _ in range(n)]
    errors: list[str] = []
    go = threading.Event()

    def client(i: int) -> None:
        go.wait()
        try:
            for p, m in plan[i]:
                outs[i].append(_stream_one(url, p, m))
        except Exception as e:  # reported below
            errors.append(f"{type(e).__name__}: {e}")

    ts = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    go.set()
    for t in ts:
        t.join()
    if errors:
        raise RuntimeError(errors[0])
    return outs


def summarize(outs: list[list[dict]]) -> dict:
    """Aggregate decode tok/s while every client is active (from the last client's first token
    to the first client's last token), and TTFT over the requests after each client's first
    (the start is a burst of n arrivals at once; later ones arrive among running streams)."""
    start = max(c[0]["times"][0] for c in outs)
    end = min(c[-1]["times"][-1] for c in outs)
    n = sum(sum(1 for t in r["times"] if start < t <= end) for c in outs for r in c)
    steady = [r["times"][0] - r["t0"] for c in outs for r in c[1:]]
    burst = [c[0]["times"][0] - c[0]["t0"] for c in outs]
    ttft = sorted(steady or burst)
    per = [(len(r["times"]) - 1) / (r["times"][-1] - r["times"][0]) for c in outs for r in c]
    return {"agg_tok_s": n / (end - start) if end > start else float("nan"),
            "stream_tok_s": statistics.median(per), "stream_best_tok_s": max(per),
            "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p95_s": float(np.percentile(ttft, 95)),
            "ttft_burst_max_s": max(burst), "requests": sum(len(c) for c in outs)}


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
    ctx = prompt_len + tg * 3 // 2 + 8
    exe = None
    if llama_server == "auto":
        exe = build_llama_server(cache)
    elif llama_server != "none":
        exe = Path(llama_server)
    for shape in shapes:
        folder = serve_model(shape, cache, tokenizers)
        rng = np.random.default_rng(0)
        V = json.loads((folder / "config.json").read_text())["model"]["vocab_size"]

        def prompt() -> list[int]:
            return [int(t) for t in rng.integers(100, V - 100, prompt_len)]

        env = {**os.environ, "ONEBIT_NUM_THREADS": str(threads)}
        ob = [sys.executable, "-m", "onebit", "serve", "--model", str(folder), "--port", "{port}",
              "--parallel", str(max(streams)), "--ctx", str(ctx), "--max-queue", "64", "--model-name", "bench"]
        with Server(ob, env=env) as s:
            load_run(s.url, 2, prompt, 4, 1)                                  # warm-up
            for n in streams:
                # the server overhead: the best single-stream request against the best in-process
                # run, measured just before and just after it (the machine's speed drifts)
                refs = [engine_decode_tok_s(folder, prompt(), tg, threads)] if n == 1 else []
                r = summarize(load_run(s.url, n, prompt, tg, max(rounds, 3) if n == 1 else rounds))
                rows.append({"shape": shape, "server": "onebit", "streams": n, **r})
                if n == 1:
                    refs.append(engine_decode_tok_s(folder, prompt(), tg, threads))
                    ref = statistics.mean(refs)
                    rows[-1]["engine_tok_s"] = ref
                    rows[-1]["overhead"] = 1 - r["stream_best_tok_s"] / ref
                print(json.dumps(rows[-1]), file=sys.stderr)
        if exe is None:
            continue
        gguf = gguf_for(folder)
        for n in streams:
            argv = [str(exe), "-m", str(gguf), "--host", "127.0.0.1", "--port", "{port}", "-np", str(n),
                    "-c", str(ctx * n), "-t", str(threads), "-tb", str(threads), "--no-webui",
                    "-b", "2048", "-ub", "512"]
            with Server(argv) as s:
                load_run(s.url, 1, prompt, 4, 1)
                r = summarize(load_run(s.url, n, prompt, tg, rounds))
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
            # against the single stream's decode rate (its aggregate also counts the gaps between
            # its requests, which would flatter the ratio)
            "agg8_over_stream1": get(shape, "onebit", 8, "agg_tok_s") / get(shape, "onebit", 1, "stream_tok_s"),
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
    ap.add_argument("--rounds", type=int, default=4, help="requests each of the N clients sends in turn")
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
    print(f"{'shape':6} {'server':13} {'N':>3} {'agg tok/s':>10} {'TTFT p50':>9} {'TTFT p95':>9} {'burst max':>9}")
    for r in rows:
        print(f"{r['shape']:6} {r['server']:13} {r['streams']:>3} {r['agg_tok_s']:>10.1f} "
              f"{r['ttft_p50_s'] * 1e3:>7.0f}ms {r['ttft_p95_s'] * 1e3:>7.0f}ms {r['ttft_burst_max_s'] * 1e3:>7.0f}ms")
    print(json.dumps(targets(rows), indent=1))
    return 0
