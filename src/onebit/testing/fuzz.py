"""Fuzz harness for onebit's loaders: mutated model files, each loaded the way the CLI loads it, in
a sandboxed worker process.

    from onebit.testing import fuzz
    report = fuzz.run(["packed", "gguf"], cases=30, seed=0)
    report.counts            # {format: {outcome: n}}
    report.failures          # [CaseResult] of the failure outcomes

A case is a tiny seed model (built once per run by onebit's own writers: ``write_random_model``,
``convert`` to GGUF / HF, ``save_model``, a llama2.c file) plus one to three mutations drawn from
the case's own RNG (``random.Random(f"{seed}:{format}:{index}")``, so any case can be rebuilt
alone: ``make_case``). Mutations: byte flips, truncation, header / metadata integers set to
extremes (0, -1, 2^31, 2^63-1, huge floats, wrong types), JSON value edits (types, huge or
negative numbers, deep nesting, missing / extra keys), tensor shape / dtype / name edits in
safetensors and GGUF headers, self-consistent config edits (a t1_6 folder whose config says i2,
fewer layers than stored), file swaps and removals.

The mutators are in ``onebit.testing.mutate``. Each case runs in a worker (a fork-server child
whose server imported torch and the loaders once, ``onebit.testing._preload``; reused across cases
and restarted when it dies)
under a timeout and an address-space limit (RLIMIT_AS), so a hang, a signal or a giant allocation
is an outcome instead of a dead machine. What a case runs (``load_case``):

- ``engine`` (packed folders, GGUF files, HF folders: what ``onebit generate`` runs):
  ``onebit.load(path)``, encode + decode a prompt when there is a tokenizer, logits of a few
  tokens, two greedy tokens; a packed folder is also read by ``onebit convert``'s reader
  (``read_model`` + ``reference_logits``).
- ``checkpoint`` (training model folders): ``checkpoint.load_model`` + a forward.
- ``llama2c`` (.bin): ``load_llama2c`` + a forward.

Outcomes: ``ok`` (a running model), ``error`` (a ValueError subclass whose message names the
input path: what the CLI prints as ``onebit CMD: error: ...``), and the failures: ``signal``,
``timeout``, ``MemoryError``, ``RecursionError``, ``ZeroDivisionError``, ``other-exception``
(any other type, tokenizers' PanicException included), ``unnamed-error`` (a ValueError that does
not name the input) and ``half-written`` (a failed load left a temp file in the import cache).
"""

from __future__ import annotations

import collections
import json
import multiprocessing as mp
import os
import random
import resource
import shutil
import signal
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from multiprocessing import connection
from pathlib import Path

import numpy as np

from . import mutate

__all__ = ["FORMATS", "OUTCOMES", "FAILURES", "Case", "CaseResult", "Report", "build_seeds",
           "make_case", "load_case", "run", "run_cases"]

FORMATS = ("packed", "gguf", "checkpoint", "hf", "json", "llama2c")
OUTCOMES = ("ok", "error", "signal", "timeout", "MemoryError", "RecursionError", "ZeroDivisionError",
            "other-exception", "unnamed-error", "half-written")
FAILURES = OUTCOMES[2:]
PROMPT = "Once upon a time there was a fox"
STARTUP_TIMEOUT = 300  # seconds for a worker to start (the fork server imports torch once)

# =============================================================================================
# Seeds: tiny models written by onebit's own writers
# =============================================================================================

_TEXT = ["Once upon a time there was a little fox who lived in the green forest.",
         "The fox liked to run and jump over the old logs by the river.",
         "One day the fox met a bear, and they became good friends."] * 10


def _tokenizer(vocab: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_TEXT, trainer)
    return tok.to_str()


