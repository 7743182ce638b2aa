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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..sampling import sample_next, validate_sampling
from ..streaming import CONTEXT_TOKENS, REPLACEMENT_CHAR, stream_text
from ..tokenizer_convention import BosConvention, encode_prompt
from ..tokenizer_convention import bos_convention as _bos_convention
from .runtime import EngineError, Runtime

__all__ = ["Model", "load", "BITNET_CHAT_TEMPLATE", "ChatPrompt", "check_text"]

# microsoft/bitnet-b1.58-2B-4T's format (BITNET.md §4): "Role: content<|eot_id|>" turns, the
# first one after <|begin_of_text|>, joined by newlines; generation continues "Assistant: ".
# (Newlines are written as expressions: transformers renders with trim_blocks, as we do.)
BITNET_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ m['role'] | capitalize }}: {{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\nAssistant: ' }}{% endif %}"
)


def check_text(text: str, what: str = "the prompt") -> None:
    """Raise ValueError if ``text`` cannot be encoded as UTF-8: lone surrogates, which is how Python
    hands over bytes that are not UTF-8 (argv and stdin read with errors="surrogateescape")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start].encode("utf-8", "surrogateescape")
        raise ValueError(f"{what} is not UTF-8 text (byte {bad!r} at character {e.start}): pass "
                         f"UTF-8 (e.g. set LANG=C.UTF-8 in the terminal, or convert the text "
                         f"with iconv -t UTF-8)") from None


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation fitted to the model's context by ``Model.fit_chat``."""

    ids: list[int]            # the rendered prompt's token ids
    max_new_tokens: int       # the reply's limit: the requested one, or what the context has left
    messages: list[dict]      # the messages rendered (``messages`` less the dropped ones)
    dropped: int              # how many of the oldest messages were dropped to make room


def _tokenizer_config(folder: Path) -> dict:
    from ..jsonio import read_json

    p = folder / "tokenizer_config.json"
    if not p.is_file():
        return {}
    cfg = read_json(p, EngineError, fix="fix or remove it")
    return cfg if isinstance(cfg, dict) else {}


class Model:
    """A packed model (or, through resolve.TorchRuntime, a PyTorch one) with its tokenizer. One
    generation at a time (the KV cache is shared)."""

    def __init__(self, runtime: Runtime, tokenizer=None, *, bos_convention: BosConvention | None = None):
        self.runtime, self.tokenizer, self.config = runtime, tokenizer, runtime.config
        tc = _tokenizer_config(runtime.folder)
        tmpl = tc.get("chat_template")
        if isinstance(tmpl, list):  # transformers' named templates: [{"name", "template"}]
            tmpl = next((t.get("template") for t in tmpl if isinstance(t, dict)
                         and t.get("name") == "default"), None)
        jinja_file = runtime.folder / "chat_template.jinja"
        if not isinstance(tmpl, str) and jinja_file.is_file():  # transformers >= 4.43 writes it apart
            tmpl = jinja_file.read_text(encoding="utf-8")
        self.chat_template = tmpl if isinstance(tmpl, str) else BITNET_CHAT_TEMPLATE
        self.bos_id, self.eos_id = self.config.bos_token_id, self.config.eos_token_id
        self.stop_ids = {self.eos_id}
        # what a text prompt starts with: the tokenizer's own convention (tokenizer_convention.py);
        # a packed folder is onebit's, so a tokenizer declaring nothing gets the training BOS
        self.bos_convention = bos_convention or BosConvention((), "no tokenizer")
        if tokenizer is not None:
            if bos_convention is None:  # else decided by the caller (resolve.load_runnable)
                try:
                    self.bos_convention = _bos_convention(tokenizer, tc, onebit_folder=True,
                                                          bos_id=self.bos_id)
                except ValueError as e:
                    raise EngineError(f"'{runtime.folder}': {e}") from None
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

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """``text``'s ids, starting with BOS as the tokenizer's convention says (``add_bos``
        None; see ``bos_convention``), or as forced by True/False; never a second BOS when the
        text already starts with one."""
        if not isinstance(text, str):
            raise TypeError(f"prompt must be a str (or a list of token ids), got {type(text).__name__}")
        check_text(text)
        conv = self.bos_convention
        if add_bos is not None and add_bos != conv.add_bos:
            conv = BosConvention((self.bos_id,) if add_bos else (), "add_bos argument")
        tok = self._need_tokenizer()
        with self._tokenizer_errors():
            return encode_prompt(tok, text, conv)

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
                     seed: int | None = None, stop_ids: Iterable[int] | None = None,
                     first_allowed: np.ndarray | None = None) -> Iterator[int]:
        """Yield new token ids continuing ``ids``; stops at a stop id (not yielded).
        ``first_allowed``: bool [vocab_size], the ids the first token may take (token healing)."""
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
        if first_allowed is not None and (np.shape(first_allowed) != (V,) or not np.any(first_allowed)):
            raise ValueError(f"first_allowed must be a bool mask of {V} token ids with one True")
        stop = set(self.stop_ids if stop_ids is None else stop_ids)
        return self._generate(ids, max_new_tokens, temperature, top_k, top_p, min_p,
                              repetition_penalty, seed, stop, first_allowed)

    def _generate(self, ids, max_new_tokens, temperature, top_k, top_p, min_p, rep, seed, stop,
                  first_allowed=None):
        if max_new_tokens == 0:
            return
        rng = np.random.default_rng(seed)
        rt = self.runtime
        rt.reset(len(ids) + max_new_tokens)
        logits = rt.forward(ids, 0)
        context = list(ids)
        if first_allowed is not None:
            logits = np.where(first_allowed, logits, np.float32(-1e30))  # sample_next refuses inf
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

    def _vocab_mask(self, prefix: str) -> np.ndarray:
        """bool [vocab_size]: the ids whose vocabulary string starts with ``prefix`` (cached)."""
        masks = self.__dict__.setdefault("_prefix_masks", {})
        if prefix not in masks:
            if "_vocab_strings" not in self.__dict__:
                tok = self._need_tokenizer()
                self._vocab_strings = [tok.id_to_token(i) or "" for i in range(self.config.vocab_size)]
            masks[prefix] = np.array([v.startswith(prefix) for v in self._vocab_strings])
        return masks[prefix]

    def heal(self, ids: Sequence[int]) -> tuple[list[int], np.ndarray | None, str]:
        """Token healing of a prompt that ends in a whitespace-only token, as a chat template's
        "Assistant: " does: in training text that space is the start of the next word's token
        ("Ġword" in byte-level BPE, "▁word" in SentencePiece), so a lone space token is rare and the
        model continues it with something odd (the built-in model: a stray UTF-8 lead byte, shown
        as U+FFFD, or a word fragment). Returns ``(ids without that token, the first-token mask:
        ids whose vocabulary string starts with the removed one's, its text)``; a prompt that does
        not end in whitespace comes back unchanged with ``(ids, None, "")``."""
        ids = [int(t) for t in ids]
        tok = self._need_tokenizer()
        if len(ids) < 2:
            return ids, None, ""
        piece = tok.id_to_token(ids[-1])
        text = "".join(stream_text(tok, ids[-1:], context=ids[:-1]))
        if not piece or not text or text.strip() or tok.token_to_id(piece) != ids[-1]:
            return ids, None, ""
        mask = self._vocab_mask(piece)
        return ids[:-1], mask, text

    def stream(self, prompt: str | Sequence[int], max_new_tokens: int = 128,
               stop: Sequence[str] | None = None, heal: bool = False, **sampling) -> Iterator[str]:
        """Yield text pieces as they are generated (concatenation = the completion).

        ``stop``: strings that end the generation (not included). ``heal``: token healing of a
        trailing whitespace token (``heal()``; chat uses it). Other keyword arguments as
        ``generate_ids`` (temperature, top_k, top_p, min_p, repetition_penalty, seed).
        """
        tok = self._need_tokenizer()
        ids = self._prompt_ids(prompt)
        first_allowed, healed = None, ""
        if heal:
            ids, first_allowed, healed = self.heal(ids)
        pieces = stream_text(tok, self.generate_ids(ids, max_new_tokens, first_allowed=first_allowed,
                                                    **sampling), context=ids)
        if healed:  # the healed text belongs to the prompt: the completion starts after it
            pieces = _drop_prefix(pieces, healed)
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
            texts = [self._completion_text(i, o) for i, o in zip(ids, outs)]
            stops = [x for x in (stop or []) if x]
            return [t[:min((t.find(x) for x in stops if x in t), default=len(t))] for t in texts]
        return "".join(self.stream(prompt, **kw))

    def _completion_text(self, prompt_ids: Sequence[int], out: Sequence[int]) -> str:
        """What ``out`` adds to the text of ``prompt_ids`` (= "".join(stream_text(...)))."""
        ctx = list(prompt_ids)[-CONTEXT_TOKENS:]
        base = self.decode(ctx).rstrip(REPLACEMENT_CHAR) if ctx else ""
        return self.decode(ctx + list(out))[len(base):] if out else ""

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

    def batch(self, slots: int = 8, max_len: int | None = None, prefill_chunk: int = 256,
              max_queue: int = 64):
        """A ``BatchEngine`` over this model: continuous batching of many requests, each slot
        with its own KV cache (engine/batch.py). It loads its own runtime (the same mmap'd
        weights and options, batch-invariant), so this Model keeps working beside it."""
        from .batch import BatchEngine

        return BatchEngine(self, slots=slots, max_len=max_len, prefill_chunk=prefill_chunk,
                           max_queue=max_queue)

    # -- chat --------------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` [{"role", "content"}] with the model's Jinja chat template."""
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)):
                raise ValueError(f"message {i} must be {{'role': str, 'content': str}}, got {m!r}")
            check_text(m["content"], f"message {i}")
        tok = self._need_tokenizer()
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        try:
            tmpl = env.from_string(self.chat_template)
            return tmpl.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                               bos_token=tok.id_to_token(self.bos_convention.bos_id
                                                         if self.bos_convention.add_bos
                                                         else self.bos_id) or "",
                               eos_token=tok.id_to_token(self.eos_id) or "")
        except jinja2.TemplateError as e:
            raise EngineError(f"the chat template of '{self.runtime.folder}' failed ({e}); fix "
                              f"chat_template in tokenizer_config.json") from None

    def fit_chat(self, messages: Sequence[dict], max_new_tokens: int = 256,
                 min_new_tokens: int | None = None) -> ChatPrompt:
        """Render ``messages`` so that the prompt and its reply fit the model's context.

        The reply gets ``max_new_tokens`` or what the context has left after the prompt. While that
        is fewer than ``min_new_tokens`` (default: ``max_new_tokens`` up to a quarter of the
        context), the oldest turn is dropped (a message and the replies after it; leading system
        messages are kept). Raises ValueError when the last message alone (with the system
        messages) leaves too little room, naming the sizes."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) \
                or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: use an integer >= 0")
        ctx = self.config.max_position_embeddings
        want = min(max_new_tokens, max(1, ctx // 4)) if min_new_tokens is None else min_new_tokens
        want = min(want, max_new_tokens)
        msgs = list(messages)
        n_sys = next((i for i, m in enumerate(msgs) if not (isinstance(m, dict)
                                                             and m.get("role") == "system")), len(msgs))
        dropped = 0
        while True:
            ids = self.chat_ids(msgs)
            room = ctx - len(ids)
            if room >= max(want, 0) and room >= 0:
                return ChatPrompt(ids, min(max_new_tokens, room), msgs, dropped)
            body = msgs[n_sys:]
            if len(body) <= 1:
                with_sys = " with the system message" if n_sys else ""
                raise ValueError(f"the last message{with_sys} is {len(ids)} tokens of the model's "
                                 f"{ctx}-token context, which leaves {max(room, 0)} for the reply "
                                 f"(fewer than {want}): shorten the message")
            k = 1  # a turn: the oldest message and the non-user messages (replies) after it
            while k < len(body) - 1 and body[k].get("role") != "user":
                k += 1
            msgs = msgs[:n_sys] + body[k:]
            dropped += k

    def chat_ids(self, messages: Sequence[dict]) -> list[int]:
        text = self.apply_chat_template(messages)
        # the template writes the specials as text (encoded as special tokens); a template that
        # renders {{ bos_token }} already starts with BOS, and encode adds no second one
        return self.encode(text)

    def stream_chat(self, messages: Sequence[dict], max_new_tokens: int = 256, **kw) -> Iterator[str]:
        """The reply's text pieces: ``fit_chat`` (the oldest turns dropped while the context is
        full; call it yourself to know which), then ``stream`` with token healing of the
        template's trailing space."""
        fit = self.fit_chat(messages, max_new_tokens)
        return self.stream(fit.ids, fit.max_new_tokens, heal=True, **kw)

    def chat(self, messages: Sequence[dict], max_new_tokens: int = 256, **kw) -> str:
        """The assistant's reply to ``messages`` (rendered with the chat template, fitted to the
        context as ``stream_chat``)."""
        return "".join(self.stream_chat(messages, max_new_tokens, **kw))


