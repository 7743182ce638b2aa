"""Continuous batching: many sequences in one Runtime, one forward step over all of them.

    eng = onebit.load(path).batch(slots=8)          # a BatchEngine (its own KV cache slots)
    eng.start()                                      # the engine thread (or call eng.step() yourself)
    req = eng.submit(ids, SamplingParams(max_tokens=50, temperature=0, logprobs=2))
    for ev in req:                                   # TokenEvent records, the last one has a finish_reason
        print(ev.token, ev.logprob)

Each step feeds every active sequence at once through ``Runtime.forward_step``: one decode token
for each generating sequence plus prompt chunks of the sequences still prefilling (at most
``prefill_chunk`` prompt tokens a step, so a long prompt never stalls the others' decoding). Every
projection is one GEMM over all rows (the packed weights are read once per step), attention runs
per sequence. A request joins at the next step and leaves (freeing its slot) when it stops, hits
its ``max_tokens`` or the context, or is cancelled. A free slot keeps its cache: a new prompt that
starts with the tokens cached there (the previous turn of a chat) skips their prefill.

The runtime is loaded with ``batch_invariant=True``: a row's logits depend only on its own
sequence (exact integer GEMM rows, per-row quantization, per-sequence attention without split-K),
so a request's tokens and logprobs are the same alone or among others, at any chunking.

Thread safety: ``submit`` / ``cancel`` / iterating a request may be called from any thread; only
the engine thread (``start``) or a single caller of ``step`` runs the model.
"""

from __future__ import annotations

import math
import numbers
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..sampling import sample_next, validate_sampling
from .runtime import EngineError, Runtime

__all__ = ["BatchEngine", "SamplingParams", "TokenEvent", "Request", "EngineBusy", "PromptTooLong",
           "EngineStats", "stop_token_ids"]

FINISH_REASONS = ("stop", "length", "cancelled", "error")
# end-of-turn specials of common chat formats: generation stops at any of them found in the vocab
END_OF_TURN = ("<|eot_id|>", "<|end_of_text|>", "<|im_end|>", "<|end|>", "<end_of_turn>",
               "<|endoftext|>", "</s>")


class EngineBusy(EngineError):
    """The engine's queue of waiting requests is full: retry later (the server answers 503)."""


class PromptTooLong(EngineError):
    """A prompt does not fit the engine's context (max_len)."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings. ``temperature=0`` is greedy; ``seed`` makes sampling
    reproducible (None: a fresh generator). ``stop_ids``: token ids that end the generation, in
    addition to the model's EOS / end-of-turn ids (``ignore_eos=True`` drops those). ``logprobs``:
    None, or n >= 0: each generated token's logprob under the model's distribution (the raw
    logits, before penalty and temperature) and the n most likely tokens. ``prompt_logprobs``:
    None, or n >= 0: the same for every prompt token after the first (no prefix reuse then)."""

    max_tokens: int = 128
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_ids: frozenset = frozenset()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self):
        validate_sampling(self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty)
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, numbers.Integral) \
                or self.max_tokens < 0:
            raise ValueError(f"max_tokens={self.max_tokens!r} is invalid: use an integer >= 0")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)
                                      or self.seed < 0):
            raise ValueError(f"seed={self.seed!r} is invalid: use None or an integer >= 0")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 <= v <= 20):
                raise ValueError(f"{name}={v!r} is invalid: use None or an integer in [0, 20]")
        ids = frozenset(self.stop_ids)
        if any(isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0 for t in ids):
            raise ValueError(f"stop_ids={sorted(self.stop_ids)!r} is invalid: use token ids >= 0")
        object.__setattr__(self, "stop_ids", ids)