def _packed_seed(dst: Path, tok: str, layout: str, embedding: str, **kw) -> Path:
    from ..config import ModelConfig
    from ..engine.synth import write_random_model

    # hidden 160 / intermediate 320: i2 and t1_6 rows differ in size (64 vs 32, 96 vs 64 bytes),
    # so a layout mix-up reads past a tensor unless it is caught
    base = dict(vocab_size=320, hidden_size=160, intermediate_size=320, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                bos_token_id=0, eos_token_id=1)
    base.update(kw)
    folder = write_random_model(dst, ModelConfig(**base), layout=layout, embedding=embedding, seed=1)
    (folder / "tokenizer.json").write_text(tok, encoding="utf-8")
    return folder


def _llama2c_seed(dst: Path) -> Path:
    from ..formats.llama2c import HEADER, Llama2cHeader

    h = Llama2cHeader(dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64,
                      seq_len=32, shared_classifier=True)
    rng = np.random.default_rng(2)
    n = (h.expected_bytes() - HEADER.size) // 4
    w = (rng.standard_normal(n, dtype=np.float32) * 0.1).astype("<f4")
    dst.write_bytes(HEADER.pack(h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads,
                                h.vocab_size, h.seq_len) + w.tobytes())
    return dst


def _hf_llama(bitnet: Path, dst: Path) -> Path:
    """transformers' Llama + quant_method bitnet ("llama-packed", HF1BitLLM): the BitNet folder's
    tensors without the sub-norms, weight_scale inverted (that layout divides by it)."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(bitnet, dst)
    t = load_file(str(dst / "model.safetensors"))
    t = {k: (1.0 / v).astype(np.float32) if k.endswith(".weight_scale") else v for k, v in t.items()
         if not k.endswith(("attn_sub_norm.weight", "ffn_sub_norm.weight"))}
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama")
    cfg["quantization_config"]["linear_class"] = "bitlinear"
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def build_seeds(root: str | os.PathLike, formats=FORMATS) -> dict[str, Path]:
    """Write the seed models the requested formats need into ``root``: ``{name: path}``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    seeds: dict[str, Path] = {}
    tok = _tokenizer(300)
    (root / "tokenizer-big.json").write_text(_tokenizer(600), encoding="utf-8")
    seeds["tokenizer-big"] = root / "tokenizer-big.json"
    want = set(formats)
    if want & {"packed", "json"}:
        seeds["packed-i2"] = _packed_seed(root / "packed-i2", tok, "i2", "i8")
        # the geometry of the SIGSEGV of issue 15: read as i2, each t1_6 row of 1280 weights is
        # 64 bytes short, 80 KB past a tensor in all, enough to leave the mapped file
        seeds["packed-t1_6"] = _packed_seed(root / "packed-t1_6", tok, "t1_6", "f16", hidden_size=1280,
                                            intermediate_size=1280, num_hidden_layers=1,
                                            num_attention_heads=10, num_key_value_heads=5)
        seeds["packed-inner"] = _packed_seed(root / "packed-inner", tok, "i2", "i4", norm_placement="inner",
                                             tie_word_embeddings=False, hidden_act="silu")
    if want & {"gguf", "hf", "json"}:
        from ..formats.convert import convert

        # every K a multiple of 256 (TQ blocks), SiLU (llama.cpp's bitnet graph)
        src = _packed_seed(root / "gguf-src", tok, "i2", "f16", hidden_size=256, intermediate_size=256,
                           hidden_act="silu")
        if "gguf" in want:
            for q in ("tq2_0", "tq1_0", "i2_s"):
                convert(src, root / f"m-{q}.gguf", f"gguf-{q}", verify=False)
                seeds[f"gguf-{q}"] = root / f"m-{q}.gguf"
        if want & {"hf", "json"}:
            convert(src, root / "hf-bitnet", "hf", verify=False)
            seeds["hf-bitnet"] = root / "hf-bitnet"
            seeds["hf-llama"] = _hf_llama(root / "hf-bitnet", root / "hf-llama")
    if want & {"checkpoint", "json"}:
        import torch

        from ..checkpoint import save_model
        from ..config import ModelConfig
        from ..model import CausalLM

        cfg = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        torch.manual_seed(0)
        seeds["checkpoint"] = save_model(root / "checkpoint", CausalLM(cfg), cfg, tokenizer_json=tok)
    if "llama2c" in want:
        seeds["llama2c"] = _llama2c_seed(root / "model.bin")
    return seeds


