"""Zero-shot tasks (issue 17): the quality table and the speed of `onebit eval tasks` vs lm-eval.

    .venv/bin/python bench/results_tasks.py                       # every model found, all items
    .venv/bin/python bench/results_tasks.py --limit 50 --no-doc   # a quick look (not written)
    .venv/bin/python bench/results_tasks.py --skip-quality --speed-shape bitnet-2b4t   # speed only

Quality: acc / acc_norm ± stderr (lm-eval's metrics, onebit.eval) on the seven tasks, and the
perplexity of held-out text of each model's own domain beside them (Gutenberg: the books that
``split_documents(..., 0.1)`` holds out, the split every Gutenberg run used; TinyStories: the held-out
tenth of tinystories_valid_head.txt), since at this scale accuracies sit near chance. Rows: the
built-in model; it exported to GGUF TQ2_0 and back; the Gutenberg fp twin / b1.58 / a4.8 of
bench/results_a48.py (``--a48-prefix``, default runs/a48); llama2.c's stories260K and its 1.58-bit
fine-tunes of bench/results_finetune.py (``--finetune-runs``, seed 1337). Missing runs are listed with
the command that makes them. Ternary training runs are packed (cached under
runs/results_tasks/) and scored on the engine (tests/test_eval_tasks.py holds the engine to the
PyTorch model's numbers); fp models run on PyTorch.

Speed: items/s of `onebit eval tasks` (engine) vs lm-eval's ``hf`` backend (transformers' BitNet,
float32) on the same model exported with `onebit convert --to hf` and the same items, in one run:
``--speed-shape builtin`` (the built-in model) or a random-weight preset such as bitnet-2b4t (the
llama3 tokenizer, whose vocabulary 2B4T shares). Model loading is not timed.

Writes docs/results_tasks.json and the results_tasks section of docs/results.md (unless --no-doc).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
WORK = ROOT / "runs" / "results_tasks"
JSON_OUT = ROOT / "docs" / "results_tasks.json"
GUTENBERG = [SHARED / "gutenberg"]
STORIES = [SHARED / "tinystories" / "tinystories_valid_head.txt"]
FINETUNE_VARIANTS = {"qat_no_warmup": "QAT, no warm-up", "lambda_linear": "λ linear",
                     "lambda_exponential": "λ exponential", "lambda_sigmoid": "λ sigmoid",
                     "lambda_linear_distill": "λ linear + distillation"}


def _rel(p: Path) -> str:
    p = Path(p).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def rows(a48_prefix: str, finetune_runs: Path, gguf_source: str | None = None
         ) -> tuple[list[dict], list[str]]:
    """The models of the table that exist here: {group, label, path, ppl_text}; and the missing."""
    from onebit.engine import default_model_path

    out = [dict(group="built-in", label="built-in b1.58 (Gutenberg, 2.4M)", path=default_model_path(),
                text=GUTENBERG),
           dict(group="built-in", label="→ GGUF TQ2_0 → onebit", path="gguf-roundtrip",
                text=GUTENBERG)]
    missing = []
    for suffix, label in (("fp", "fp twin"), ("b158", "b1.58 (A8)"), ("a48", "a4.8 (two-stage)")):
        p = ROOT / f"{a48_prefix}-{suffix}"
        if (p / "model").is_dir():
            out.append(dict(group="Gutenberg, same tokens", label=label, path=p / "model", text=GUTENBERG))
        else:
            missing.append(f"{_rel(p)} (make it: .venv/bin/python bench/results_a48.py)")
    out.append(dict(group="stories260K", label="stories260K (fp, llama2.c)",
                    path=SHARED / "models" / "stories260K" / "stories260K.bin", text=STORIES))
    for v, label in FINETUNE_VARIANTS.items():
        p = finetune_runs / "stories260K" / "seed1337" / v
        if (p / "model").is_dir():
            out.append(dict(group="stories260K", label=f"1.58-bit fine-tune, {label}", path=p / "model",
                            text=STORIES))
        else:
            missing.append(f"{_rel(p)} (make it: .venv/bin/python bench/results_finetune.py)")
    return out, missing


def engine_path(row: dict) -> tuple[str, Path]:
    """("engine", packed folder) for ternary models (packing training runs once, into WORK), or
    ("torch", path) for fp ones."""
    from onebit.formats.convert import convert, detect_format

    p = row["path"]
    if p == "gguf-roundtrip":  # row["source"]: a packed model (rows that are no multiple of 256 go F16)
        back = WORK / f"gguf-roundtrip-{Path(row['source']).name}"
        if not (back / "config.json").is_file():
            WORK.mkdir(parents=True, exist_ok=True)
            gguf = WORK / f"{Path(row['source']).name}-tq2_0.gguf"
            # ReLU² is fine here: onebit reads the file back (stock llama.cpp would compute SiLU)
            convert(row["source"], gguf, "gguf-tq2_0", allow_relu2=True)
            convert(gguf, back, "onebit")
        return "engine", back
    p = Path(p)
    try:
        if detect_format(p) in ("onebit", "gguf"):
            return "engine", p
    except ValueError:
        pass
    cfg = p / "config.json"
    if p.is_dir() and cfg.is_file() and json.loads(cfg.read_text())["model"].get("linear") == "bitnet":
        from onebit.formats.packed_model import export_packed

        dst = WORK / "packed" / "_".join(p.parts[-3:])
        if not (dst / "config.json").is_file():
            export_packed(p, dst)
        return "engine", dst
    return "torch", p


def heldout_ppl(scorer_backend: str, path: Path, texts: list[Path], tokens: int) -> dict:
    """Perplexity of the held-out documents of ``texts`` (split_documents(..., 0.1)), each
    [BOS] + text + [EOS], the first ``tokens`` of them in windows of min(context, 256)."""
    import numpy as np

    from onebit.data import read_documents, split_documents

    val = split_documents(read_documents(texts), 0.1)[1]
    if scorer_backend == "engine":
        import onebit
        from onebit.engine.evaluate import perplexity

        m = onebit.load(path)
        cfg, enc = m.config, lambda s: m.encode(s, add_bos=False)
        run = lambda ids, L: perplexity(m, ids, L, max_tokens=tokens)  # noqa: E731
    else:
        from onebit.eval.run import _torch_model
        from onebit.evaluate import perplexity

        model, tok = _torch_model(Path(path))
        cfg, enc = model.config, lambda s: tok.encode(s, add_special_tokens=False).ids
        run = lambda ids, L: perplexity(model, ids, L, max_tokens=tokens)  # noqa: E731
    ids: list[int] = []
    for d in val:
        ids += [cfg.bos_token_id] + enc(d.text) + [cfg.eos_token_id]
        if len(ids) > tokens + 1:
            break
    L = min(cfg.max_position_embeddings, 256)
    return {**run(np.asarray(ids, dtype=np.int64), L), "seq_len": L}


def quality(args) -> dict:
    from onebit.eval import evaluate_tasks, load_scorer

    table, missing = rows(args.a48_prefix, Path(args.finetune_runs))
    res = {"rows": [], "missing": missing, "limit": args.limit}
    for row in table:
        t0 = time.perf_counter()
        if row["path"] == "gguf-roundtrip":
            from onebit.engine import default_model_path

            row["source"] = args.gguf_source or default_model_path()
            try:
                backend, path = engine_path(row)
            except ValueError as e:   # e.g. rows that are not a multiple of the 256-value block
                why = str(e).split(": ", 1)[-1].split("; ")[0]   # drop the temp path and the fix
                missing.append(f"the GGUF round trip of {_rel(Path(row['source']))} ({why}; pass "
                               f"--gguf-source with a packed model whose hidden and FFN sizes are "
                               f"multiples of 256)")
                continue
            import collections

            import gguf as gguf_py

            kinds = collections.Counter(t.tensor_type.name for t in gguf_py.GGUFReader(
                WORK / f"{Path(row['source']).name}-tq2_0.gguf").tensors if t.name.endswith(".weight")
                and t.name.startswith("blk.") and "norm" not in t.name)
            # projections whose rows are no multiple of 256 go F16 (exactly -1/0/+1, a scale beside)
            how = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
            name = "built-in" if Path(row["source"]) == Path(default_model_path()) else Path(row["source"]).name
            row["label"] = f"{name} → GGUF ({how} projections) → onebit"
        else:
            backend, path = engine_path(row)
        rep = evaluate_tasks(load_scorer(path, backend), args.tasks, limit=args.limit,
                             show_progress=not args.quiet)
        ppl = heldout_ppl(backend, path, row["text"], args.ppl_tokens)
        res["rows"].append({"group": row["group"], "label": row["label"], "path": str(row["path"]),
                            "scored": str(path), "backend": backend, "tasks": rep["tasks"],
                            "ppl": ppl, "ppl_text": [str(t.relative_to(SHARED.parent)) for t in row["text"]],
                            "seconds": time.perf_counter() - t0})
        accs = ", ".join(f"{k} {v['acc']:.3f}" for k, v in rep["tasks"].items())
        print(f"{row['label']}: {accs}; ppl {ppl['ppl']:.2f}", flush=True)
    return res


def speed_model(shape: str) -> Path:
    """A packed model (with tokenizer) for the speed run: the built-in one, or a random preset."""
    from onebit.engine import default_model_path

    if shape == "builtin":
        return default_model_path()
    from onebit.engine.synth import write_random_model

    dst = WORK / f"random-{shape}"
    if not (dst / "config.json").is_file():
        write_random_model(dst, shape, embedding="f16")
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(SHARED / "tokenizers" / "llama3" / f, dst / f)
    return dst


def bos_for_transformers(folder: Path) -> None:
    """Make transformers' tokenizer of ``folder`` encode as the engine does ([BOS] + text): a
    tokenizer.json without a post-processor (onebit's trained BPE) gets one that prepends BOS, and
    a tokenizer_config.json naming BOS / EOS (lm-eval's prefix token) is written if absent."""
    from tokenizers import Tokenizer, processors

    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    bos, eos = tok.id_to_token(cfg["bos_token_id"]), tok.id_to_token(cfg["eos_token_id"])
    if tok.post_processor is None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, cfg["bos_token_id"])])
        tok.save(str(folder / "tokenizer.json"))
    if not (folder / "tokenizer_config.json").is_file():
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos}))