def _drop_prefix(pieces: Iterator[str], prefix: str) -> Iterator[str]:
    """``pieces`` without ``prefix`` at the start of their concatenation (kept if it is not there)."""
    head = ""
    try:
        for piece in pieces:
            if head is None:
                yield piece
                continue
            head += piece
            if len(head) >= len(prefix) or not prefix.startswith(head):
                rest = head[len(prefix):] if head.startswith(prefix) else head
                head = None
                if rest:
                    yield rest
        if head:
            yield head[len(prefix):] if head.startswith(prefix) else head
    finally:
        pieces.close()


def load(path: str | Path, *, sparse: bool | None = None, activation_scheme: str | None = None,
         kv_bits: int | None = None, tokenizer: bool = True) -> Model:
    """Load a model for torch-free inference: an onebit packed folder (``onebit export``), or a
    Hugging Face checkpoint folder / GGUF file, converted once (and checked) into the onebit
    cache (formats.convert.cached_import). ``sparse`` / ``activation_scheme`` / ``kv_bits``: see
    ``Runtime`` (default: up_proj row skipping on ReLU² models, column-sparse decoding for a4.8;
    the trained scheme; the config's KV cache bits). ``tokenizer=False`` skips the folder's
    tokenizer.json (token ids only: parsing Llama 3's takes ~190 MB of peak RSS)."""
    folder = Path(path)
    if folder.is_file():
        with open(folder, "rb") as f:
            gguf = f.read(4) == b"GGUF"
        if not gguf:  # a llama2.c .bin (full precision): resolve.py runs it in PyTorch
            from ..resolve import classify
            raise EngineError(f"{classify(folder).describe()}: the engine runs ternary models; run it "
                              f"in PyTorch behind this API with onebit.resolve.load_runnable('{folder}')")
    if folder.is_file() or (folder / "config.json").is_file():
        from ..formats.convert import cached_import, detect_format

        if detect_format(folder) != "onebit":
            folder = cached_import(folder)
    if not folder.is_dir():
        raise EngineError(f"model path '{folder}' is not a folder; pass a packed model folder "
                          f"written by `onebit export`, a Hugging Face checkpoint folder or a GGUF file")
    runtime = Runtime(folder, sparse=sparse, activation_scheme=activation_scheme, kv_bits=kv_bits)
    tokenizer_obj = None
    if tokenizer and (folder / "tokenizer.json").is_file():
        from ..jsonio import read_tokenizer

        tokenizer_obj = read_tokenizer(folder / "tokenizer.json", EngineError, runtime.config.vocab_size)
    return Model(runtime, tokenizer_obj)
