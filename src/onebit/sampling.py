"""Next-token samplers as small composed pure functions over a 1-D logits vector (numpy only).

No torch here: the torch-free inference engine reuses this module. Every function takes a 1-D
float array ``[V]`` and returns a new float64 array (never mutates its input); masked tokens are
``-inf``. ``sample_next`` composes them: repetition penalty, temperature, then top-k, top-p, min-p (the
order of transformers' logits warpers), then softmax and one inverse-CDF draw.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

__all__ = [
    "validate_sampling",
    "softmax",
    "apply_temperature",
    "apply_top_k",
    "apply_top_p",
    "apply_min_p",
    "apply_repetition_penalty",
    "greedy",
    "sample_next",
]


def validate_sampling(temperature: float, top_k: int | None, top_p: float | None,
                      min_p: float | None = None, repetition_penalty: float = 1.0) -> None:
    """Raise ``ValueError`` naming the parameter and its valid range if a setting is invalid.

    temperature: finite real >= 0 (0 = greedy); top_k: None or int >= 1; top_p: None or 0 < p <= 1;
    min_p: None or 0 <= p <= 1; repetition_penalty: finite real > 0 (1 = off).
    """
    if min_p is not None and (isinstance(min_p, bool) or not isinstance(min_p, numbers.Real)
                              or not 0.0 <= min_p <= 1.0):
        raise ValueError(f"min_p={min_p!r} is invalid: use None (off) or a number in [0, 1] (keep "
                         f"tokens at least min_p times as likely as the most likely one)")
    if (isinstance(repetition_penalty, bool) or not isinstance(repetition_penalty, numbers.Real)
            or not math.isfinite(repetition_penalty) or repetition_penalty <= 0):
        raise ValueError(f"repetition_penalty={repetition_penalty!r} is invalid: use a finite "
                         f"number > 0 (1 = off, >1 discourages repeating context tokens)")
    if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)
            or not math.isfinite(temperature) or temperature < 0):
        raise ValueError(f"temperature={temperature!r} is invalid: use a finite number >= 0 "
                         f"(0 = greedy decoding, 1 = the model's distribution)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral)
                              or top_k < 1):
        raise ValueError(f"top_k={top_k!r} is invalid: use None (no top-k) or an integer >= 1")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real)
                              or not 0.0 < top_p <= 1.0):  # NaN fails the comparison too
        raise ValueError(f"top_p={top_p!r} is invalid: use None (no nucleus sampling) or a "
                         f"number in (0, 1]")


def _as_logits(logits) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"logits must be a non-empty 1-D vector [vocab], got shape {x.shape}")
    return x


def softmax(logits) -> np.ndarray:
    """Probabilities ``[V]`` (float64) of ``logits`` ``[V]``; ``-inf`` entries get probability 0."""
    x = _as_logits(logits)
    e = np.exp(x - x.max())  # shift by the max: exp never overflows, the max entry is exp(0) = 1
    return e / e.sum()


def apply_temperature(logits, temperature: float) -> np.ndarray:
    """``logits / temperature`` (float64); ``temperature`` must be > 0 (0 is greedy, see
    ``sample_next``)."""
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0 to scale logits; "
                         f"temperature 0 means greedy decoding (sample_next handles it)")
    return _as_logits(logits) / temperature


def apply_top_k(logits, top_k: int) -> np.ndarray:
    """Keep exactly ``min(top_k, V)`` highest logits, set the rest to ``-inf``.

    Ties at the boundary keep the lowest indices (stable sort), so exactly k survive."""
    x = _as_logits(logits).copy()
    if top_k >= x.size:
        return x
    order = np.argsort(-x, kind="stable")  # descending, ties by lowest index
    x[order[top_k:]] = -np.inf
    return x


def apply_top_p(logits, top_p: float) -> np.ndarray:
    """Nucleus filter: keep the smallest set of highest-probability tokens whose cumulative
    probability is >= ``top_p`` (always at least the top token), set the rest to ``-inf``.

    Ties are ordered by lowest index. ``top_p = 1`` keeps every token."""
    x = _as_logits(logits).copy()
    if top_p >= 1.0:
        return x
    order = np.argsort(-x, kind="stable")
    cum = np.cumsum(softmax(x)[order])
    # first sorted position where the cumulative probability reaches top_p; keep it and all before
    n_keep = min(int(np.searchsorted(cum, top_p, side="left")) + 1, x.size)
    x[order[n_keep:]] = -np.inf
    return x


def apply_min_p(logits, min_p: float) -> np.ndarray:
    """Keep tokens whose probability is >= ``min_p`` times the top token's; the rest -> ``-inf``."""
    x = _as_logits(logits).copy()
    if min_p <= 0.0:
        return x
    x[x < x.max() + math.log(min_p)] = -np.inf  # p_i / p_max = exp(x_i - x_max)
    return x


def apply_repetition_penalty(logits, context, penalty: float) -> np.ndarray:
    """The CTRL / transformers / llama.cpp penalty: for every token id in ``context``, a positive
    logit is divided by ``penalty`` and a negative one multiplied by it (each id once)."""
    x = _as_logits(logits).copy()
    if penalty == 1.0:
        return x
    ids = np.unique(np.asarray(list(context), dtype=np.int64))
    ids = ids[(ids >= 0) & (ids < x.size)]
    v = x[ids]
    x[ids] = np.where(v > 0, v / penalty, v * penalty)
    return x


def greedy(logits) -> int:
    """Index of the largest logit; ties go to the lowest index."""
    return int(np.argmax(_as_logits(logits)))


def _draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    # Inverse CDF over the tokens with non-zero probability only, so a masked token is never drawn.
    kept = np.flatnonzero(probs > 0)
    cum = np.cumsum(probs[kept])
    i = int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))
    return int(kept[min(i, kept.size - 1)])


def sample_next(logits, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, rng: np.random.Generator | None = None,
                min_p: float | None = None, repetition_penalty: float = 1.0,
                context=()) -> int:
    """Draw the next token id from ``logits`` ``[V]`` (any float dtype; computed in float64).

    Order: repetition penalty over ``context`` ids, then greedy if ``temperature == 0`` (argmax,
    ties to the lowest index; top_k/top_p/min_p and rng ignored), else temperature, top-k, top-p,
    min-p, softmax and one draw. ``rng`` None uses a fresh unseeded generator. Raises
    ``ValueError`` for invalid settings (see ``validate_sampling``), a non-1-D input, or NaN/±inf
    logits.
    """
    validate_sampling(temperature, top_k, top_p, min_p, repetition_penalty)
    x = _as_logits(logits)
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x))
        raise ValueError(f"logits contain {bad.size} NaN/inf value(s) (first at index {bad[0]}): "
                         f"the model output is broken (check the weights/dtype)")
    if repetition_penalty != 1.0:
        x = apply_repetition_penalty(x, context, repetition_penalty)
    if temperature == 0:
        return greedy(x)
    # Shift by the max first (softmax is shift-invariant) so a tiny temperature cannot overflow.
    with np.errstate(over="ignore"):  # (x - max) / tiny overflows to -inf: probability 0, as meant
        x = apply_temperature(x - x.max(), temperature)
    if top_k is not None:
        x = apply_top_k(x, top_k)
    if top_p is not None:
        x = apply_top_p(x, top_p)
    if min_p is not None:
        x = apply_min_p(x, min_p)
    return _draw(softmax(x), np.random.default_rng() if rng is None else rng)
