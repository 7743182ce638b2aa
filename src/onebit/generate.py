"""Autoregressive generation with the KV cache (PyTorch path), gpt-fast style.

``prefill`` runs the prompt once, filling the cache; ``decode_one_token`` feeds one token at its
absolute position; ``generate`` loops them and samples with ``onebit.sampling.sample_next``;
``generate_text`` wraps it with a ``tokenizers.Tokenizer`` and streams text.

One generation at a time per model: the cache lives on the model's attention layers while a
``generate`` iterator is open and is removed when it finishes, is closed or is garbage-collected.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from .model import CausalLM
from .sampling import sample_next, validate_sampling
from .streaming import stream_text

__all__ = ["prefill", "decode_one_token", "sample", "generate", "generate_text", "stream_text",
           "decode_threads"]



def prefill(model: CausalLM, ids: torch.Tensor) -> torch.Tensor:
    """Run the prompt ``ids`` [1, T] from position 0 (filling the cache); logits [V] of the last token."""
    logits, _ = model(ids, pos=0)   # [1, T, V]
    return logits[0, -1]


def decode_one_token(model: CausalLM, token: int, pos: int) -> torch.Tensor:
    """Feed ``token`` at absolute position ``pos`` (cache holds 0..pos-1); logits [V] of the next token."""
    ids = torch.tensor([[token]], dtype=torch.long, device=model.output_weight.device)  # [1, 1]
    logits, _ = model(ids, pos=pos)  # [1, 1, V]
    return logits[0, -1]


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
           rng: np.random.Generator) -> int:
    """Next token id from logits [V] (any dtype/device), via the numpy samplers in float64."""
    return sample_next(logits.detach().double().cpu().numpy(), temperature, top_k, top_p, rng)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    # Entered around each model call only, so the caller's training flag is back in place
    # whenever the generator is suspended at a yield.
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _has_cache(model: CausalLM) -> bool:
    return any(layer.self_attn.cache is not None for layer in model.model.layers)


def _check_request(model: CausalLM, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) \
            or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: use an integer >= 0")
    ids = list(prompt_ids)
    if not ids:
        raise ValueError("the prompt is empty: generation needs at least one token to condition on "
                         "(e.g. the BOS id)")
    cfg = model.config
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < cfg.vocab_size:
            raise ValueError(f"prompt token {i} is {t!r}, not a token id in [0, vocab_size="
                             f"{cfg.vocab_size}): was the prompt encoded with this model's tokenizer?")
    n, ctx = len(ids), cfg.max_position_embeddings
    if n + max_new_tokens > ctx:
        raise ValueError(f"the prompt has {n} tokens and max_new_tokens={max_new_tokens}, but the "
                         f"model's context is {ctx} tokens (max_position_embeddings): shorten the "
                         f"prompt to at most {max(ctx - max_new_tokens, 0)} tokens or lower "
                         f"max_new_tokens to at most {max(ctx - n, 0)}")
    return [int(t) for t in ids]


def generate(model: CausalLM, prompt_ids: Sequence[int], max_new_tokens: int,
             temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, stop_ids: Iterable[int] = ()) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` new token ids, one at a time, continuing ``prompt_ids``.

    Stops early when a token in ``stop_ids`` is sampled; the stop token is NOT yielded.
    ``temperature=0`` is greedy; sampling draws from ``np.random.default_rng(seed)``, so a fixed
    seed reproduces the output. Runs under ``torch.no_grad()`` and ``model.eval()`` (the training
    flag is restored around every yield), with a KV cache of ``len(prompt) + max_new_tokens``
    positions that is removed at the end.

    Raises (at the call, before any token) ``ValueError`` for an empty prompt, token ids outside
    the vocabulary, a prompt plus ``max_new_tokens`` longer than ``max_position_embeddings``, or
    invalid sampling settings; ``RuntimeError`` (at the first token) if the model already has a
    KV cache, i.e. another generation on it is still open.
    """
    ids = _check_request(model, prompt_ids, max_new_tokens)
    validate_sampling(temperature, top_k, top_p)
    stop = frozenset(int(s) for s in stop_ids)
    return _generate(model, ids, max_new_tokens, temperature, top_k, top_p, seed, stop)