# =============================================================================================
# Cases
# =============================================================================================

@dataclass
class Case:
    fmt: str
    index: int
    path: Path     # what the loader is given (a folder or a file)
    kind: str      # "engine", "checkpoint" or "llama2c"
    what: str      # the mutations, for the report


def _folder_ops(rng: random.Random, folder: Path, seeds: dict[str, Path], family: str, json_only: bool):
    weights = folder / "model.safetensors"
    files = [p for p in (folder / "config.json", weights, folder / "tokenizer.json") if p.exists()]
    ops = ["json-config", "json-config", "consistent", "consistent", "json-tokenizer"]
    if not json_only:
        ops += ["flip", "flip", "truncate", "st", "st", "st", "st", "swap", "remove"]
    op = rng.choice(ops)
    if op == "json-config":
        return mutate.mutate_json_file(rng, folder / "config.json")
    if op == "consistent":
        return mutate.config_consistent(rng, folder)
    if op == "json-tokenizer":
        if rng.random() < 0.3:  # a tokenizer_config.json beside it (chat template, specials)
            (folder / "tokenizer_config.json").write_text(
                mutate.dump({"chat_template": rng.choice(["{{", "{% for %}", 7, None, mutate.DEEP])}))
            return "tokenizer_config.json: broken chat_template"
        return mutate.mutate_json_file(rng, folder / "tokenizer.json") if (folder / "tokenizer.json").exists() \
            else "no tokenizer.json"
    if op == "flip":
        p = weights if rng.random() < 0.6 else rng.choice(files)
        return mutate.flip(rng, p) if p.exists() else "nothing to flip"
    if op == "truncate":
        p = weights if rng.random() < 0.6 else rng.choice(files)
        return mutate.truncate(rng, p) if p.exists() else "nothing to truncate"
    if op == "st":
        return mutate.st_mutate(rng, weights) if weights.exists() else "no weights"
    if op == "remove":
        p = rng.choice(files)
        p.unlink()
        return f"{p.name} removed"
    # swap a file for another seed's (a model of the other layout / family, a bigger tokenizer)
    name = rng.choice(["config.json", "model.safetensors", "tokenizer.json"])
    others = [s for k, s in seeds.items() if k.startswith(family) and s != folder and s.is_dir()]
    if name == "tokenizer.json" and rng.random() < 0.6:
        shutil.copy(seeds["tokenizer-big"], folder / name)
        return "tokenizer.json swapped for a 600-token one"
    src = rng.choice(others) / name if others else None
    if src is None or not src.exists():
        return "no file to swap"
    shutil.copy(src, folder / name)
    return f"{name} swapped with {src.parent.name}'s"


