"""``evaluate_tasks``: zero-shot accuracy of a model on the local task files, lm-eval's metrics.

Per item (lm-eval ``ConfigurableTask.process_results`` for multiple_choice): ``pred`` = argmax of
the choices' log-likelihoods, ``acc`` = pred == gold; ``acc_norm`` the same after dividing each
log-likelihood by its choice's length in characters. Per task: the mean and its standard error
``sample_std(ddof=1) / sqrt(n)`` (lm-eval's ``mean_stderr``).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .score import encode_pair, loglikelihoods, token_encoder, torch_loglikelihoods
from .tasks import TASKS, Item, TaskSpec, file_sha256, find_data_dir, items as task_items, resolve_tasks

__all__ = ["evaluate_tasks", "score_items", "load_scorer", "Scorer", "mean_stderr", "Progress"]

BACKENDS = ("engine", "torch")
CHUNK_ITEMS = 256   # items tokenized and scored per scorer call (progress granularity)


def mean_stderr(xs: Sequence[float]) -> float | None:
    """lm-eval's ``mean_stderr``: sample standard deviation / sqrt(n) (None below 2 items)."""
    n = len(xs)
    if n < 2:
        return None
    return float(np.std(np.asarray(xs, np.float64), ddof=1) / math.sqrt(n))


class Scorer:
    """A model behind one interface: ``encode(text) -> ids``, ``prefix_id`` (the context of an
    empty context) and ``score(requests, progress) -> [(ll, is_greedy)]``."""

    def __init__(self, name: str, backend: str, encode: Callable[[str], list[int]], prefix_id: int,
                 score: Callable, info: dict):
        self.name, self.backend, self.encode, self.prefix_id = name, backend, encode, prefix_id
        self.score, self.info = score, info


def load_scorer(path: str | Path, backend: str = "engine", kv_bits: int | None = None,
                batch_size: int = 16) -> Scorer:
    """``engine``: a packed folder (or HF folder / GGUF, imported) on the C engine; ``torch``: a
    training run, model or checkpoint folder on the PyTorch model (or a llama2.c .bin /
    transformers folder, read as ``onebit finetune --from`` reads them)."""
    if backend == "engine":
        from ..engine import load
        from ..engine.stats import model_sizes

        m = load(path, kv_bits=kv_bits)
        if m.tokenizer is None:
            raise ValueError(f"model '{path}' has no tokenizer.json; copy the model's tokenizer "
                             f"beside it")
        cfg = m.config
        return Scorer(str(path), backend, m.encode, m.bos_id,
                      lambda reqs, progress=None: loglikelihoods(m, reqs, progress=progress),
                      {"params": model_sizes(m.runtime)["params"], "layout": m.runtime.packed.get("layout"),
                       "kv_bits": m.runtime.kv_bits, **_cfg_info(cfg)})
    if backend == "torch":
        if kv_bits is not None:
            raise ValueError("--kv-bits applies to the engine backend only")
        model, tok = _torch_model(Path(path))
        cfg = model.config
        return Scorer(str(path), backend, token_encoder(tok, cfg.bos_token_id), cfg.bos_token_id,
                      lambda reqs, progress=None: torch_loglikelihoods(model, reqs, batch_size,
                                                                       progress=progress),
                      {"params": sum(p.numel() for p in model.parameters()), **_cfg_info(cfg)})
    raise ValueError(f"backend {backend!r} is unknown; use one of {list(BACKENDS)}")


def _torch_model(p: Path):
    """(CausalLM, tokenizer): an onebit run / model / checkpoint folder, or what ``onebit
    finetune --from`` reads (a llama2.c .bin with its tok*.bin, a transformers folder)."""
    from ..formats.hf import is_hf_folder

    if p.is_file() or (p.is_dir() and is_hf_folder(p)):
        from tokenizers import Tokenizer

        from ..finetune import load_source

        model, tok_json, _ = load_source(p)
        return model, Tokenizer.from_str(tok_json)
    from ..checkpoint import load_model

    model, tok, folder = load_model(p)
    if tok is None:
        raise ValueError(f"model folder '{folder}' has no tokenizer.json; copy the tokenizer it "
                         f"was trained with next to model.safetensors")
    return model, tok


