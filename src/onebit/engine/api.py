"""``onebit.load(path)`` -> ``Model``: generate, stream and chat on a packed model, without torch.

    m = onebit.load("model_dir")
    m.generate("Once upon a time", max_new_tokens=50, temperature=0)   # -> str
    for piece in m.stream("Once upon a time"): print(piece, end="")
    m.chat([{"role": "user", "content": "Hi"}])                        # chat template
    m.generate(["a", "b"])                             # -> [str, str], decoded as one batch
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from ..sampling import sample_next, validate_sampling
from ..streaming import stream_text
from .runtime import EngineError, Runtime

__all__ = ["Model", "load", "BITNET_CHAT_TEMPLATE"]

# microsoft/bitnet-b1.58-2B-4T's format (BITNET.md §4): "Role: content<|eot_id|>" turns, the
# first one after <|begin_of_text|>, joined by newlines; generation continues "Assistant: ".
# (Newlines are written as expressions: transformers renders with trim_blocks, as we do.)
BITNET_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ m['role'] | capitalize }}: {{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\nAssistant: ' }}{% endif %}"
)


def _tokenizer_config(folder: Path) -> dict:
    from ..jsonio import read_json

    p = folder / "tokenizer_config.json"
    if not p.is_file():
        return {}
    cfg = read_json(p, EngineError, fix="fix or remove it")
    return cfg if isinstance(cfg, dict) else {}


class Model:
    """A packed model with its tokenizer. One generation at a time (the KV cache is shared)."""

    def __init__(self, runtime: Runtime, tokenizer=None):
        self.runtime, self.tokenizer, self.config = runtime, tokenizer, runtime.config
        tc = _tokenizer_config(runtime.folder)
        tmpl = tc.get("chat_template")
        self.chat_template = tmpl if isinstance(tmpl, str) else BITNET_CHAT_TEMPLATE
        self.bos_id, self.eos_id = self.config.bos_token_id, self.config.eos_token_id
        self.stop_ids = {self.eos_id}
        if tokenizer is not None:
            for special in ("<|eot_id|>", "<|end_of_text|>"):
                tid = tokenizer.token_to_id(special)
                if tid is not None:
                    self.stop_ids.add(tid)

    # -- tokens ------------------------------------------------------------------------------
    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise EngineError(f"'{self.runtime.folder}' has no tokenizer.json: pass token ids, or "
                              f"copy the tokenizer the model was trained with into the folder")
        return self.tokenizer

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"prompt must be a str (or a list of token ids), got {type(text).__name__}")
        tok = self._need_tokenizer()
        with self._tokenizer_errors():
            ids = tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos else []) + list(ids)

    def decode(self, ids: Sequence[int]) -> str:
        tok = self._need_tokenizer()
        with self._tokenizer_errors():
            return tok.decode(list(ids))

    @contextlib.contextmanager
    def _tokenizer_errors(self):
        """A Rust panic in the tokenizers library (a BaseException) as an error naming the file."""
        from ..jsonio import is_panic

        try:
            yield
        except BaseException as e:
            if not is_panic(e):
                raise
            raise EngineError(f"'{self.runtime.folder / 'tokenizer.json'}' failed on this text "
                              f"({str(e)[:160]}); the tokenizer is broken: copy the one the model "
                              f"was trained with") from None

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32 logits [T, V] of every position of ``ids`` (a fresh cache)."""
        ids = list(ids)
        self.runtime.reset(max(len(ids), 1))
        return self.runtime.forward(ids, 0, last_only=False)

    # -- generation --------------------------------------------------------------------------
    def generate_ids(self, ids: Sequence[int], max_new_tokens: int = 128, temperature: float = 0.8,
                     top_k: int | None = None, top_p: float | None = None,
                     min_p: float | None = None, repetition_penalty: float = 1.0,
                     seed: int | None = None, stop_ids: Iterable[int] | None = None) -> Iterator[int]:
        """Yield new token ids continuing ``ids``; stops at a stop id (not yielded)."""
        ids = [int(t) for t in ids]
        V, ctx = self.config.vocab_size, self.config.max_position_embeddings
        if not ids:
            raise ValueError("the prompt is empty: generation needs at least one token (e.g. BOS)")
        if any(not 0 <= t < V for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {V}): encode with this model's tokenizer")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) \
                or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: use an integer >= 0")
        if len(ids) + max_new_tokens > ctx:
            raise ValueError(f"the prompt has {len(ids)} tokens and max_new_tokens={max_new_tokens}, "
                             f"but the model's context is {ctx}: shorten one of them")
        validate_sampling(temperature, top_k, top_p, min_p, repetition_penalty)
        stop = set(self.stop_ids if stop_ids is None else stop_ids)
        return self._generate(ids, max_new_tokens, temperature, top_k, top_p, min_p,
                              repetition_penalty, seed, stop)

    def _generate(self, ids, max_new_tokens, temperature, top_k, top_p, min_p, rep, seed, stop):
        if max_new_tokens == 0:
            return
        rng = np.random.default_rng(seed)
        rt = self.runtime
        rt.reset(len(ids) + max_new_tokens)
        logits = rt.forward(ids, 0)
        context = list(ids)
        for i in range(max_new_tokens):
            token = sample_next(logits, temperature, top_k, top_p, rng, min_p=min_p,
                                repetition_penalty=rep, context=context)
            if token in stop:
                return
            yield token
            context.append(token)
            if i + 1 < max_new_tokens:
                logits = rt.forward([token], len(context) - 1)

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.encode(prompt)
        return [int(t) for t in prompt]

    def stream(self, prompt: str | Sequence[int], max_new_tokens: int = 128,
               stop: Sequence[str] | None = None, **sampling) -> Iterator[str]:
        """Yield text pieces as they are generated (concatenation = the completion).

        ``stop``: strings that end the generation (not included). Other keyword arguments as
        ``generate_ids`` (temperature, top_k, top_p, min_p, repetition_penalty, seed).
        """
        tok = self._need_tokenizer()
        pieces = stream_text(tok, self.generate_ids(self._prompt_ids(prompt), max_new_tokens, **sampling))
        if not stop:
            yield from pieces
            return
        stop = [s for s in stop if s]
        text, emitted = "", 0
        hold = max(len(s) for s in stop) - 1 if stop else 0
        try:
            for piece in pieces:
                text += piece
                cut = min((text.find(s) for s in stop if s in text), default=-1)
                if cut >= 0:
                    if cut > emitted:
                        yield text[emitted:cut]
                    return
                safe = len(text) - hold  # a stop string may still be forming in the tail
                if safe > emitted:
                    yield text[emitted:safe]
                    emitted = safe
            if len(text) > emitted:
                yield text[emitted:]
        finally:
            pieces.close()

    def generate(self, prompt: str | Sequence[int] | list[str], max_new_tokens: int = 128,
                 temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
                 min_p: float | None = None, repetition_penalty: float = 1.0,
                 stop: Sequence[str] | None = None, seed: int | None = None) -> str | list[str]:
        """The completion of ``prompt`` (text, or token ids); a list of prompts gives a list.

        ``temperature=0`` is greedy. ``seed`` makes sampling reproducible.
        """
        kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                  min_p=min_p, repetition_penalty=repetition_penalty, stop=stop, seed=seed)
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            ids = [self.encode(p) for p in prompt]
            outs = self.generate_ids_batch(ids, max_new_tokens, temperature=temperature, top_k=top_k,
                                           top_p=top_p, min_p=min_p,
                                           repetition_penalty=repetition_penalty, seed=seed)
            texts = [self.decode(o) for o in outs]
            stops = [x for x in (stop or []) if x]
            return [t[:min((t.find(x) for x in stops if x in t), default=len(t))] for t in texts]
        return "".join(self.stream(prompt, **kw))

    def generate_ids_batch(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 128,
                           temperature: float = 0.8, top_k: int | None = None,
                           top_p: float | None = None, min_p: float | None = None,
                           repetition_penalty: float = 1.0, seed: int | None = None,
                           stop_ids: Iterable[int] | None = None) -> list[list[int]]:
        """Batched generation: each prompt is prefilled alone, then every decode step runs the
        unfinished sequences together (one GEMM per projection instead of one GEMV per sequence).
        Each sequence samples with its own ``np.random.default_rng(seed)``, and the batched logits
        are bit-identical to one sequence alone, so the result equals ``generate_ids`` per prompt.
        """
        prompts = [[int(t) for t in p] for p in prompts]
        if not prompts:
            return []
        for p in prompts:  # the same checks as one prompt (raises before any work)
            self.generate_ids(p, max_new_tokens, temperature, top_k, top_p, min_p,
                              repetition_penalty, seed, stop_ids).close()
        stop = set(self.stop_ids if stop_ids is None else stop_ids)
        B, rt = len(prompts), self.runtime
        if max_new_tokens == 0:
            return [[] for _ in prompts]
        rt.reset(max(len(p) for p in prompts) + max_new_tokens, slots=B)
        logits = {b: rt.forward(p, 0, slot=b) for b, p in enumerate(prompts)}
        rngs = [np.random.default_rng(seed) for _ in prompts]
        ctx = [list(p) for p in prompts]
        outs: list[list[int]] = [[] for _ in prompts]
        active = list(range(B))
        while active:
            still = []
            for b in active:
                tok = sample_next(logits[b], temperature, top_k, top_p, rngs[b], min_p=min_p,
                                  repetition_penalty=repetition_penalty, context=ctx[b])
                if tok in stop:
                    continue
                outs[b].append(tok)
                ctx[b].append(tok)
                if len(outs[b]) < max_new_tokens:
                    still.append(b)
            active = still
            if active:
                rows = rt.forward_batch([ctx[b][-1] for b in active], [len(ctx[b]) - 1 for b in active],
                                        active)
                logits = dict(zip(active, rows))
        return outs

    # -- chat --------------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` [{"role", "content"}] with the model's Jinja chat template."""
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)):
                raise ValueError(f"message {i} must be {{'role': str, 'content': str}}, got {m!r}")
        tok = self._need_tokenizer()
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        try:
            tmpl = env.from_string(self.chat_template)
            return tmpl.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                               bos_token=tok.id_to_token(self.bos_id) or "",
                               eos_token=tok.id_to_token(self.eos_id) or "")
        except jinja2.TemplateError as e:
            raise EngineError(f"the chat template of '{self.runtime.folder}' failed ({e}); fix "
                              f"chat_template in tokenizer_config.json") from None

    def chat_ids(self, messages: Sequence[dict]) -> list[int]:
        text = self.apply_chat_template(messages)
        # the template writes the specials as text: encode them as special tokens
        return list(self._need_tokenizer().encode(text, add_special_tokens=False).ids)

    def stream_chat(self, messages: Sequence[dict], max_new_tokens: int = 256, **kw) -> Iterator[str]:
        return self.stream(self.chat_ids(messages), max_new_tokens, **kw)

    def chat(self, messages: Sequence[dict], max_new_tokens: int = 256, **kw) -> str:
        """The assistant's reply to ``messages`` (rendered with the chat template)."""
        return "".join(self.stream_chat(messages, max_new_tokens, **kw))