def _check_finite(model: CausalLM, logits: torch.Tensor) -> None:
    """NaN/inf logits come from weights out of float range (a corrupt file): name it
    (``model.source``, set by checkpoint.load_model) rather than blame the sampler."""
    if not torch.isfinite(logits).all():
        src = getattr(model, "source", None)
        where = f"'{src}': " if src else ""
        raise ValueError(f"{where}the model's logits are NaN/inf: its weights overflow float "
                         f"arithmetic (a corrupt checkpoint); use an earlier checkpoint or retrain")


@torch.no_grad()  # on a generator function torch re-enters no_grad at every resume, not across yields
def _generate(model: CausalLM, ids: list[int], max_new_tokens: int, temperature: float,
              top_k: int | None, top_p: float | None, seed: int | None,
              stop: frozenset[int]) -> Iterator[int]:
    if max_new_tokens == 0:
        return
    if _has_cache(model):
        raise RuntimeError("this model already has a KV cache: another generation on it is still "
                           "open (exhaust or close() it) or setup_cache() was called without "
                           "clear_cache()")
    rng = np.random.default_rng(seed)
    weight = model.output_weight
    n = len(ids)
    model.setup_cache(batch=1, max_len=n + max_new_tokens, dtype=weight.dtype)
    try:
        with _eval_mode(model):
            logits = prefill(model, torch.tensor([ids], dtype=torch.long, device=weight.device))
        for i in range(max_new_tokens):
            _check_finite(model, logits)
            token = sample(logits, temperature, top_k, top_p, rng)
            if token in stop:
                return
            yield token
            if i + 1 == max_new_tokens:
                return  # the last token's logits would never be read
            with _eval_mode(model):
                logits = decode_one_token(model, token, n + i)
    finally:
        model.clear_cache()


SINGLE_THREAD_PARAMS = 200_000_000


def decode_threads(model: CausalLM) -> int:
    """torch intra-op threads for token-by-token generation: 1 below ``SINGLE_THREAD_PARAMS``
    parameters, torch's default above. A decode step of a small model is many tiny [1, D] x [D, N]
    products, where waking threads costs more than it saves, and OpenMP workers spin-waiting on a
    busy machine made it ~10x slower (on 2 shared cores: the 2.4M demo 120 vs 21 tok/s, the 6.5M
    "small" preset 83 vs 3 tok/s, a 111M model 2.2 vs 1.3 tok/s; 1 vs 2 threads)."""
    n = sum(p.numel() for p in model.parameters())
    return 1 if n < SINGLE_THREAD_PARAMS else torch.get_num_threads()


def generate_text(model: CausalLM, tokenizer, prompt: str, max_new_tokens: int,
                  temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
                  seed: int | None = None, stop_ids: Iterable[int] = (), add_bos: bool = True,
                  bos_id: int | None = None, eos_id: int | None = None,
                  convention=None) -> Iterator[str]:
    """Stream the text of ``generate`` for ``prompt`` as decoded pieces (concatenate for the text).

    ``tokenizer`` is a ``tokenizers.Tokenizer``. The prompt starts as ``convention`` says (a
    ``tokenizer_convention.BosConvention``: the model folder's, see ``folder_convention``); without
    one, with ``bos_id`` (None = ``model.config.bos_token_id``) if ``add_bos``. Either way a prompt
    that already starts with that BOS gets no second one.
    Generation stops at ``eos_id`` (None = ``model.config.eos_token_id``) or any of ``stop_ids``.
    A piece is held back while the decoded text ends in U+FFFD, so a multi-byte character split
    across tokens is emitted whole; whatever remains is flushed at the end. Raises as ``generate``.
    """
    from .tokenizer_convention import BosConvention, encode_prompt

    cfg = model.config
    if convention is None:
        bos = cfg.bos_token_id if bos_id is None else bos_id
        convention = BosConvention((bos,) if add_bos else (), "add_bos argument")
    ids = encode_prompt(tokenizer, prompt, convention)
    stop = {cfg.eos_token_id if eos_id is None else eos_id, *stop_ids}
    tokens = generate(model, ids, max_new_tokens, temperature=temperature, top_k=top_k,
                      top_p=top_p, seed=seed, stop_ids=stop)
    return stream_text(tokenizer, tokens, context=ids)  # decoded behind the prompt's tail