def speed(args) -> dict:
    """One run: the engine, then lm-eval's hf backend, on the same items of ``args.speed_tasks``."""
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from onebit import kernels
    from onebit.eval import evaluate_tasks, load_scorer
    from onebit.eval.harness import TASKS_PATH
    from onebit.formats.convert import convert

    packed = speed_model(args.speed_shape)
    hf = WORK / f"hf-{args.speed_shape}"
    if not (hf / "config.json").is_file():
        convert(packed, hf, "hf", verify=args.speed_shape == "builtin")  # random 2B: no reference pass
        bos_for_transformers(hf)
    tasks = args.speed_tasks.split(",")
    t0 = time.perf_counter()
    scorer = load_scorer(packed)
    t_ours = time.perf_counter()   # both timed from the task files to the metrics, loading excluded
    ours = evaluate_tasks(scorer, tasks, limit=args.speed_limit, show_progress=not args.quiet)
    ours_s = time.perf_counter() - t_ours
    n_items = sum(r["items"] for r in ours["tasks"].values())
    t_load = time.perf_counter()
    import transformers

    # float32 throughout: an f16 embedding stays f16 under dtype=float32 (transformers' quantized
    # models refuse .float()) and the head matmul then mixes dtypes
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    for t in [*model.parameters(), *model.buffers()]:
        if t.dtype == torch.float16:
            t.data = t.data.float()
    lm = HFLM(pretrained=model, tokenizer=transformers.AutoTokenizer.from_pretrained(str(hf)),
              add_bos_token=True, batch_size=args.hf_batch_size, device="cpu")
    t_loaded = time.perf_counter()
    tm = TaskManager(include_path=str(TASKS_PATH), include_defaults=False)
    res = lm_eval.simple_evaluate(model=lm, tasks=[f"onebit_{t}" for t in tasks], task_manager=tm,
                                  limit=args.speed_limit)
    hf_s = time.perf_counter() - t_loaded
    agree = {t: (res["results"][f"onebit_{t}"]["acc,none"], ours["tasks"][t]["acc"]) for t in tasks}
    out = {"shape": args.speed_shape, "model": str(packed), "hf_export": str(hf), "tasks": tasks,
           "limit": args.speed_limit, "items": n_items,
           "engine": {"seconds": ours_s, "items_per_s": n_items / ours_s,
                      "threads": kernels.get_num_threads()},
           "lm_eval_hf": {"seconds": hf_s, "items_per_s": n_items / hf_s, "batch_size": args.hf_batch_size,
                          "torch_threads": torch.get_num_threads(), "load_seconds": t_loaded - t_load},
           "acc_lm_eval_hf_vs_engine": agree, "wall_seconds": time.perf_counter() - t0}
    out["speedup"] = out["engine"]["items_per_s"] / out["lm_eval_hf"]["items_per_s"]
    print(f"speed ({args.speed_shape}, {n_items} items): engine {out['engine']['items_per_s']:.1f} "
          f"items/s, lm-eval hf {out['lm_eval_hf']['items_per_s']:.1f} items/s = "
          f"{out['speedup']:.1f}x", flush=True)
    return out