def load(path: str | Path, *, sparse: bool | None = None, activation_scheme: str | None = None,
         kv_bits: int | None = None) -> Model:
    """Load a model for torch-free inference: an onebit packed folder (``onebit export``), or a
    Hugging Face checkpoint folder / GGUF file, converted once (and checked) into the onebit
    cache (formats.convert.cached_import). ``sparse`` / ``activation_scheme`` / ``kv_bits``: see
    ``Runtime`` (default: up_proj row skipping on ReLU² models, column-sparse decoding for a4.8;
    the trained scheme; the config's KV cache bits)."""
    folder = Path(path)
    if folder.is_file() or (folder / "config.json").is_file():
        from ..formats.convert import cached_import, detect_format

        if detect_format(folder) != "onebit":
            folder = cached_import(folder)
    if not folder.is_dir():
        raise EngineError(f"model path '{folder}' is not a folder; pass a packed model folder "
                          f"written by `onebit export`, a Hugging Face checkpoint folder or a GGUF file")
    runtime = Runtime(folder, sparse=sparse, activation_scheme=activation_scheme, kv_bits=kv_bits)
    tokenizer = None
    if (folder / "tokenizer.json").is_file():
        from ..jsonio import read_tokenizer

        tokenizer = read_tokenizer(folder / "tokenizer.json", EngineError, runtime.config.vocab_size)
    return Model(runtime, tokenizer)
