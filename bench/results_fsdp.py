"""Regenerate the "training past one device" memory section of docs/results.md.

    .venv/bin/python bench/results_fsdp.py             # 8 runs (~13 min on 2 busy cores), then the report
    .venv/bin/python bench/results_fsdp.py --report    # only rebuild the section from docs/results_fsdp.json

Per rank, for one BitNet b1.58 model (hidden 1024, 12 layers, vocab 32000; 187 M parameters), under
one process (no wrapper), ddp on 2 ranks, fsdp on 1 and on 2 ranks (torchrun, gloo, CPU): the
bytes the rank holds for parameters, gradients and AdamW moments (its local shards, counted from the
tensors), and its peak RSS (``ru_maxrss``) after building the model and 2 optimizer steps, the
way ``onebit train`` runs them (``onebit.parallel.shard_model``, AdamW foreach, grad clipping).
RSS is memory, not time: it is measured as is on the shared machine. Then the per-device
projection for 2B (bitnet-2b4t) and 8B (Llama-3-8B shape) models on 8 x 80 GB GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
RESULTS = ROOT / "docs" / "results_fsdp.json"
SHAPE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
             num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=256,
             hidden_act="relu2", norm_placement="subln", tie_word_embeddings=True)
GLOBAL_BATCH, SEQ, STEPS = 2, 64, 2
RUNS = [("single", 1), ("ddp", 2), ("fsdp", 1), ("fsdp", 2)]
# glibc keeps freed tensors in its heap once its dynamic mmap threshold has grown (RSS then counts
# memory no tensor uses); a fixed threshold returns every freed tensor >= 64 KiB to the system, so
# the peak RSS is the peak of live memory. Both are measured.
MALLOCS = {"default": {}, "mmap64k": {"MALLOC_MMAP_THRESHOLD_": "65536"}}
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                 hidden_act="silu", norm_placement="subln", tie_word_embeddings=False, rope_theta=500000.0)


def _peak_rss() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def worker(parallel: str, out: Path) -> None:
    import torch
    import torch.distributed as dist

    from onebit import parallel as par
    from onebit.config import ModelConfig
    from onebit.model import CausalLM
    from onebit.train import param_groups

    torch.set_num_threads(1)
    floor = _peak_rss()
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if parallel != "single":
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(**SHAPE))
    n_params = model.num_params()
    net = model
    if parallel == "ddp":
        net = torch.nn.parallel.DistributedDataParallel(model)
    elif parallel == "fsdp":
        par.shard_model(model, par.device_mesh(torch.device("cpu"), world))
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95), foreach=True)
    init_peak = _peak_rss()
    x = torch.randint(0, SHAPE["vocab_size"], (GLOBAL_BATCH // world, SEQ),
                      generator=torch.Generator().manual_seed(1))
    held = {}
    for _ in range(STEPS):
        _, loss = net(x, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        held = par.local_bytes(model, opt)  # gradients still there
        opt.zero_grad(set_to_none=True)
    rec = {"parallel": parallel, "world": world, "rank": rank, "params": n_params, "held": held,
           "peak_rss": _peak_rss(), "init_peak_rss": init_peak, "floor_rss": floor, "loss": loss.item(),
           "malloc": os.environ.get("MALLOC_MMAP_THRESHOLD_", "default")}
    (out / f"{parallel}{world}_rank{rank}.json").write_text(json.dumps(rec))
    if parallel != "single":
        dist.destroy_process_group()


def run_all() -> list[dict]:
    import tempfile

    rows = []
    for malloc, extra_env in MALLOCS.items():
        for parallel, world in RUNS:
            with tempfile.TemporaryDirectory() as tmp:
                me = [str(Path(__file__).resolve()), "--worker", parallel, "--out", tmp]
                cmd = [sys.executable, *me] if parallel == "single" else [
                    sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", *me]
                print(malloc, " ".join(cmd), flush=True)
                subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **extra_env})
                rows += [{**json.loads((Path(tmp) / f"{parallel}{world}_rank{r}.json").read_text()),
                          "malloc": malloc} for r in range(world)]
    return rows


def projection() -> list[dict]:
    """Exact parameter counts (built on the meta device) and the bytes each device holds."""
    import torch

    from onebit.config import PRESETS, ModelConfig
    from onebit.model import CausalLM

    out = []
    for name, shape in (("2B (bitnet-2b4t)", PRESETS["bitnet-2b4t"]), ("8B (Llama-3-8B shape)", LLAMA3_8B)):
        cfg = ModelConfig(**{**shape, "linear": "bitnet", "norm_placement": "subln"})
        with torch.device("meta"):
            m = CausalLM(cfg)
        n = m.num_params()
        block = sum(p.numel() for p in m.model.layers[0].parameters())
        root = n - block * cfg.num_hidden_layers
        out.append({"name": name, "params": n, "block": block, "root": root})
    return out


def gb(b: float) -> str:
    return f"{b / 1e9:.2f}"


def report(rows: list[dict], proj: list[dict]) -> str:
    from docsection import replace_section

    n = rows[0]["params"]
    lines = [
        "Regenerate: `.venv/bin/python bench/results_fsdp.py` (8 runs, ~13 min here; `--report` rebuilds this "
        "section from `docs/results_fsdp.json`).",
        "",
        f"Model: BitNet b1.58, hidden {SHAPE['hidden_size']}, {SHAPE['num_hidden_layers']} layers, FFN "
        f"{SHAPE['intermediate_size']} (ReLU²), vocab {SHAPE['vocab_size']} (tied), SubLN: {n:,} parameters, "
        f"fp32 master weights, AdamW (foreach) as `onebit train` runs it; {STEPS} optimizer steps of "
        f"{GLOBAL_BATCH}x{SEQ} tokens (global), 1 thread per rank, gloo, CPU. *held* = the rank's own "
        f"parameters + gradients + both Adam moments (+ step), counted from its tensors (local shards under "
        f"fsdp) at the end of a step; *peak RSS* = the rank's `ru_maxrss` (model build, sharding and the "
        f"steps); *torch floor* = its RSS after `import torch`. Machine: the project machine (2 cores AMD "
        f"EPYC, 23 GB RAM, shared with other work; RSS is not a timing).",
        "",
        "| layout | ranks | held per rank (GB) | bytes / parameter held | peak RSS per rank (GB) | "
        "peak RSS, MALLOC_MMAP_THRESHOLD_=65536 (GB) | the same, after model build + sharding (GB) |",
        "|---|---|---|---|---|---|---|",
    ]

    def pick(parallel, world, malloc):
        return [r for r in rows if r["parallel"] == parallel and r["world"] == world and r["malloc"] == malloc]

    held_of = {}
    for parallel, world in RUNS:
        rs, ms = pick(parallel, world, "default"), pick(parallel, world, "mmap64k")
        held = max(sum(r["held"].values()) for r in rs + ms)
        held_of[parallel, world] = held
        label = {"single": "one process (no wrapper)", "ddp": "ddp", "fsdp": "fsdp (FSDP2)"}[parallel]
        lines.append(f"| {label} | {world} | {gb(held)} | {held / n:.2f} | {gb(max(r['peak_rss'] for r in rs))} | "
                     f"{gb(max(r['peak_rss'] for r in ms))} | {gb(max(r['init_peak_rss'] for r in ms))} |")
    floor = max(r["floor_rss"] for r in rows)
    peak = {k: max(r["peak_rss"] for r in pick(*k, "mmap64k")) for k in RUNS}
    peak_default = {k: max(r["peak_rss"] for r in pick(*k, "default")) for k in RUNS}
    lines += [
        "",
        f"fsdp on 2 ranks holds {held_of['fsdp', 2] / held_of['ddp', 2]:.2f}x of what each ddp rank holds "
        f"(goal 1/N = 0.50; exactly 16/N bytes per parameter); its peak RSS above the torch floor "
        f"({gb(floor)} GB, the RSS after `import torch`) is "
        f"{(peak['fsdp', 2] - floor) / (peak['ddp', 2] - floor):.2f}x ddp's with the fixed mmap threshold, "
        f"{(peak_default['fsdp', 2] - floor) / (peak_default['ddp', 2] - floor):.2f}x with glibc's default "
        f"(whose heap keeps what freed tensors used: export MALLOC_MMAP_THRESHOLD_=65536 to train in less memory; what it costs in speed was not measured). "
        f"The peak also counts what is not sharded: the full fp32 model every rank builds once before "
        f"`fully_shard` shards it (4 B/parameter; building on the meta device is not done yet), AdamW foreach's "
        f"temporaries (4 B per held parameter), the root (embeddings) gathered from forward to backward and "
        f"one block at a time, and, under ddp, its gradient buckets (4 B/parameter, `gradient_as_bucket_view` "
        f"off). fsdp on 1 rank holds the same 16 B/parameter as one process, plus its gathered copies.",
        "",
        "Projection per device, 8 x 80 GB GPUs, from the exact parameter counts: fp32 master weights, "
        "gradients and Adam moments (16 B/parameter) replicated under ddp, divided by 8 under fsdp; plus, "
        "under fsdp with `--train.dtype=bf16` (bf16 gathered parameters, fp32 gradient reduction), the root "
        "(embeddings, LM head: kept gathered from forward to backward, bf16, and its fp32 gradient before the "
        "reduce-scatter) and two gathered decoder blocks (the one running and the one prefetched, bf16, plus "
        "one block's fp32 gradient). Activations come on top in both (per rank, set by micro_batch_size x "
        "seq_len; `--train.activation_checkpointing` keeps only each block's input).",
        "",
        "| model | parameters | ddp: per device (GB) | fits 80 GB? | fsdp x8: sharded state (GB) | "
        "+ gathered root and blocks (GB) | fsdp x8 total (GB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in proj:
        ddp = 16 * p["params"]
        shard = 16 * p["params"] / 8
        gathered = 2 * p["root"] + 4 * p["root"] + 2 * 2 * p["block"] + 4 * p["block"]
        lines.append(f"| {p['name']} | {p['params'] / 1e9:.2f} B | {gb(ddp)} | {'yes' if ddp < 80e9 else 'no'} | "
                     f"{gb(shard)} | {gb(gathered)} | {gb(shard + gathered)} |")
    lines += [
        "",
        "The CUDA path (nccl, bf16 parameters / fp32 reduction) is written but untested: no GPU was available "
        "to this work; every number above is from the CPU (gloo).",
    ]
    body = "\n".join(lines)
    replace_section("results_fsdp", body, "## Training past one device: memory per rank, ddp vs fsdp")
    return body


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=["single", "ddp", "fsdp"])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--report", action="store_true")
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.out)
        return
    if a.report:
        data = json.loads(RESULTS.read_text())
    else:
        data = {"rows": run_all(), "projection": projection()}
        RESULTS.write_text(json.dumps(data, indent=1))
    print(report(data["rows"], data["projection"]))


if __name__ == "__main__":
    main()