TopLogprobs = tuple  # ((token id, logprob), ...), most likely first


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One record of a request's output. A generated token (``token`` not None, ``logprob`` /
    ``top_logprobs`` when asked), or the final record (``finish_reason`` set, ``token`` None):
    "stop" (a stop id was sampled: not emitted), "length" (max_tokens or the context),
    "cancelled", or "error" (``error`` says why). ``prompt_logprobs`` rides on the request's first
    record: [(token, logprob | None, top)] for every prompt token (the first has no logprob)."""

    request_id: int
    token: int | None = None
    logprob: float | None = None
    top_logprobs: TopLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: list | None = None
    error: str | None = None


@dataclass
class EngineStats:
    """Counters of one engine (read from other threads; written by the engine thread only)."""

    requests: int = 0                 # submitted and accepted
    finished: dict = field(default_factory=lambda: {r: 0 for r in FINISH_REASONS})
    rejected_busy: int = 0
    prompt_tokens: int = 0            # prefilled (the reused prefixes not included)
    reused_tokens: int = 0            # prompt tokens whose prefill a cached prefix saved
    generated_tokens: int = 0
    steps: int = 0
    busy_seconds: float = 0.0         # time spent in steps
    ttft: deque = field(default_factory=lambda: deque(maxlen=4096))  # seconds, recent requests
    ttft_buckets: tuple = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
    ttft_counts: list = field(default_factory=lambda: [0] * 11)      # histogram (+inf last)
    ttft_sum: float = 0.0
    recent: deque = field(default_factory=lambda: deque(maxlen=8192))  # (step end time, tokens)

    def tokens_per_second(self, now: float, window: float = 10.0) -> float:
        """Generated tokens per second over the last ``window`` seconds (perf_counter clock)."""
        return sum(n for t, n in list(self.recent) if t >= now - window) / window


def stop_token_ids(model) -> frozenset:
    """The ids that end a generation of ``model``: its EOS and the end-of-turn specials of common
    chat formats that its vocabulary holds."""
    ids = set(model.stop_ids)
    tok = model.tokenizer
    if tok is not None:
        for s in END_OF_TURN:
            t = tok.token_to_id(s)
            if t is not None:
                ids.add(t)
    return frozenset(ids)


class Request:
    """A submitted request: iterate it for its TokenEvents (blocking), or pass ``sink`` to
    ``submit`` to receive them on the engine thread."""

    def __init__(self, engine: "BatchEngine", rid: int, prompt: list[int], params: SamplingParams,
                 sink: Callable[[TokenEvent], None] | None):
        self.id, self.prompt, self.params, self._engine = rid, prompt, params, engine
        self._queue: queue.SimpleQueue | None = None
        if sink is None:
            self._queue = queue.SimpleQueue()
            sink = self._queue.put
        self.sink = sink
        self.submitted = time.perf_counter()
        self.first_token_time: float | None = None
        self.finish_reason: str | None = None
        # engine-thread state
        self.ids = list(prompt)          # prompt + generated tokens
        self.pos = 0                     # tokens of ids whose K/V are in the slot's cache
        self.slot = -1
        self.generated = 0
        self.rng = np.random.default_rng(params.seed)
        self.prompt_lp: list | None = None

    def cancel(self) -> None:
        self._engine.cancel(self.id)

    def __iter__(self) -> Iterator[TokenEvent]:
        if self._queue is None:
            raise RuntimeError("this request delivers its events to its sink; it cannot be iterated")
        while True:
            ev = self._queue.get()
            yield ev
            if ev.finish_reason is not None:
                return

    def tokens(self) -> list[int]:
        """Block until the request ends; its generated token ids."""
        return [ev.token for ev in self if ev.token is not None]


def _logprobs(logits: np.ndarray, token: int, n: int) -> tuple[float, TopLogprobs]:
    """log softmax(logits)[token] and the n most likely (id, logprob), float64, ties by lowest id."""
    x = logits.astype(np.float64)
    m = x.max()
    lse = m + math.log(np.exp(x - m).sum())
    top: TopLogprobs = ()
    if n > 0:
        n = min(n, x.size)
        idx = np.argpartition(-x, n - 1)[:n]
        idx = idx[np.lexsort((idx, -x[idx]))]
        top = tuple((int(i), float(x[i] - lse)) for i in idx)
    return float(x[token] - lse), top


class BatchEngine:
    """Many requests over one model: see the module docstring. ``slots``: sequences held at once
    (each with a KV cache of ``max_len`` positions, default the model's context); ``max_queue``:
    requests allowed to wait for a slot (``submit`` raises EngineBusy beyond); ``prefill_chunk``:
    prompt tokens fed per step at most (with the decode tokens of the others)."""

    def __init__(self, model, slots: int = 8, max_len: int | None = None, prefill_chunk: int = 256,
                 max_queue: int = 64):
        cfg = model.config
        for name, v, lo in (("slots", slots, 1), ("prefill_chunk", prefill_chunk, 1), ("max_queue", max_queue, 0)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
                raise ValueError(f"{name}={v!r} is invalid: use an integer >= {lo}")
        max_len = cfg.max_position_embeddings if max_len is None else max_len
        if isinstance(max_len, bool) or not isinstance(max_len, numbers.Integral) \
                or not 1 < max_len <= cfg.max_position_embeddings:
            raise ValueError(f"max_len={max_len!r} is invalid: use an integer in [2, "
                             f"{cfg.max_position_embeddings}] (the model's context)")
        self.model = model
        src = model.runtime
        self.runtime = Runtime(src.folder, batch_invariant=True, **src.options)  # own caches, same mmap'd weights
        self.runtime.reset(int(max_len), int(slots))
        self.max_len, self.slots = int(max_len), int(slots)
        self.prefill_chunk, self.max_queue = int(prefill_chunk), int(max_queue)
        self.vocab_size = cfg.vocab_size
        self.stop_ids = stop_token_ids(model)
        self.stats = EngineStats()
        self._cv = threading.Condition()
        self._pending: deque[Request] = deque()
        self._cancelled: set[int] = set()
        self._active: dict[int, Request] = {}           # slot -> request
        self._cache: list[list[int]] = [[] for _ in range(self.slots)]  # ids whose K/V a free slot holds
        self._used = [0] * self.slots                   # last use (a step counter): LRU among free slots
        self._next_id = 0
        self._thread: threading.Thread | None = None
        self._stop = False

    # -- public, any thread --------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], params: SamplingParams | None = None,
               sink: Callable[[TokenEvent], None] | None = None) -> Request:
        """Queue a request (token ids, e.g. ``Model.encode`` / ``Model.chat_ids``). Raises
        ValueError for bad ids, PromptTooLong, or EngineBusy when ``max_queue`` requests wait."""
        params = SamplingParams() if params is None else params
        ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty: generation needs at least one token (e.g. BOS)")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}): encode with this "
                             f"model's tokenizer")
        room = self.max_len - (1 if params.max_tokens > 0 else 0)
        if len(ids) > room:
            raise PromptTooLong(f"the prompt has {len(ids)} tokens but the context holds "
                                f"{self.max_len}{' with one to generate' if room < self.max_len else ''}: "
                                f"shorten the prompt (or serve with a larger --ctx)")
        with self._cv:
            if len(self._pending) >= self.max_queue + max(0, self.slots - len(self._active)):
                self.stats.rejected_busy += 1
                raise EngineBusy(f"{len(self._pending)} requests are already waiting (max_queue="
                                 f"{self.max_queue}): retry later")
            req = Request(self, self._next_id, ids, params, sink)
            self._next_id += 1
            self._pending.append(req)
            self.stats.requests += 1
            self._cv.notify_all()
        return req

    def cancel(self, request_id: int) -> None:
        """End a request at the next step (its slot is freed; a final "cancelled" record)."""
        with self._cv:
            self._cancelled.add(int(request_id))
            self._cv.notify_all()

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> bool:
        """The engine thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def active(self) -> int:
        return len(self._active)

    def start(self) -> "BatchEngine":
        """Run the engine on a daemon thread until ``close``."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="onebit-engine", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the engine thread; waiting and active requests end "cancelled"."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._cv:
            reqs = list(self._pending) + list(self._active.values())
            self._pending.clear()
            self._active.clear()
        for r in reqs:
            self._finish(r, "cancelled")

    def __enter__(self) -> "BatchEngine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompts: Iterable[Sequence[int]], params: SamplingParams | None = None) -> list[list[int]]:
        """Run ``prompts`` together (all submitted at once) and return their generated ids."""
        reqs = [self.submit(p, params) for p in prompts]
        if self._thread is None:
            while self.step():
                pass
        return [r.tokens() for r in reqs]

    # -- the engine thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._stop or self._pending or self._active or self._cancelled):
                    self._cv.wait()
                if self._stop:
                    return
            try:
                self.step()
            except Exception as e:  # the engine boundary: fail the requests in flight, keep serving
                self._fail_active(f"{type(e).__name__}: {e}")

    def _fail_active(self, msg: str) -> None:
        with self._cv:
            reqs = list(self._active.values())
            self._active.clear()
        for r in reqs:
            self._cache[r.slot] = []  # its cache may be half written
            self._finish(r, "error", msg)

    def _finish(self, r: Request, reason: str, error: str | None = None) -> None:
        if r.finish_reason is not None:
            return
        r.finish_reason = reason
        self.stats.finished[reason] += 1
        lp, r.prompt_lp = r.prompt_lp, None
        r.sink(TokenEvent(r.id, finish_reason=reason, prompt_logprobs=lp, error=error))

    def _admit(self) -> None:
        """Under the lock: apply cancellations, move waiting requests into free slots."""
        if self._cancelled:
            for slot, r in list(self._active.items()):
                if r.id in self._cancelled:
                    del self._active[slot]
                    self._release(r)
                    self._finish(r, "cancelled")
            for r in [r for r in self._pending if r.id in self._cancelled]:
                self._pending.remove(r)
                self._finish(r, "cancelled")
            self._cancelled.clear()
        free = [s for s in range(self.slots) if s not in self._active]
        while self._pending and free:
            r = self._pending.popleft()
            best, reuse = free[0], -1
            for s in free:  # the longest cached prefix, else the least recently used slot
                n = 0 if r.params.prompt_logprobs is not None else _common_prefix(self._cache[s], r.ids)
                if n > reuse or (n == reuse and self._used[s] < self._used[best]):
                    best, reuse = s, n
            free.remove(best)
            r.slot, r.pos = best, min(reuse, len(r.prompt) - 1)  # feed >= 1 token: its logits
            self.stats.reused_tokens += r.pos
            if r.params.prompt_logprobs is not None:
                r.prompt_lp = [(r.prompt[0], None, ())]
            self._active[best] = r

    def _release(self, r: Request) -> None:
        self._cache[r.slot] = r.ids[:r.pos]
        self._used[r.slot] = self.stats.steps

    def step(self) -> bool:
        """Run one forward step over every active request; returns False when there was nothing
        to do (no request active or waiting)."""
        with self._cv:
            self._admit()
            work = sorted(self._active.values(), key=lambda r: r.id)  # prefill in arrival order
        if not work:
            return False
        t0 = time.perf_counter()
        seqs, rows, plan, budget, nrows = [], [], [], self.prefill_chunk, 0
        for r in work:
            n_prompt = len(r.prompt)
            if r.pos >= n_prompt:               # generating: one token
                take = 1
            elif budget > 0:                    # prefilling: a chunk of what is left
                take = min(n_prompt - r.pos, budget)
                budget -= take
            else:
                continue
            seqs.append((r.ids[r.pos:r.pos + take], r.pos, r.slot))
            ends = r.pos + take >= n_prompt     # the last row's logits give the next token
            first = nrows
            if r.params.prompt_logprobs is not None and r.pos < n_prompt:
                rows.extend(range(nrows, nrows + take))
                plan.append((r, take, ends, first, len(rows) - take))
            else:
                if ends:
                    rows.append(nrows + take - 1)
                plan.append((r, take, ends, first, len(rows) - 1))
            nrows += take
        logits = self.runtime.forward_step(seqs, rows)
        self.stats.steps += 1
        generated0 = self.stats.generated_tokens
        finished = []
        for r, take, ends, _first, li in plan:
            p0, r.pos = r.pos, r.pos + take
            if p0 < len(r.prompt):
                self.stats.prompt_tokens += take
                if r.params.prompt_logprobs is not None:
                    for j in range(take):  # row j predicts ids[p0 + j + 1]
                        if p0 + j + 1 < len(r.prompt):
                            t = r.prompt[p0 + j + 1]
                            lp, top = _logprobs(logits[li + j], t, r.params.prompt_logprobs)
                            r.prompt_lp.append((t, lp, top))
                    li += take - 1
            if not ends:
                continue
            if self._sample(r, logits[li]):
                finished.append(r)
        if finished:
            with self._cv:
                for r in finished:
                    if self._active.get(r.slot) is r:
                        del self._active[r.slot]
                        self._release(r)
        t1 = time.perf_counter()
        self.stats.busy_seconds += t1 - t0
        self.stats.recent.append((t1, self.stats.generated_tokens - generated0))
        return True

    def _sample(self, r: Request, logits: np.ndarray) -> bool:
        """Sample r's next token from ``logits``, emit it; True when r is finished."""
        p = r.params
        if p.max_tokens == 0:
            self._finish(r, "length")
            return True
        tok = sample_next(logits, p.temperature, p.top_k, p.top_p, r.rng, min_p=p.min_p,
                          repetition_penalty=p.repetition_penalty,
                          context=r.ids if p.repetition_penalty != 1.0 else ())
        if tok in p.stop_ids or (not p.ignore_eos and tok in self.stop_ids):
            self._first_token(r)
            self._finish(r, "stop")
            return True
        lp = top = None
        if p.logprobs is not None:
            lp, top = _logprobs(logits, tok, p.logprobs)
        r.ids.append(tok)
        r.generated += 1
        self.stats.generated_tokens += 1
        plp, r.prompt_lp = r.prompt_lp, None
        self._first_token(r)
        r.sink(TokenEvent(r.id, tok, lp, top, prompt_logprobs=plp))
        if r.generated >= p.max_tokens or len(r.ids) >= self.max_len:
            self._finish(r, "length")
            return True
        return False

    def _first_token(self, r: Request) -> None:
        if r.first_token_time is not None:
            return
        r.first_token_time = time.perf_counter()
        s, dt = self.stats, r.first_token_time - r.submitted
        s.ttft.append(dt)
        s.ttft_sum += dt
        i = next((i for i, b in enumerate(s.ttft_buckets) if dt <= b), len(s.ttft_buckets))
        s.ttft_counts[i] += 1


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x, y = np.asarray(a[:n]), np.asarray(b[:n])
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else n