def _guarded(fn, *args) -> str:
    """A mutation applied to what earlier ones left (maybe nothing parseable): if the mutator itself
    trips, the case goes on with the input as it is (deterministically: the RNG is not reseeded)."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - a harness-side problem, never an outcome
        return f"(mutation skipped: {type(e).__name__})"


def make_case(fmt: str, index: int, seed: int, seeds: dict[str, Path], dst: str | os.PathLike) -> Case:
    """Case ``index`` of ``fmt`` (deterministic in ``seed``): the seed copied to folder ``dst`` and
    mutated."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is unknown; use one of {FORMATS}")
    rng = random.Random(f"{seed}:{fmt}:{index}")
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    whats = []
    n_ops = rng.choice([1, 1, 1, 2, 2, 3])
    if fmt in ("gguf", "llama2c"):
        src = seeds[rng.choice([k for k in seeds if k.startswith(fmt)])]
        path = dst / src.name
        shutil.copy(src, path)
        for _ in range(n_ops):
            op = rng.choice(["flip", "truncate", "hdr", "hdr", "hdr", "hdr"])
            fn = (mutate.flip if op == "flip" else mutate.truncate if op == "truncate"
                  else mutate.gguf_mutate if fmt == "gguf" else mutate.llama2c_mutate)
            whats.append(_guarded(fn, rng, path))
            if not path.exists() or path.stat().st_size == 0:
                break
        return Case(fmt, index, path, "engine" if fmt == "gguf" else "llama2c", "; ".join(whats))
    family = {"packed": "packed", "checkpoint": "checkpoint", "hf": "hf"}.get(fmt) or \
        rng.choice(["packed", "checkpoint", "hf"])
    src = seeds[rng.choice([k for k in seeds if k.startswith(family)])]
    path = dst / src.name
    shutil.copytree(src, path)
    for _ in range(n_ops):
        whats.append(_guarded(_folder_ops, rng, path, seeds, family, fmt == "json"))
    return Case(fmt, index, path, "checkpoint" if family == "checkpoint" else "engine", "; ".join(whats))


# =============================================================================================
# Running one case (in a worker)
# =============================================================================================

def load_case(kind: str, path: str | os.PathLike) -> None:
    """Load ``path`` the way the CLI does and run a few tokens; raises what the loaders raise."""
    path = Path(path)
    if kind == "engine":
        import onebit

        m = onebit.load(path)
        V, ctx = m.config.vocab_size, m.config.max_position_embeddings
        ids = m.encode(PROMPT) if m.tokenizer is not None else [m.bos_id, 1 % V, 2 % V, 3 % V]
        ids = ids[:max(1, min(8, ctx - 2))]  # what the model's context holds (a valid choice)
        if m.tokenizer is not None:
            m.decode(ids)
        m.logits(ids)
        list(m.generate_ids(ids, min(2, ctx - len(ids)), temperature=0))
        if (path / "config.json").is_file() and "packed" in json.loads((path / "config.json").read_text()):
            from ..formats.convert import read_model  # `onebit convert`'s reader of the same folder
            from ..formats.model_io import reference_logits

            reference_logits(read_model(path), ids)
    elif kind == "checkpoint":
        import torch

        from ..checkpoint import load_model
        from ..generate import generate_text

        model, tok, _ = load_model(path)
        ctx = model.config.max_position_embeddings
        if tok is None or ctx < 16:
            with torch.no_grad():
                model(torch.tensor([[0, 1, 2][:ctx]]) % model.config.vocab_size)
        else:
            "".join(generate_text(model, tok, PROMPT, 2, temperature=0.0))
    elif kind == "llama2c":
        import torch

        from ..formats.llama2c import load_llama2c

        model = load_llama2c(path)
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3][:model.config.max_position_embeddings]]) % model.config.vocab_size)
    elif kind.startswith("selftest-"):  # the harness's own tests: each failure class on purpose
        what = kind.split("-", 1)[1]
        if what == "segv":
            import ctypes

            ctypes.string_at(0)
        elif what == "hang":
            time.sleep(3600)
        elif what == "alloc":
            bytearray(64 << 30)
        elif what == "unnamed":
            raise ValueError("an error that does not say which file")
        elif what == "named":
            raise ValueError(f"'{path}' is broken")
        elif what == "panic":
            from tokenizers import Tokenizer

            Tokenizer.from_str(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0},
                                                     "merges": ["a a"], "continuing_subword_prefix": "None"}}))
        elif what == "recursion":
            json.loads("[" * 100_000 + "]" * 100_000)
    else:
        raise ValueError(f"kind {kind!r} is unknown")