def _cfg_info(cfg) -> dict:
    return {"linear": cfg.linear, "activation_scheme": cfg.activation_scheme,
            "norm_placement": cfg.norm_placement, "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_hidden_layers, "vocab_size": cfg.vocab_size}


class Progress:
    """A one-line progress display on stderr: done/total items, items/s, time left. On a terminal
    it rewrites itself; otherwise it prints at most one line every ``every`` seconds."""

    def __init__(self, label: str, total: int, stream=None, every: float = 10.0):
        self.label, self.total, self.stream, self.every = label, total, stream or sys.stderr, every
        self.t0 = self.last = time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def line(self, done: int) -> str:
        dt = time.perf_counter() - self.t0
        rate = done / dt if dt > 0 else 0.0
        left = (self.total - done) / rate if rate > 0 else float("nan")
        eta = f"{left:.0f}s left" if math.isfinite(left) else ""
        return f"[{self.label}] {done}/{self.total} items  {rate:,.1f} items/s  {eta}".rstrip()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if self.tty:
            self.stream.write("\r" + self.line(done) + "\033[K")
            self.stream.flush()
        elif now - self.last >= self.every:
            print(self.line(done), file=self.stream, flush=True)
            self.last = now

    def close(self, done: int) -> None:
        if self.tty:
            self.stream.write("\r" + self.line(done) + "\033[K\n")
        else:
            print(self.line(done), file=self.stream)
        self.stream.flush()


def score_items(scorer: Scorer, items: Sequence[Item], progress: Callable[[int], None] | None = None
                ) -> list[dict]:
    """Per item: {"gold", "lls", "choice_chars" (acc_norm's divisors), "is_greedy", "pred", "acc",
    "pred_norm", "acc_norm"}."""
    out: list[dict] = []
    ctx_cache: dict[str, list[int]] = {}

    def encode(text: str) -> list[int]:  # every choice of an item encodes the same context
        ids = ctx_cache.get(text)
        if ids is None:
            if len(ctx_cache) > 4096:
                ctx_cache.clear()
            ids = ctx_cache[text] = scorer.encode(text)
        return ids

    for a in range(0, len(items), CHUNK_ITEMS):
        chunk = items[a:a + CHUNK_ITEMS]
        reqs, owner = [], []
        for j, it in enumerate(chunk):
            for ctx, cont in it.requests():
                reqs.append(encode_pair(encode, ctx, cont, scorer.prefix_id))
                owner.append(j)
        cb = None
        if progress is not None:
            cb = lambda n, a=a, k=len(chunk), r=len(reqs): progress(a + (k * n) // max(r, 1))  # noqa: E731
        res = scorer.score(reqs, progress=cb)
        per: list[list[tuple[float, bool]]] = [[] for _ in chunk]
        for j, r in zip(owner, res):
            per[j].append(r)
        for it, rs in zip(chunk, per):
            lls = np.array([r[0] for r in rs])
            lens = np.array([float(len(c)) for c in it.choices])
            pred, pred_norm = int(np.argmax(lls)), int(np.argmax(lls / lens))
            out.append({"gold": it.gold, "lls": lls.tolist(), "choice_chars": lens.tolist(),
                        "is_greedy": [r[1] for r in rs],
                        "pred": pred, "acc": float(pred == it.gold),
                        "pred_norm": pred_norm, "acc_norm": float(pred_norm == it.gold)})
    return out


def evaluate_tasks(scorer: Scorer, tasks: str | Sequence[str] = "all", limit: int | None = None,
                   data_dir: str | Path | None = None, show_progress: bool = True,
                   keep_samples: bool = False) -> dict:
    """Evaluate ``scorer`` (``load_scorer``) on ``tasks``; returns the JSON report: the model, the
    backend, and per task its lm-eval version, data file (and sha256), note, item count, metrics
    with standard errors, seconds and items/s (and per-item samples with ``keep_samples``)."""
    specs: list[TaskSpec] = resolve_tasks(tasks if isinstance(tasks, str) else list(tasks))
    root = find_data_dir(data_dir)
    report = {"model": scorer.name, "backend": scorer.backend, "model_info": scorer.info,
              "data_dir": str(root), "limit": limit, "prompt_format": "lm-evaluation-harness 0.4 "
              "task YAMLs (zero-shot, target_delimiter ' ')", "tasks": {}}
    for spec in specs:
        its = task_items(spec, root, limit)
        bar = Progress(spec.name, len(its)) if show_progress else None
        t0 = time.perf_counter()
        samples = score_items(scorer, its, bar.update if bar else None)
        dt = time.perf_counter() - t0
        if bar:
            bar.close(len(its))
        res = {"version": spec.version, "file": spec.path, "sha256": file_sha256(root / spec.path),
               "note": spec.note, "items": len(its),
               "requests": sum(len(it.choices) for it in its)}
        for metric in spec.metrics:
            xs = [s[metric] for s in samples]
            res[metric] = float(np.mean(xs))
            res[metric + "_stderr"] = mean_stderr(xs)
        res["seconds"] = dt
        res["items_per_s"] = len(its) / dt if dt > 0 else None
        if keep_samples:
            res["samples"] = samples
        report["tasks"][spec.name] = res
    return report


def format_report(report: dict) -> str:
    """The report as a table (task, version, n, acc ± stderr, acc_norm ± stderr, items/s)."""
    def pm(v, e):
        return "-" if v is None else (f"{v:.4f} ± {e:.4f}" if e is not None else f"{v:.4f}")
    lines = [f"{report['model']} ({report['backend']})",
             f"{'task':<14} {'ver':>4} {'n':>6}  {'acc':<17} {'acc_norm':<17} {'items/s':>8}"]
    for name, r in report["tasks"].items():
        lines.append(f"{name:<14} {r['version']:>4} {r['items']:>6}  "
                     f"{pm(r.get('acc'), r.get('acc_stderr')):<17} "
                     f"{pm(r.get('acc_norm'), r.get('acc_norm_stderr')):<17} "
                     f"{r['items_per_s'] or 0:>8.1f}")
    notes = {n: TASKS[n].note for n in report["tasks"] if n in ("boolq", "hellaswag")}
    for n, note in notes.items():
        lines.append(f"  {n}: {note}")
    return "\n".join(lines)
