"""Perplexity on the engine (torch-free), the same window layout as ``onebit.evaluate``: window i
is ``tokens[i*L : i*L + L + 1]``, its first L tokens are the input and its last L the targets."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .api import Model

__all__ = ["perplexity"]


def perplexity(model: Model, tokens, seq_len: int, max_tokens: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> dict:
    """``{"loss": nats/token, "ppl": exp(loss), "tokens": scored count}`` of ``model`` on ``tokens``.
    ``progress(scored, total)`` is called after every window."""
    tokens = np.asarray(tokens)
    cfg = model.config
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be a 1-D integer array, got {tokens.shape} {tokens.dtype}")
    if not 1 <= seq_len <= cfg.max_position_embeddings:
        raise ValueError(f"seq_len={seq_len} must be in [1, {cfg.max_position_embeddings}]")
    if len(tokens) < seq_len + 1:
        raise ValueError(f"need at least seq_len + 1 = {seq_len + 1} tokens, got {len(tokens)}")
    n = (len(tokens) - 1) // seq_len
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // seq_len))
    rt = model.runtime
    rt.reset(seq_len)
    total = 0.0
    for i in range(n):
        win = np.asarray(tokens[i * seq_len: i * seq_len + seq_len + 1], dtype=np.int64)
        logits = rt.forward(win[:-1], 0, last_only=False).astype(np.float64)   # [L, V]
        mx = logits.max(axis=-1, keepdims=True)
        lse = (mx[:, 0] + np.log(np.exp(logits - mx).sum(axis=-1)))
        total += float((lse - logits[np.arange(seq_len), win[1:]]).sum())
        if progress is not None:
            progress((i + 1) * seq_len, n * seq_len)
    loss = total / (n * seq_len)
    return {"loss": loss, "ppl": math.exp(loss), "tokens": n * seq_len}