def _outcome(kind: str, path: str, cache: Path) -> tuple[str, str]:
    try:
        load_case(kind, path)
        outcome, detail = "ok", ""
    except ValueError as e:  # every onebit error; it must say which input is at fault
        msg = f"{type(e).__name__}: {e}"
        outcome, detail = ("error" if str(path) in str(e) else "unnamed-error"), msg
    except (MemoryError, RecursionError, ZeroDivisionError) as e:
        outcome, detail = type(e).__name__, "".join(traceback.format_exception(e)[-4:])
    except BaseException as e:  # noqa: BLE001 - the harness reports every type (PanicException too)
        if isinstance(e, KeyboardInterrupt):
            raise
        outcome, detail = "other-exception", "".join(traceback.format_exception(e)[-6:])
    leftover = [p.name for p in (cache.rglob(".*") if cache.is_dir() else [])]
    if leftover and outcome in ("ok", "error"):
        outcome, detail = "half-written", f"left in the import cache: {leftover[:3]}"
    shutil.rmtree(cache, ignore_errors=True)
    return outcome, detail[-2000:]


def _worker_main(conn, mem_bytes: int, cache: str, log: str) -> None:
    os.environ["ONEBIT_CACHE"] = cache
    os.environ["ONEBIT_NUM_THREADS"] = "1"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)  # Rust panics print here
    os.dup2(fd, 2)
    os.close(fd)
    if mem_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))
    warnings.simplefilter("ignore")
    try:
        import torch

        torch.set_num_threads(1)  # tiny models: intra-op threads only add overhead
    except ImportError:
        pass
    conn.send("ready")  # the case timer starts now, not while the fork server boots
    while True:
        job = conn.recv()
        if job is None:
            return
        conn.send(_outcome(job[0], job[1], Path(cache) / "converted"))


# =============================================================================================
# The pool
# =============================================================================================

@dataclass
class CaseResult:
    fmt: str
    index: int
    outcome: str
    what: str
    detail: str = ""
    seconds: float = 0.0


@dataclass
class Report:
    counts: dict[str, collections.Counter] = field(default_factory=dict)
    failures: list[CaseResult] = field(default_factory=list)
    results: list[CaseResult] = field(default_factory=list)
    seconds: float = 0.0

    def table(self) -> str:
        """Markdown: one row per format, one column per outcome seen."""
        cols = [o for o in OUTCOMES if any(c[o] for c in self.counts.values())] or ["ok"]
        lines = ["| format | cases | " + " | ".join(cols) + " |",
                 "|---|---:|" + "---:|" * len(cols)]
        for fmt, c in self.counts.items():
            lines.append(f"| {fmt} | {sum(c.values())} | " + " | ".join(str(c[o]) for o in cols) + " |")
        return "\n".join(lines)


class _Worker:
    def __init__(self, ctx, mem_bytes: int, workdir: Path, n: int):
        self.cache = str(workdir / f"cache{n}")
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, daemon=True,
                                args=(child, mem_bytes, self.cache, str(workdir / f"worker{n}.log")))
        self.proc.start()
        child.close()
        self.conn, self.case, self.t0, self.ready, self.born = parent, None, 0.0, False, time.perf_counter()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()


def run(formats=FORMATS, cases: int = 30, seed: int = 0, workers: int = 2, timeout: float = 60.0,
        mem_gib: float = 4.0, workdir: str | os.PathLike | None = None, keep: str | os.PathLike | None = None,
        progress=None) -> Report:
    """Run ``cases`` mutated inputs of each of ``formats`` through ``load_case`` on ``workers``
    sandboxed processes (``timeout`` seconds and ``mem_gib`` GiB of address space each). ``keep``:
    a folder that receives the input of every failing case. ``progress(done, total)`` is called
    after each case."""
    formats = list(formats)
    for f in formats:
        if f not in FORMATS:
            raise ValueError(f"format {f!r} is unknown; use one of {FORMATS}")
    t_start = time.perf_counter()
    own = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="onebit-fuzz-") if own else workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        seeds = build_seeds(workdir / "seeds", formats)
        makers = [lambda f=f, i=i: make_case(f, i, seed, seeds, workdir / "cases" / f"{f}-{i}")
                  for i in range(cases) for f in formats]
        report = run_cases(makers, formats, workers, timeout, mem_gib, workdir, keep, progress)
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    report.seconds = time.perf_counter() - t_start
    return report


