"""Log-likelihood scoring of (context, continuation) pairs: the engine (batched) and PyTorch.

Tokens are split as lm-eval splits them (``encode_pair``: the whole text encoded, the context
encoded alone, the continuation = the whole's tokens past the context's length) and a request
scores ``sum log p(cont[j] | ctx + cont[:j])`` plus ``is_greedy`` (every cont token is the argmax).

The engine path (``loglikelihoods``) groups requests by context: each distinct context is
prefilled once, many contexts per engine call (``Runtime.forward_seqs``: one GEMM per projection
over all their tokens); its KV cache is then copied to one slot per continuation and all
continuations of all groups run as one more batched call. ``reference_loglikelihoods`` is the
obvious version (one full forward per request) the tests hold it to, and
``torch_loglikelihoods`` runs a PyTorch ``CausalLM`` (a training run or checkpoint) on padded
batches, as lm-eval's hf backend does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["encode_pair", "generate_until", "loglikelihoods", "reference_loglikelihoods",
           "torch_loglikelihoods",
           "token_encoder", "KV_BUDGET_BYTES"]

Request = tuple[Sequence[int], Sequence[int]]   # (context ids, continuation ids)

# KV cache memory the engine scorer may hold at once (slots x positions x layers x K and V)
KV_BUDGET_BYTES = 512 << 20
MAX_SLOTS = 64          # sequences per batched engine call
MAX_ROWS = 4096         # tokens per batched engine call


def token_encoder(tokenizer, bos_id: int) -> Callable[[str], list[int]]:
    """``text -> ids`` with the engine's convention (``onebit.engine.Model.encode``: the BOS id,
    then the text without the tokenizer's own special tokens), for a tokenizer used outside the
    engine (the PyTorch backend); tests/test_eval_tasks.py pins the two equal."""
    return lambda text: [int(bos_id)] + list(tokenizer.encode(text, add_special_tokens=False).ids)


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str,
                prefix_id: int) -> tuple[list[int], list[int]]:
    """lm-eval's TemplateLM split: trailing spaces of the context move to the continuation, the
    continuation's tokens are those of encode(context + continuation) past len(encode(context)).
    An empty context becomes ``[prefix_id]`` (lm-eval: BOS, or EOS without one)."""
    if context == "":
        cont = encode(continuation)
        if cont and cont[0] == prefix_id:   # the encoder's own BOS is the context
            return cont[:1], cont[1:]
        return [prefix_id], cont
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
    whole, ctx = encode(context + continuation), encode(context)
    return ctx, whole[len(ctx):]


def _fit(ctx: Sequence[int], cont: Sequence[int], max_len: int) -> tuple[list[int], list[int]]:
    """Left-truncate as lm-eval does: the model sees (ctx + cont)[-(max_len + 1):][:-1]."""
    ctx, cont = [int(t) for t in ctx], [int(t) for t in cont]
    if not cont:
        raise ValueError("a continuation encoded to no tokens; nothing to score")
    if not ctx:
        raise ValueError("a context encoded to no tokens: give it at least a BOS id")
    if len(cont) > max_len:
        raise ValueError(f"a continuation of {len(cont)} tokens does not fit the model's context "
                         f"of {max_len}")
    if len(ctx) + len(cont) > max_len + 1:
        ctx = ctx[len(ctx) + len(cont) - max_len - 1:]
    return ctx, cont


def _score(logits: np.ndarray, targets: Sequence[int]) -> tuple[float, bool]:
    """Sum of log-softmax(logits[j])[targets[j]] (float64) and whether each target is the argmax."""
    z = np.asarray(logits, np.float64).reshape(len(targets), -1)
    mx = z.max(axis=1, keepdims=True)
    lse = mx[:, 0] + np.log(np.exp(z - mx).sum(axis=1))
    t = np.asarray(targets)
    ll = float((z[np.arange(len(t)), t] - lse).sum())
    return ll, bool((z.argmax(axis=1) == t).all())


def reference_loglikelihoods(model, requests: Sequence[Request]) -> list[tuple[float, bool]]:
    """One full engine forward of (ctx + cont)[:-1] per request: the slow, obvious version."""
    L = model.config.max_position_embeddings
    out = []
    for ctx, cont in requests:
        ctx, cont = _fit(ctx, cont, L)
        seq = ctx + cont
        logits = model.logits(seq[:-1])                        # [len - 1, V]
        out.append(_score(logits[len(ctx) - 1:], cont))
    return out


def loglikelihoods(model, requests: Sequence[Request], progress: Callable[[int], None] | None = None,
                   kv_budget: int = KV_BUDGET_BYTES) -> list[tuple[float, bool]]:
    """``(log-likelihood, is_greedy)`` of each (context ids, continuation ids) request on an engine
    ``Model``; equal to ``reference_loglikelihoods`` up to float summation order (a batched row
    is bit-identical to its sequence run alone, but a context prefilled alone and then continued
    attends in another order than one prefill of context + continuation: ~1e-6 per logit).
    ``progress(n)``: called with the count of requests finished so far after each batch."""
    rt = model.runtime
    L = model.config.max_position_embeddings
    fitted = [_fit(c, x, L) for c, x in requests]
    groups: dict[tuple[int, ...], list[int]] = {}          # context -> indices of its requests
    for i, (ctx, _) in enumerate(fitted):
        groups.setdefault(tuple(ctx), []).append(i)
    if not groups:
        return []
    max_len = max(len(c) + len(x) - 1 for c, x in fitted)
    rt.reset(max(max_len, 1), slots=1)                       # its KV bytes per slot, then size
    per_slot = max(rt.cache_bytes, 1)
    slots = int(max(1, min(MAX_SLOTS, kv_budget // per_slot)))
    rt.reset(max(max_len, 1), slots=slots)
    results: list[tuple[float, bool] | None] = [None] * len(fitted)
    order = sorted(groups.items(), key=lambda kv: -len(kv[0]))  # long contexts first
    done, g = 0, 0
    while g < len(order):
        # a batch of whole groups: one slot per continuation that needs a forward (len > 1),
        # at least one per group (its context)
        batch, used, rows = [], 0, 0
        while g < len(order):
            ctx, idx = order[g]
            need = max(1, sum(len(fitted[i][1]) > 1 for i in idx))
            cost = len(ctx) + sum(len(fitted[i][1]) - 1 for i in idx)
            if batch and (used + need > slots or rows + cost > MAX_ROWS):
                break
            if need > slots:   # more continuations than slots: score this group alone, by parts
                break
            batch.append(g)
            used, rows, g = used + need, rows + cost, g + 1
        if not batch:   # one group with more long continuations than slots
            ctx, idx = order[g]
            _score_group_in_parts(rt, list(ctx), [fitted[i][1] for i in idx], idx, slots, results)
            done += len(idx)
            g += 1
        else:
            done += _score_groups(rt, [order[b] for b in batch], fitted, results)
        if progress is not None:
            progress(done)
    return results  # type: ignore[return-value]


def _score_groups(rt, groups, fitted, results) -> int:
    """Prefill every group's context in its own slot (one batched call), copy each context's
    cache to a slot per further continuation, run all continuations (one batched call)."""
    first = rt.forward_seqs([list(ctx) for ctx, _ in groups], [0] * len(groups),
                            list(range(len(groups))))                      # [V] per context
    conts, n_slots, jobs = [], len(groups), []
    for gi, (ctx, idx) in enumerate(groups):
        own_used = False
        for i in idx:
            cont = fitted[i][1]
            if len(cont) == 1:
                results[i] = _score(first[gi][None], cont)
                continue
            if not own_used:
                slot, own_used = gi, True
            else:
                slot, n_slots = n_slots, n_slots + 1
                rt.copy_slot(gi, slot, len(ctx))
            jobs.append((i, gi, len(ctx), slot))
            conts.append(cont)
    if jobs:
        outs = rt.forward_seqs([c[:-1] for c in conts], [p for _, _, p, _ in jobs],
                               [s for *_, s in jobs], [True] * len(jobs))
        for (i, gi, _, _), cont, rows in zip(jobs, conts, outs):
            results[i] = _score(np.concatenate([first[gi][None], rows]), cont)
    return sum(len(idx) for _, idx in groups)


def _score_group_in_parts(rt, ctx, conts, idx, slots, results) -> None:
    """A context with more multi-token continuations than slots: prefill it once in slot 0,
    then continuations ``slots - 1`` at a time from copies of it (with a single slot, one at a
    time in slot 0 itself: each overwrites only the positions past the context)."""
    first = rt.forward_seqs([ctx], [0], [0])[0]
    pending = []
    for i, cont in zip(idx, conts):
        if len(cont) == 1:
            results[i] = _score(first[None], cont)
        else:
            pending.append((i, cont))
    step = max(1, slots - 1)
    for a in range(0, len(pending), step):
        part = pending[a:a + step]
        use = list(range(1, len(part) + 1)) if slots > 1 else [0]
        for s in use:
            if s:
                rt.copy_slot(0, s, len(ctx))
        outs = rt.forward_seqs([c[:-1] for _, c in part], [len(ctx)] * len(part), use,
                               [True] * len(part))
        for (i, cont), rows in zip(part, outs):
            results[i] = _score(np.concatenate([first[None], rows]), cont)


def torch_loglikelihoods(model, requests: Sequence[Request], batch_size: int = 16,
                         progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
    """The same scores from a PyTorch ``CausalLM``: (ctx + cont)[:-1] right-padded into batches,
    one forward each, float64 log-softmax over the continuation's positions."""
    import torch

    L = model.config.max_position_embeddings
    fitted = [_fit(c, x, L) for c, x in requests]
    order = sorted(range(len(fitted)), key=lambda i: -(len(fitted[i][0]) + len(fitted[i][1])))
    results: list[tuple[float, bool] | None] = [None] * len(fitted)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for a in range(0, len(order), batch_size):
                part = order[a:a + batch_size]
                seqs = [fitted[i][0] + fitted[i][1] for i in part]
                T = max(len(s) for s in seqs) - 1
                ids = torch.zeros((len(part), T), dtype=torch.long)
                for r, s in enumerate(seqs):
                    ids[r, :len(s) - 1] = torch.tensor(s[:-1])
                logits = model(ids)[0].float().numpy()                   # [b, T, V]
                for r, i in enumerate(part):
                    ctx, cont = fitted[i]
                    results[i] = _score(logits[r, len(ctx) - 1:len(ctx) - 1 + len(cont)], cont)
                if progress is not None:
                    progress(a + len(part))
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def generate_until(model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   until: Sequence[str] = (), temperature: float = 0.0, seed: int | None = None,
                   max_slots: int = 16) -> list[str]:
    """lm-eval's ``generate_until`` on the engine: each prompt (ids, left-truncated to leave
    ``max_new_tokens`` of context) continued greedily (or sampled at ``temperature``) until a
    stop id, ``max_new_tokens``, or one of the ``until`` strings appears in the text; the text is
    cut before the first such string. Prompts are prefilled together (``forward_seqs``) and
    decoded together (``forward_batch``), ``max_slots`` at a time."""
    from ..sampling import sample_next

    rt, L = model.runtime, model.config.max_position_embeddings
    if not 1 <= max_new_tokens < L:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be in [1, {L - 1}] (the context)")
    stops = [s for s in until if s]
    outs: list[str] = []
    for a in range(0, len(prompts), max_slots):
        part = [list(p)[-(L - max_new_tokens):] for p in prompts[a:a + max_slots]]
        if any(not p for p in part):
            raise ValueError("a prompt encoded to no tokens: give it at least a BOS id")
        B = len(part)
        rt.reset(max(len(p) for p in part) + max_new_tokens, slots=B)
        logits = dict(enumerate(rt.forward_seqs(part, [0] * B, list(range(B)))))
        rngs = [np.random.default_rng(seed) for _ in part]
        gen: list[list[int]] = [[] for _ in part]
        text = [""] * B
        active = list(range(B))
        while active:
            still = []
            for b in active:
                tok = sample_next(logits[b], temperature, None, None, rngs[b])
                if tok in model.stop_ids:
                    continue
                gen[b].append(tok)
                text[b] = model.decode(gen[b])
                if len(gen[b]) < max_new_tokens and not any(s in text[b] for s in stops):
                    still.append(b)
            active = still
            if active:
                rows = rt.forward_batch([gen[b][-1] for b in active],
                                        [len(part[b]) + len(gen[b]) - 1 for b in active], active)
                logits = dict(zip(active, rows))
        for t in text:
            cut = min((t.find(s) for s in stops if s in t), default=len(t))
            outs.append(t[:cut])
    return outs
