"""Evaluation: perplexity of a causal LM on a token stream."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .model import CausalLM

__all__ = ["perplexity"]


@torch.no_grad()
def perplexity(model: CausalLM, tokens, seq_len: int, batch_size: int = 8,
               max_tokens: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> dict:
    """Mean next-token cross-entropy of ``model`` on ``tokens`` and its exponential.

    ``tokens``: 1-D integer array of ids (a ``np.memmap`` is read window by window). Window ``i``
    is ``tokens[i*seq_len : i*seq_len + seq_len + 1]``: inputs are its first ``seq_len`` tokens,
    targets its last ``seq_len``, so windows share only their boundary token and every scored
    token is predicted exactly once, each with a fresh context (llm.c's eval layout). All windows
    from the start are used, at most ``max_tokens // seq_len`` of them.

    Returns ``{"loss": float (nats/token), "ppl": exp(loss), "tokens": scored token count}``.
    ``progress(scored, total)`` is called after every batch.
    Runs under ``no_grad`` and ``eval()`` (the training flag is restored). Raises ``ValueError``
    for fewer than ``seq_len + 1`` tokens, ids outside the vocabulary, ``seq_len`` beyond
    ``max_position_embeddings``, or non-positive ``seq_len``/``batch_size``/``max_tokens``.
    """
    cfg = model.config
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be a 1-D integer array of token ids, got shape "
                         f"{tokens.shape} of dtype {tokens.dtype}")
    if not 1 <= seq_len <= cfg.max_position_embeddings:
        raise ValueError(f"seq_len={seq_len} must be in [1, max_position_embeddings="
                         f"{cfg.max_position_embeddings}]: lower seq_len")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if max_tokens is not None and max_tokens < seq_len:
        raise ValueError(f"max_tokens={max_tokens} is below seq_len={seq_len}, so no window fits: "
                         f"raise max_tokens or pass None (all tokens)")
    if len(tokens) < seq_len + 1:
        raise ValueError(f"tokens has {len(tokens)} ids, but one window at seq_len={seq_len} needs "
                         f"{seq_len + 1} (inputs plus the last target): pass more tokens or lower "
                         f"seq_len")
    n_windows = (len(tokens) - 1) // seq_len
    if max_tokens is not None:
        n_windows = min(n_windows, max_tokens // seq_len)

    device = model.output_weight.device
    was_training = model.training
    model.eval()
    total = 0.0  # summed in float64 on the host: many windows of float32 sums
    try:
        for first in range(0, n_windows, batch_size):
            rows = range(first, min(first + batch_size, n_windows))
            batch = np.stack([tokens[i * seq_len: i * seq_len + seq_len + 1] for i in rows])
            lo, hi = int(batch.min()), int(batch.max())
            if lo < 0 or hi >= cfg.vocab_size:
                raise ValueError(f"tokens contain id {lo if lo < 0 else hi}, outside [0, vocab_size="
                                 f"{cfg.vocab_size}): were they encoded with this model's tokenizer?")
            batch = torch.from_numpy(batch.astype(np.int64)).to(device)  # [b, seq_len+1]
            logits, _ = model(batch[:, :-1])                              # [b, seq_len, V]
            total += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                     batch[:, 1:].reshape(-1), reduction="sum").item()
            if progress is not None:
                progress(rows.stop * seq_len, n_windows * seq_len)
    finally:
        model.train(was_training)
    n = n_windows * seq_len
    loss = total / n
    return {"loss": loss, "ppl": math.exp(loss), "tokens": n}
