"""Fine-tuning to 1.58 bits (warm-up quantization): the HF blog's comparison, at small budgets.

For two full-precision starting points, (a) llama2.c's pretrained stories260K (held-out TinyStories
text) and (b) onebit's fp twin trained on Gutenberg (its own held-out documents), measure the
validation loss / perplexity after the same number of fine-tuning tokens for: the fp model, naive
post-training ternarization (PTQ), QAT without warm-up, λ linear / exponential / sigmoid, λ linear +
distillation, and a b1.58 model of the same shape trained from scratch on the same tokens. Every
trained cell, and PTQ (its norm calibration batch is drawn from the seed), is repeated over
``--seeds`` training seeds (data order, calibration batch, from-scratch init) and reported as
mean ± std; the findings count a difference only where it exceeds the seed spread. Each starting
point has its own lr for the main table (`starts()`: the better of the two compared) and a second lr
that a side table compares it with for λ linear (1e-4 is the blog's lr and `onebit finetune`'s
default).

    .venv/bin/python bench/results_finetune.py [--twin runs/gutenberg-fp-lr3e-3] [--seeds 3] [--runs runs] [--report]

writes <runs>/results_finetune/*, docs/results_finetune.json, docs/finetune.png and the
results_finetune section of docs/results.md. A finished run under <runs> is reused when its run
config matches (so an interrupted regeneration continues where it stopped); a stale one stops the
script, naming the folder. A run's folder is named by its variant, plus `_lr<lr>` unless its lr is
1e-3 (`run_dir`), so runs at another lr never land in, or are taken from, another lr's folder.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
SHARED = ROOT.parent / "shared" / "data"

VARIANTS = {  # name -> [finetune] overrides (None: evaluation only / from scratch)
    "qat_no_warmup": {"lambda_schedule": "none"},
    "lambda_linear": {"lambda_schedule": "linear"},
    "lambda_exponential": {"lambda_schedule": "exponential"},
    "lambda_sigmoid": {"lambda_schedule": "sigmoid"},
    "lambda_linear_distill": {"lambda_schedule": "linear", "distill_weight": 1.0},
}
SCHEDULES = ("qat_no_warmup", "lambda_linear", "lambda_exponential", "lambda_sigmoid")
LABELS = {"fp": "fp model (no fine-tuning)", "ptq": "naive PTQ (ternarize, no training)",
          "qat_no_warmup": "QAT, no warm-up (λ=1)", "lambda_linear": "λ linear",
          "lambda_exponential": "λ exponential (k=4)", "lambda_sigmoid": "λ sigmoid (k=10)",
          "lambda_linear_distill": "λ linear + distillation (KL, w=1)",
          "scratch": "b1.58 from scratch, same tokens"}
EVAL_TOKENS = 16384
THREADS = 1
SEED0 = 1337  # the trainer's default seed; seed i of --seeds N is SEED0 + i
RUNS = ROOT / "runs"  # --runs: the root of the run folders (the cache of finished runs)
PLAIN_LR = 1e-3  # a run at this lr has its variant's name alone as folder name (see run_dir)


def starts(twin: Path) -> dict[str, dict]:
    return {
        "stories260K": dict(
            source=str(SHARED / "models" / "stories260K" / "stories260K.bin"),
            data={"paths": [str(SHARED / "tinystories" / "tinystories_valid_head.txt")],
                  "val_fraction": 0.1, "seq_len": 128},
            steps=240, lambda_steps=60, batch_size=8, lr=1e-3, lr_compare=1e-4),
        "gutenberg-fp-twin": dict(
            source=str(twin),
            data={"paths": [str(SHARED / "gutenberg")], "val_fraction": 0.1, "seq_len": 128},
            steps=160, lambda_steps=40, batch_size=4, lr=1e-4, lr_compare=1e-3),
    }


def run_dir(sdir: Path, vname: str, lr: float) -> Path:
    """The folder of variant ``vname`` trained at ``lr`` under a seed's folder: the variant's name at
    lr 1e-3 (the lr every run had when this script began), ``<variant>_lr<lr>`` at any other."""
    return sdir / (vname if lr == PLAIN_LR else f"{vname}_lr{lr:g}")


def run_config(start: dict, out: Path, finetune: dict | None, seed: int, lr: float | None = None):
    from onebit.train import load_run_config

    steps = start["steps"]
    d = dict(start["data"], cache_dir=str(ROOT / ".cache" / "onebit"))
    t = dict(steps=steps, batch_size=start["batch_size"], lr=lr or start["lr"], schedule="constant",
             warmup_steps=5, eval_every=steps, eval_tokens=EVAL_TOKENS, log_every=10, ckpt_every=steps,
             out_dir=str(out), tensorboard=False, progress=False, threads=THREADS, seed=seed)
    f = {"source": start["source"], "lambda_steps": start["lambda_steps"], **(finetune or {})}
    return load_run_config(None, [], defaults={"data": d, "train": t, "finetune": f})


def _comparable(cfg: dict) -> dict:
    """The parts of a run config that decide its result (not threads, paths of the cache, the run's
    own folder, ...)."""
    t = {k: v for k, v in cfg["train"].items() if k not in ("threads", "progress", "out_dir")}
    d = {k: cfg["data"][k] for k in ("paths", "seq_len", "val_fraction")}
    return {"train": t, "data": d, "finetune": cfg["finetune"]}


def run_once(out: Path, rc, scratch: bool = False) -> dict:
    """Train ``rc`` into ``out`` unless a finished run with the same config is there; its summary.
    Resumes an interrupted one."""
    from onebit.finetune import finetune
    from onebit.train import train

    saved = out / "run_config.json"
    if (out / "summary.json").is_file():
        if _comparable(json.loads(saved.read_text())) != _comparable(rc.to_dict()):
            sys.exit(f"'{out}' holds a finished run with other settings than this script's: remove it "
                     f"(or restore the settings it was made with)")
        return json.loads((out / "summary.json").read_text())
    resume = (out / "checkpoints" / "latest").is_file()
    (train if scratch else finetune)(rc, resume=resume)
    return json.loads((out / "summary.json").read_text())


def eval_source(start: dict, base: Path, seeds: list[int]) -> dict:
    """Validation loss of the fp source, and of its naive ternarization per seed (the added norms are
    calibrated on the seed's first training batch, as the fine-tuning runs do)."""
    import dataclasses

    import torch

    from onebit.checkpoint import atomic_write_text
    from onebit.data import eval_windows, prepare_data, sample_batch
    from onebit.finetune import load_source, quantize_model

    rc = run_config(start, base, None, SEED0)
    model, tok_json, _ = load_source(start["source"])
    tok_file = base / "source_tokenizer.json"
    atomic_write_text(tok_file, tok_json)
    data = prepare_data(dataclasses.replace(rc.data, tokenizer=str(tok_file)))
    seq = rc.data.seq_len
    x, y = eval_windows(data.val, seq, EVAL_TOKENS)

    def loss(m) -> float:
        tot = 0.0
        with torch.no_grad():
            for i in range(0, len(x), 8):
                tot += m(x[i:i + 8], y[i:i + 8])[1].item() * y[i:i + 8].numel()
        return tot / y.numel()

    res = {"fp": loss(model.eval()), "ptq": []}
    for seed in seeds:
        calib = sample_batch(data.train, seq, min(start["batch_size"], 16), seed + 1, 0)[0]
        m = load_source(start["source"])[0]
        res["ptq"].append(loss(quantize_model(m, lam=1.0, calibration=calib).eval()))
    res["val_tokens"] = int(y.numel())
    res["vocab_size"] = int(model.config.vocab_size)
    return res


def stats(runs: list[float]) -> dict:
    """mean and sample standard deviation (0 for one run) of one cell's runs."""
    return {"mean": statistics.fmean(runs), "std": statistics.stdev(runs) if len(runs) > 1 else 0.0,
            "runs": runs}


def run_start(sname: str, start: dict, seeds: list[int]) -> dict:
    import dataclasses

    from onebit.finetune import student_config

    base = RUNS / "results_finetune" / sname
    base.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    r = eval_source(start, base, seeds)
    eval_s = time.time() - t0
    runs: dict[str, list[float]] = {v: [] for v in [*VARIANTS, "scratch"]}
    lr_runs: list[float] = []
    train_s = 0.0  # training time of every run (also of those reused from runs/)
    for seed in seeds:
        sdir = base / f"seed{seed}"
        for vname, fo in VARIANTS.items():
            out = run_dir(sdir, vname, start["lr"])
            sm = run_once(out, run_config(start, out, fo, seed))
            runs[vname].append(sm["val_loss"])
            train_s += sm["tokens_seen"] / sm["tok_s"]
            print(f"{sname} seed {seed} {vname}: val loss {sm['val_loss']:.4f}", flush=True)
        out = sdir / "scratch"
        rc = run_config(start, out, None, seed)
        mc, _ = student_config(rc.finetune)
        # the trainer's own b1.58 recipe (lr 1.5e-3, two-stage), random init, same tokens
        rc = dataclasses.replace(
            rc, model=mc, finetune=dataclasses.replace(rc.finetune, source=None),
            data=dataclasses.replace(rc.data, tokenizer=str(base / "source_tokenizer.json")),
            train=dataclasses.replace(rc.train, lr=None, schedule="auto", warmup_steps=None))
        sm = run_once(out, rc, scratch=True)
        runs["scratch"].append(sm["val_loss"])
        train_s += sm["tokens_seen"] / sm["tok_s"]
        if start.get("lr_compare") is not None:
            lr = start["lr_compare"]
            out = run_dir(sdir, "lambda_linear", lr)
            sm = run_once(out, run_config(start, out, VARIANTS["lambda_linear"], seed, lr=lr))
            lr_runs.append(sm["val_loss"])
            train_s += sm["tokens_seen"] / sm["tok_s"]
    res = {"val_loss": {"fp": stats([r["fp"]]), "ptq": stats(r["ptq"]),
                        **{v: stats(x) for v, x in runs.items()}},
           "val_tokens": r["val_tokens"], "vocab_size": r["vocab_size"], "seeds": seeds,
           "train_tokens": start["steps"] * start["batch_size"] * start["data"]["seq_len"],
           "steps": start["steps"], "lambda_steps": start["lambda_steps"], "lr": start["lr"],
           "batch_size": start["batch_size"], "seq_len": start["data"]["seq_len"],
           "source": start["source"], "minutes": (eval_s + train_s) / 60}
    if lr_runs:
        res["lr_compare"] = {f"{start['lr_compare']:g}": stats(lr_runs),
                             f"{start['lr']:g}": res["val_loss"]["lambda_linear"]}
    return res


def curves(sname: str, seeds: list[int], lr: float) -> dict[str, list[tuple[int, float]]]:
    """Per variant: the training loss at each logged step (of the runs at the main table's ``lr``),
    averaged over the seeds."""
    out = {}
    for v in [*VARIANTS, "scratch"]:
        per_seed = []
        for seed in seeds:
            sdir = RUNS / "results_finetune" / sname / f"seed{seed}"
            f = (sdir / "scratch" if v == "scratch" else run_dir(sdir, v, lr)) / "log.jsonl"
            if f.is_file():
                per_seed.append([json.loads(line) for line in f.read_text().splitlines() if line.strip()])
        if per_seed:
            n = min(len(p) for p in per_seed)
            out[v] = [(per_seed[0][i]["tokens"], statistics.fmean(p[i]["loss"] for p in per_seed))
                      for i in range(n)]
    return out


def plot(results: dict, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
    for ax, (sname, res) in zip(axes[0], results.items()):
        for v, pts in curves(sname, res["seeds"], res["lr"]).items():
            xs, ys = zip(*pts)
            k = 10  # moving average over 10 logged steps
            sm = [statistics.fmean(ys[max(0, i - k + 1):i + 1]) for i in range(len(ys))]
            ax.plot([x / 1e3 for x in xs], sm, label=LABELS[v], lw=1.3)
        for v, style in (("fp", "k--"), ("ptq", "r:")):
            ax.axhline(res["val_loss"][v]["mean"], color=style[0], ls=style[1:], lw=1,
                       label=LABELS[v] + " (val)")
        ax.set_title(f"{sname}: train loss at lr {res['lr']:g} (mean of {len(res['seeds'])} seeds, "
                     f"10-step average)", fontsize=10)
        ax.set_xlabel("fine-tuning tokens (thousands)")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_ylim(top=min(8.0, ax.get_ylim()[1]))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def cell(s: dict) -> str:
    """mean ± std, or the value alone when every seed gave the same number (nothing seeded)."""
    return f"{s['mean']:.3f}" if len(set(s["runs"])) == 1 else f"{s['mean']:.3f} ± {s['std']:.3f}"


def beyond_spread(a: dict, b: dict) -> bool:
    """Whether two cells differ by more than their seed spread: |mean_a - mean_b| > std_a + std_b
    (about 2.4 standard errors of the difference at 3 seeds each)."""
    return abs(a["mean"] - b["mean"]) > a["std"] + b["std"]


def report(doc: dict) -> str:
    results = doc["starts"]
    names = list(results)
    lines = ["| variant | " + " | ".join(f"{n}: val loss | ppl" for n in names) + " |",
             "|---|" + "---:|---:|" * len(names)]
    for v in ["fp", "ptq", *VARIANTS, "scratch"]:
        cells = []
        for n in names:
            s = results[n]["val_loss"][v]
            cells += [cell(s), f"{math.exp(s['mean']):.2f}"]
        lines.append(f"| {LABELS[v]} | " + " | ".join(cells) + " |")
    lines += ["", "Mean ± sample standard deviation over the seeds; ppl = e^mean. A value without ± was "
              "the same for every seed: the fp evaluation, and PTQ where the conversion adds no norm to "
              "calibrate (the SubLN fp twin; stories260K is a pre-norm Llama whose new sub-norms are "
              "calibrated on the seed's first training batch)."]
    setup = []
    for n, r in results.items():
        setup.append(f"- **{n}**: {r['steps']} steps × {r['batch_size']}×{r['seq_len']} tokens = "
                     f"{r['train_tokens']:,} fine-tuning tokens for every trained row; λ reaches 1 at step "
                     f"{r['lambda_steps']}; lr {r['lr']:g}{_lr_note(r)} constant after 5 warm-up steps (from scratch: "
                     f"the trainer's b1.58 recipe, lr 1.5e-3 two-stage); seeds {', '.join(map(str, r['seeds']))}; "
                     f"validation on {r['val_tokens']:,} held-out tokens; {r['minutes']:.1f} min of training + "
                     f"evaluation (one thread, niced, on 2 cores shared with other jobs).")
    lr_tab = []
    for n, r in results.items():
        if "lr_compare" not in r:
            continue
        if not lr_tab:
            lr_tab = ["", "λ linear at the lr of the table above (marked) and at a second lr, same budget "
                      "and seeds (1e-4 is the blog's lr and `onebit finetune`'s default):", "",
                      "| start | lr | val loss | ppl |", "|---|---:|---:|---:|"]
        for lr, s in sorted(r["lr_compare"].items(), key=lambda kv: float(kv[0])):
            mark = " (table above)" if float(lr) == r["lr"] else ""
            lr_tab.append(f"| {n} | {float(lr):g}{mark} | {cell(s)} | {math.exp(s['mean']):.2f} |")
    wall = (f"Regenerated with `{doc['command']}` in {doc['wall_minutes']:.0f} min of wall time "
            f"(runs found finished under runs/ are reused; the per-start minutes above count them all).")
    return "\n".join(lines + [""] + setup + lr_tab + [""] + findings(results) + ["", wall])


def _lr_note(r: dict) -> str:
    """How the table's lr compares with the other lr tried for λ linear (computed, for the setup line)."""
    if "lr_compare" not in r:
        return ""
    table, other = r["lr_compare"][f"{r['lr']:g}"], next(
        (lr, s) for lr, s in r["lr_compare"].items() if float(lr) != r["lr"])
    if not beyond_spread(table, other[1]):
        rel = "no different, beyond the seed spread, from"
    else:
        rel = "better than" if table["mean"] < other[1]["mean"] else "worse than"
    return f" (for λ linear {rel} lr {float(other[0]):g}, table below)"


def findings(results: dict) -> list[str]:
    """The blog's findings (BITNET.md §3), checked against the numbers above: a difference counts
    only where it exceeds the seed spread (``beyond_spread``)."""
    out = ["Against the blog's findings (computed from the tables; a difference counts only when "
           "|Δ mean| exceeds the sum of the two cells' seed standard deviations):"]
    for n, r in results.items():
        v = r["val_loss"]
        m = {k: s["mean"] for k, s in v.items()}
        vocab = r["vocab_size"]
        collapse = m["ptq"] > 0.8 * math.log(vocab)
        best = min(SCHEDULES, key=m.get)
        lin = v["lambda_linear"]
        others = [k for k in SCHEDULES if k != "lambda_linear"]
        if best == "lambda_linear":
            beaten = [k for k in others if beyond_spread(lin, v[k])]
            within = ", ".join(LABELS[k] for k in others if k not in beaten)
            if len(beaten) == len(others):
                sched = "agrees: linear is best, beyond the seed spread of every other schedule"
            elif beaten:
                sched = (f"partly: linear has the lowest mean ({cell(lin)}), beyond the seed spread of "
                         f"{', '.join(LABELS[k] for k in beaten)} but not of {within}")
            else:
                sched = (f"not resolved: linear has the lowest mean ({cell(lin)}) but every other schedule "
                         f"is within the seed spread of it")
        elif beyond_spread(lin, v[best]):
            sched = (f"differs: {LABELS[best]} ({cell(v[best])}) beats linear ({cell(lin)}) beyond the "
                     f"seed spread")
        else:
            sched = (f"not resolved: {LABELS[best]} has the lowest mean ({cell(v[best])}) but linear "
                     f"({cell(lin)}) is within the seed spread of it")
        warm = min(("lambda_linear", "lambda_exponential", "lambda_sigmoid"), key=m.get)
        if beyond_spread(v[warm], v["qat_no_warmup"]):
            warm_s = "helps" if m[warm] < m["qat_no_warmup"] else "hurts"
        else:
            warm_s = "no difference beyond the seed spread"
        sched += (f"; warm-up at all ({LABELS[warm]}, {cell(v[warm])}) vs none ({cell(v['qat_no_warmup'])}): "
                  f"{warm_s}")
        ft = min(VARIANTS, key=m.get)
        if beyond_spread(v[ft], v["scratch"]):
            scratch = "agrees: fine-tuning wins" if m[ft] < m["scratch"] else "differs: scratch wins"
        else:
            scratch = "not resolved (within the seed spread)"
        dist = v["lambda_linear_distill"]
        if beyond_spread(dist, lin):
            dist_s = "helps" if dist["mean"] < lin["mean"] else "hurts"
        else:
            dist_s = "no difference beyond the seed spread"
        line = (f"- **{n}**: PTQ {cell(v['ptq'])} vs fp {m['fp']:.2f} and a uniform guess ln(V) = "
                f"{math.log(vocab):.2f}: {'collapses to near-random (agrees)' if collapse else 'degrades but does not collapse (differs)'}; "
                f"schedules: {sched}; fine-tuning ({LABELS[ft]}, {cell(v[ft])}) vs from scratch "
                f"({cell(v['scratch'])}): {scratch}; distillation (an extra the blog did not try) "
                f"{cell(dist)} vs linear alone {cell(lin)}: {dist_s}; gap to fp after fine-tuning "
                f"{m[ft] - m['fp']:+.3f}.")
        if "lr_compare" in r:
            (lo, a), (hi, b) = sorted(r["lr_compare"].items(), key=lambda kv: float(kv[0]))
            if beyond_spread(a, b):
                better = lo if a["mean"] < b["mean"] else hi
                line += f" lr {better} beats the other ({cell(a)} at {lo} vs {cell(b)} at {hi}) at this budget"
                alt = r["lr_compare"][better]
                if float(better) == r["lr"]:
                    line += ", and it is the lr of this table's rows"
                else:  # the table's own lr is the worse one here
                    rel = ("within the seed spread of" if not beyond_spread(alt, v[ft]) else
                           "better than" if alt["mean"] < m[ft] else "worse than")
                    line += (f", so this table's rows are at the worse lr: λ linear at lr {better} alone is "
                             f"{rel} the table's best row ({LABELS[ft]}, {cell(v[ft])})")
                line += "."
            else:
                line += f" lr {lo} vs {hi}: no difference beyond the seed spread."
        out.append(line)
    return out


def shown_command(argv: list[str]) -> str:
    """The command line as a user types it from the repo root: ``--runs`` left out, and a path under
    the runs root written as ``runs/...`` (the same runs when the root is this checkout's runs/)."""
    out, skip = [], False
    for a in argv:
        if skip or a == "--runs" or a.startswith("--runs="):
            skip = a == "--runs"
            continue
        p = Path(a.split("=", 1)[-1]) if a.startswith("--") and "=" in a else Path(a)
        if p.is_absolute() and p.resolve().is_relative_to(RUNS):
            rel = "runs/" + p.resolve().relative_to(RUNS).as_posix()
            a = f"{a.split('=', 1)[0]}={rel}" if a.startswith("--") and "=" in a else rel
        out.append(a)
    return " ".join(["python bench/results_finetune.py", *out])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--twin", default="runs/gutenberg-fp-lr3e-3",
                    help="onebit fp-twin run folder (`onebit train --config gutenberg --model.linear=fp "
                         "--train.lr=3e-3 --train.steps=1000 --train.out_dir=runs/gutenberg-fp-lr3e-3`)")
    ap.add_argument("--report", action="store_true", help="rebuild the table/plot from docs/results_finetune.json")
    ap.add_argument("--only", nargs="*", help="starting points to run (default: both)")
    ap.add_argument("--seeds", type=int, default=3, help="training seeds per cell (default 3)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", default=None,
                    help="root of the run folders, where finished runs are reused from (default: runs/ of this "
                         "checkout)")
    args = ap.parse_args()
    if args.seeds < 1:
        ap.error(f"--seeds={args.seeds} must be >= 1")
    global THREADS, RUNS
    THREADS = args.threads
    if args.runs is not None:
        RUNS = Path(args.runs).resolve()
    js = ROOT / "docs" / "results_finetune.json"
    t0 = time.time()
    if args.report:
        doc = json.loads(js.read_text())
        if "starts" not in doc:
            sys.exit(f"'{js}' is from the one-seed version of this script: regenerate it (without --report)")
    else:
        twin = Path(args.twin).resolve()
        if not (twin / "model" / "model.safetensors").is_file() and not (twin / "model.safetensors").is_file():
            sys.exit(f"fp twin '{twin}' not found: train it first (see --help) or pass --twin")
        old = json.loads(js.read_text()) if js.is_file() else {}
        doc = {"starts": old.get("starts", {})}
        seeds = [SEED0 + i for i in range(args.seeds)]
        for sname, start in starts(twin).items():
            if not args.only or sname in args.only:
                doc["starts"][sname] = run_start(sname, start, seeds)
        doc["command"] = shown_command(sys.argv[1:])
        doc["wall_minutes"] = (time.time() - t0) / 60
        js.write_text(json.dumps(doc, indent=1) + "\n")
    plot(doc["starts"], ROOT / "docs" / "finetune.png")
    from docsection import replace_section
    body = report(doc) + "\n\n![fine-tuning curves](finetune.png)\n"
    replace_section("results_finetune", body, "## Fine-tuning to 1.58 bits (warm-up quantization)")
    print(body)


if __name__ == "__main__":
    main()
