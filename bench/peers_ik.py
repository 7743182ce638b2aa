"""onebit vs ik_llama.cpp (IQ2_BN, the fastest BitNet CPU engine we know of) on the same random
ternary weights, same head bits, interleaved rounds: pp128, pp512, tg128 at 1 and 2 threads, and
each process's peak RSS.

ik_llama.cpp is built outside this repository (never committed here):

    git clone https://github.com/ikawrakow/ik_llama.cpp /work/peers/ik_llama.cpp   # or the fetch tool
    cd /work/peers/ik_llama.cpp && cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \\
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF
    cmake --build build -j2 --target llama-bench llama-quantize

    .venv/bin/python bench/peers_ik.py --ik /work/peers/ik_llama.cpp/build/bin [--shape 2b4t]
        [--heads i8,f16] [--threads 1,2] [--rounds 3] [--write-doc]

The weights: `onebit bench model --shape`'s random model, exported to GGUF I2_S with onebit's
exporter (bitnet.cpp's type and its ``bitnet-b1.58`` graph: ReLU², SubLN, as 2B4T; ik_llama.cpp
reads I2_S but has no TQ2_0 -- ggml type 35 is undefined there and its loader dies with SIGFPE),
then ``llama-quantize --allow-requantize`` to IQ2_BN (ternary values and per-tensor scales survive
exactly), token embedding/output Q8_0 against onebit's int8 head, F16 against float16. Each round
runs, per thread count, `llama-bench -p 128,512 -n 128 -r 1` and `onebit bench model --pp 128,512
--tg 128 --reps 1` one after the other (alternating which goes first), each in its own process
whose peak RSS comes from /usr/bin/time -f %M (a small parent: Linux carries the parent's RSS at
the fork into the child's ru_maxrss). Prints medians and the per-round ratio ranges.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from docsection import replace_section

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "onebit" / "bench-models"


def measured(cmd: list[str], env: dict | None = None) -> tuple[str, float]:
    """stdout and peak RSS (MB) of ``cmd``, by /usr/bin/time (%M): a small C parent, so the
    child's ru_maxrss starts from its few MB (Linux carries a process's peak RSS across fork +
    exec: launched from this Python after it exported a 2.5 GB model, every child "peaked" at
    2.5 GB)."""
    import tempfile

    with tempfile.TemporaryFile(mode="w+") as out, tempfile.NamedTemporaryFile(mode="r") as rss:
        p = subprocess.run(["/usr/bin/time", "-o", rss.name, "-f", "%M", *cmd], stdout=out,
                           stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        if p.returncode:
            raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stderr[-3000:]}")
        out.seek(0)
        return out.read(), int(rss.read().strip().splitlines()[-1]) / 1024


def ik_gguf(ik: Path, folder: Path, head: str) -> Path:
    """IQ2_BN GGUF of the packed model ``folder``, head Q8_0 (i8) or F16 (f16); built once."""
    from onebit.formats.gguf_export import export_gguf

    out = CACHE / f"{folder.name}-iq2_bn-{head}.gguf"
    if out.is_file():
        return out
    src = CACHE / f"{folder.name}-i2_s-f16.gguf"
    if not src.is_file():
        if not (folder / "tokenizer.json").is_file():
            tok = ROOT.parent / "shared" / "data" / "tokenizers" / "llama3" / "tokenizer.json"
            shutil.copy(tok, folder / "tokenizer.json")
        export_gguf(folder, src, "i2_s", embedding="f16")
    ht = {"i8": "q8_0", "f16": "f16"}[head]
    subprocess.run([str(ik / "llama-quantize"), "--allow-requantize", "--token-embedding-type", ht,
                    "--output-tensor-type", ht, str(src), str(out), "IQ2_BN"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    return out


def ik_run(ik: Path, gguf: Path, threads: int, extra: list[str]) -> dict:
    out, rss = measured([str(ik / "llama-bench"), "-m", str(gguf), "-p", "128,512", "-n", "128",
                         "-t", str(threads), "-r", "1", "-o", "json", *extra])
    res = {"peak_rss_mb": rss}
    for row in json.loads(out):
        key = f"pp{row['n_prompt']}" if row["n_prompt"] else f"tg{row['n_gen']}"
        res[key] = row["avg_ts"]
    return res


def onebit_run(folder: Path, threads: int) -> dict:
    out, rss = measured([sys.executable, "-m", "onebit", "bench", "model", "--json", "--model", str(folder),
                         "--pp", "128,512", "--tg", "128", "--reps", "1", "--threads", str(threads)])
    r = json.loads(out.strip().splitlines()[-1])
    return {"pp128": r["pp"]["128"], "pp512": r["pp"]["512"], "tg128": r["tg_tok_s"],
            "peak_rss_mb": rss, "plan": r["kernel_plan"], "bw_frac": r["bw_frac"],
            "read_gb_s": r["read_gb_s"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ik", required=True, help="folder with ik_llama.cpp's llama-bench and llama-quantize")
    ap.add_argument("--shape", default="2b4t")
    ap.add_argument("--heads", default="i8,f16")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ik-args", default="", help="extra llama-bench arguments, e.g. '-rtr 1'")
    ap.add_argument("--json", default=None, help="also write the raw rounds here")
    ap.add_argument("--from", dest="src", default=None, help="rebuild the table from --json output")
    ap.add_argument("--write-doc", action="store_true")
    a = ap.parse_args(argv)
    from onebit.benchmarks.model import model_for_shape

    ik = Path(a.ik)
    rows = json.loads(Path(a.src).read_text()) if a.src else []
    for head in [] if a.src else a.heads.split(","):
        folder = model_for_shape(a.shape, "i2", head, CACHE)
        gguf = ik_gguf(ik, folder, head)
        for t in [int(v) for v in a.threads.split(",")]:
            rounds = []
            for r in range(a.rounds):
                load = os.getloadavg()[0]
                if r % 2 == 0:
                    o, k = onebit_run(folder, t), ik_run(ik, gguf, t, a.ik_args.split())
                else:
                    k, o = ik_run(ik, gguf, t, a.ik_args.split()), onebit_run(folder, t)
                rounds.append({"onebit": o, "ik": k, "load": load})
                print(json.dumps({"head": head, "threads": t, "round": r, **rounds[-1]}), file=sys.stderr)
            rows.append({"head": head, "threads": t, "rounds": rounds,
                         "gguf_mb": gguf.stat().st_size / 1e6,
                         "file_mb": (folder / "model.safetensors").stat().st_size / 1e6})
    if a.json and not a.src:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    lines = [f"Reproduce: build ik_llama.cpp as in `bench/peers_ik.py`'s docstring, then `.venv/bin/python "
             f"bench/peers_ik.py --ik /work/peers/ik_llama.cpp/build/bin --rounds {a.rounds}`. "
             f"{a.shape} shape, random ternary weights (the same codes for both), {a.rounds} interleaved "
             f"rounds per row (median, and the range over rounds of onebit / ik_llama.cpp in the same "
             f"round), peak RSS per process (/usr/bin/time %M).", "",
             "| head | threads | engine | pp128 | pp512 | tg128 | peak RSS | onebit / ik (per-round range) | load |",
             "|---|---:|---|---:|---:|---:|---:|---|---|"]
    for row in rows:
        rs = row["rounds"]
        med = {e: {k: statistics.median(r[e][k] for r in rs) for k in ("pp128", "pp512", "tg128", "peak_rss_mb")}
               for e in ("onebit", "ik")}
        ratio = {k: [r["onebit"][k] / r["ik"][k] for r in rs] for k in ("pp128", "pp512", "tg128")}
        loads = [r["load"] for r in rs]
        plan = rs[0]["onebit"]["plan"]
        rng = ", ".join(f"{k} {min(v):.2f}-{max(v):.2f}x" for k, v in ratio.items())
        hb = {"i8": ("int8", "Q8_0"), "f16": ("float16", "F16")}[row["head"]]
        for e, name in (("onebit", f"onebit ({plan['gemm128']}; GEMV {plan['gemv']}), {hb[0]} head"),
                        ("ik", f"ik_llama.cpp IQ2_BN, {hb[1]} head")):
            m = med[e]
            lines.append(f"| {row['head']} | {row['threads']} | {name} | {m['pp128']:.1f} | {m['pp512']:.1f} | "
                         f"{m['tg128']:.1f} | {m['peak_rss_mb']:,.0f} MB | "
                         f"{rng if e == 'onebit' else ''} | {min(loads):.1f}-{max(loads):.1f} |")
    text = "\n".join(lines)
    print(text)
    if a.write_doc:
        replace_section("results_peers_ik", text, "## Peers: ik_llama.cpp IQ2_BN on the same weights")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