def _pm(r: dict, metric: str) -> str:
    if metric not in r:
        return "—"
    e = r.get(metric + "_stderr")
    return f"{r[metric]:.3f} ± {e:.3f}" if e is not None else f"{r[metric]:.3f}"


def _n(k: int, what: str) -> str:
    return f"{k} {what}{'' if k == 1 else 's'}"


def report(res: dict) -> str:
    from onebit.eval import TASKS

    q, lines = res.get("quality"), []
    lines.append("Regenerate: `.venv/bin/python bench/results_tasks.py` (all items of every model "
                 "found; options in its docstring); numbers also in `docs/results_tasks.json`.")
    if res.get("note"):
        lines.append(res["note"])
    if q:
        lines += ["", f"Made by `{q.get('command', res['command'])}` on {q.get('date', res['date'])}."]
        names = [t for t in TASKS if q["rows"] and t in q["rows"][0]["tasks"]]
        n = {t: q["rows"][0]["tasks"][t]["items"] for t in names}
        lines += ["", "Zero-shot accuracy, lm-eval's prompts and metrics (`onebit eval tasks`; acc / "
                  "acc_norm ± standard error; winogrande and boolq have acc only). Items per task: "
                  + ", ".join(f"{t} {n[t]:,}" for t in names)
                  + (f" (--limit {q['limit']}: the first items of each task, not the full sets)"
                     if q["limit"] else "") + ". Chance: arc/hellaswag/openbookqa "
                  "0.25 (arc: a few items have 3 or 5 choices), piqa/winogrande/boolq 0.5 (boolq's "
                  "majority class 'yes' is 0.62). **At these sizes (0.26M-2.4M parameters) the "
                  "accuracies sit at chance**: perplexity (held-out text of each model's own domain, "
                  "lower is better) is what ranks them.", "",
                  "| model | " + " | ".join(names) + " | ppl |", "|---|" + "---:|" * (len(names) + 1)]
        group = None
        for r in q["rows"]:
            if r["group"] != group:
                group = r["group"]
                lines.append(f"| **{group}** |" + " |" * (len(names) + 1))
            cells = []
            for t in names:
                x = r["tasks"][t]
                cells.append(_pm(x, "acc") + ("<br>" + _pm(x, "acc_norm") if "acc_norm" in x else ""))
            ppl = r["ppl"]
            lines.append(f"| {r['label']} ({r['backend']}) | " + " | ".join(cells)
                         + f" | {ppl['ppl']:.2f} |")
        lines += ["", "ppl: Gutenberg rows on the held-out books (first {:,} tokens), stories260K rows on "
                  "the held-out tenth of tinystories_valid_head.txt; the two families use different "
                  "tokenizers, so compare ppl within a family only.".format(q["rows"][0]["ppl"]["tokens"])]
        lines.append("BoolQ here has **no passage** (the local copy has none): the question alone, not "
                     "the standard task. HellaSwag's context is stored joined, so lm-eval's "
                     "capitalisation of its last fragment is not applied.")
        if q["missing"]:
            lines.append("Not in this table (runs absent when it was made): " + "; ".join(q["missing"]) + ".")
    for s in _speeds(res).values():
        lines += ["", f"Made by `{s.get('command', res['command'])}` on {s.get('date', res['date'])}.",
                  "", f"Speed, one run: {s['items']} items ({', '.join(s['tasks'])}, first {s['limit']} "
                  f"each) of the `{s['shape']}` model: `onebit eval tasks` on the engine "
                  f"({_n(s['engine']['threads'], 'thread')}) vs lm-eval's `hf` backend (transformers BitNet, "
                  f"float32, batch {s['lm_eval_hf']['batch_size']}, "
                  f"{_n(s['lm_eval_hf']['torch_threads'], 'torch thread')}) on its `onebit convert --to hf` export; each timed from reading the task "
                  f"files to the metrics, model loading excluded.", "",
                  "| backend | seconds | items/s |", "|---|---:|---:|",
                  f"| onebit engine | {s['engine']['seconds']:.1f} | {s['engine']['items_per_s']:.1f} |",
                  f"| lm-eval hf | {s['lm_eval_hf']['seconds']:.1f} | {s['lm_eval_hf']['items_per_s']:.1f} |",
                  "", f"Speedup: **{s['speedup']:.1f}x** (goal: >= 5x on the 2B4T shape, >= 2x on small "
                  f"ones). Accuracy on these items, lm-eval hf vs engine: "
                  + ", ".join(f"{t} {a:.3f} / {b:.3f}" for t, (a, b) in s["acc_lm_eval_hf_vs_engine"].items())
                  + "."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=None, help="first N items of each task (default all)")
    ap.add_argument("--tasks", default="all")
    ap.add_argument("--ppl-tokens", type=int, default=16384)
    ap.add_argument("--a48-prefix", default="runs/a48")
    ap.add_argument("--finetune-runs", default=str(ROOT / "runs" / "results_finetune"))
    ap.add_argument("--gguf-source", default=None, help="packed model for the GGUF round-trip row "
                                                        "(default: the built-in one, if its shape fits)")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--speed-shape", default="builtin", help="builtin, or a preset: bitnet-2b4t, 700m, ...")
    ap.add_argument("--speed-tasks", default="arc_easy,hellaswag,piqa,winogrande")
    ap.add_argument("--speed-limit", type=int, default=100)
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="engine and torch threads")
    ap.add_argument("--no-doc", action="store_true", help="print, do not write docs/")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--note", default=None, help="a line for the section (e.g. the machine's load)")
    ap.add_argument("--report", action="store_true", help="rebuild the section from "
                                                          "docs/results_tasks.json (with --note)")
    args = ap.parse_args()
    if args.report:
        res = json.loads(JSON_OUT.read_text(encoding="utf-8"))
        res["note"] = args.note if args.note is not None else res.get("note")
        _write_doc(res)
        return
    if args.threads:
        import torch

        from onebit import kernels
        kernels.set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    shown, skip = [], False   # the command as run, less --quiet and --note's text
    for a in sys.argv[1:]:
        if skip or a == "--quiet" or a.startswith("--note="):
            skip = False
            continue
        if a == "--note":
            skip = True
            continue
        shown.append(a)
    res = {"date": datetime.date.today().isoformat(), "note": args.note,
           "command": " ".join([".venv/bin/python bench/results_tasks.py", *shown])}
    if not args.skip_quality:
        res["quality"] = {**quality(args), "command": res["command"], "date": res["date"]}
    if not args.skip_speed:
        sp = {**speed(args), "command": res["command"], "date": res["date"]}
        res["speeds"] = {sp["shape"]: sp}
    body = report(res)
    print(body)
    if not args.no_doc:
        if JSON_OUT.is_file():  # keep the parts of earlier runs that this one skipped
            old = json.loads(JSON_OUT.read_text(encoding="utf-8"))
            speeds = {**_speeds(old), **res.get("speeds", {})}   # one speed run per shape
            res = {**{k: v for k, v in old.items() if k == "quality"}, **res, "speeds": speeds}
            res.pop("speed", None)
        _write_doc(res)


def _speeds(res: dict) -> dict:
    """{shape: speed run}: the speed runs of a report (older reports kept one, as "speed")."""
    out = dict(res.get("speeds") or {})
    if res.get("speed"):
        out.setdefault(res["speed"]["shape"], res["speed"])
    return out


def _write_doc(res: dict) -> None:
    import importlib.util

    from onebit.atomic import atomic_write_text

    spec = importlib.util.spec_from_file_location("docsection", ROOT / "bench" / "docsection.py")
    docsection = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(docsection)
    atomic_write_text(JSON_OUT, json.dumps(res, indent=1, ensure_ascii=False))
    docsection.replace_section("results_tasks", report(res), "## Zero-shot tasks (ARC, HellaSwag, "
                               "PIQA, WinoGrande, BoolQ, OpenBookQA)")


if __name__ == "__main__":
    main()