def run_cases(makers, formats, workers: int = 2, timeout: float = 60.0, mem_gib: float = 4.0,
              workdir: str | os.PathLike | None = None, keep: str | os.PathLike | None = None,
              progress=None) -> Report:
    """The pool: ``makers`` are callables returning a ``Case`` (built when a worker is free; the
    case's folder, ``case.path.parent``, is deleted after its result). Reused by ``run`` and by
    the harness's own tests (cases that crash, hang or allocate on purpose)."""
    t_start = time.perf_counter()
    workdir = Path(workdir or tempfile.mkdtemp(prefix="onebit-fuzz-"))
    report = Report(counts={f: collections.Counter() for f in formats})
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["onebit.testing._preload"])  # torch etc. once, not per worker
    mem = int(mem_gib * (1 << 30))
    todo = collections.deque(makers)
    total, done = len(todo), 0
    pool: list[_Worker] = []

    def finish(w: _Worker, outcome: str, detail: str) -> None:
        nonlocal done
        case: Case = w.case
        r = CaseResult(case.fmt, case.index, outcome, case.what, detail, time.perf_counter() - w.t0)
        report.counts.setdefault(case.fmt, collections.Counter())[outcome] += 1
        report.results.append(r)
        if outcome in FAILURES:
            report.failures.append(r)
            if keep is not None:
                dst = Path(keep) / f"{case.fmt}-{case.index}"
                shutil.rmtree(dst, ignore_errors=True)
                shutil.copytree(case.path.parent, dst)
        shutil.rmtree(case.path.parent, ignore_errors=True)
        w.case = None
        done += 1
        if progress:
            progress(done, total)

    try:
        pool = [_Worker(ctx, mem, workdir, n) for n in range(max(1, workers))]
        while todo or any(w.case for w in pool):
            for w in pool:
                if w.ready and w.case is None and todo:
                    w.case = todo.popleft()()
                    w.t0 = time.perf_counter()
                    w.conn.send((w.case.kind, str(w.case.path)))
            booting = [w for w in pool if not w.ready]
            for w in booting:
                if time.perf_counter() - w.born > STARTUP_TIMEOUT:
                    raise RuntimeError(f"a fuzz worker did not start in {STARTUP_TIMEOUT} s (exit code "
                                       f"{w.proc.exitcode}); see {workdir}/worker*.log")
            busy = [w for w in pool if w.case is not None]
            wait = min([w.t0 + timeout for w in busy] + [time.perf_counter() + 1.0]) - time.perf_counter()
            ready = connection.wait([w.conn for w in busy + booting], timeout=max(0.05, wait))
            for w in booting:
                if w.conn in ready:
                    try:
                        w.ready = w.conn.recv() == "ready"
                    except (EOFError, OSError):
                        raise RuntimeError(f"a fuzz worker died while starting (exit code "
                                           f"{w.proc.exitcode}); see {workdir}/worker*.log") from None
            for i, w in enumerate(pool):
                if w.case is None:
                    continue
                if w.conn in ready:
                    try:
                        outcome, detail = w.conn.recv()
                        finish(w, outcome, detail)
                        continue
                    except (EOFError, OSError):
                        w.proc.join(5)
                        code = w.proc.exitcode
                        name = signal.Signals(-code).name if code and code < 0 else f"exit {code}"
                        finish(w, "signal", f"the worker died: {name}")
                elif time.perf_counter() - w.t0 > timeout:
                    finish(w, "timeout", f"no result after {timeout:.0f} s")
                else:
                    continue
                w.kill()  # dead or hung: a fresh one from the fork server
                pool[i] = _Worker(ctx, mem, workdir, i)
    finally:
        for w in pool:
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                pass
            w.kill()
    report.seconds = time.perf_counter() - t_start
    return report
