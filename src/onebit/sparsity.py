"""Activation sparsity per projection of a trained model (BitNet a4.8, Table 2).

``activation_sparsity(model, tokens, seq_len)`` runs validation text through the model and counts,
for every BitLinear, the exact zeros of the input its matmul sees (after the inner RMSNorm and the
activation quantizer: INT4 zeros of q/k/v/gate/up, top-K then INT8 zeros of o, INT8 zeros of the
ReLU²-gated down input), plus the zeros of the gate *output* ``relu(gate(x))²``: an up_proj row
whose gate output is zero need not be computed. These are the work a sparsity-aware kernel skips.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .model import CausalLM

__all__ = ["ROLES", "PAPER_TABLE2", "activation_sparsity", "skippable"]

ROLES = ("q", "k", "v", "o", "gate", "up", "down")
# BitNet a4.8 Table 2 (7B), as quoted in the issue: approximate, "~" values; "up" is the
# fraction of up_proj rows skipped because the ReLU² gate output is zero.
PAPER_TABLE2 = {"q": 0.12, "k": 0.12, "v": 0.12, "o": 0.50, "gate": 0.12, "up": 0.70, "down": 0.80}


@torch.no_grad()
def activation_sparsity(model: CausalLM, tokens, seq_len: int, batch_size: int = 8,
                        max_tokens: int | None = None) -> dict:
    """Fraction of exact zeros per projection input, summed over layers, on ``tokens``.

    ``tokens``: 1-D integer array; windows ``tokens[i*seq_len : (i+1)*seq_len]`` from the start, at
    most ``max_tokens // seq_len`` of them. Returns ``{"input_zeros": {role: fraction},
    "gate_output_zeros": fraction, "per_layer": [{role: fraction, "gate_out": fraction}, ...],
    "tokens": n, "activation_scheme": scheme}``. Runs in ``eval()`` (restored) without gradients.
    Raises ``ValueError`` when no full window fits.
    """
    tokens = np.asarray(tokens)
    n_windows = len(tokens) // seq_len
    if max_tokens is not None:
        n_windows = min(n_windows, max_tokens // seq_len)
    if n_windows < 1 or not 1 <= seq_len <= model.config.max_position_embeddings:
        raise ValueError(f"need at least one window of seq_len={seq_len} tokens (got {len(tokens)} "
                         f"tokens, max_tokens={max_tokens}, context {model.config.max_position_embeddings})")
    L = model.config.num_hidden_layers
    zeros = np.zeros((L, len(ROLES) + 1))   # last column: gate output
    total = np.zeros((L, len(ROLES) + 1))
    relu2 = model.config.hidden_act == "relu2"

    def count(i: int, j: int, t: torch.Tensor) -> None:
        zeros[i, j] += (t == 0).sum().item()
        total[i, j] += t.numel()

    def input_hook(i, j, lin):
        def hook(mod, args):
            x = args[0] if lin.norm is None else lin.norm(args[0])
            count(i, j, lin.quantize_input(x))
        return hook

    def gate_hook(i):
        def hook(mod, args, out):
            count(i, len(ROLES), F.relu(out).square() if relu2 else F.silu(out))
        return hook

    handles = []
    for i, role, lin in model.projections():
        handles.append(lin.register_forward_pre_hook(input_hook(i, ROLES.index(role), lin)))
        if role == "gate":
            handles.append(lin.register_forward_hook(gate_hook(i)))
    was_training = model.training
    model.eval()
    device = model.output_weight.device
    try:
        for first in range(0, n_windows, batch_size):
            rows = range(first, min(first + batch_size, n_windows))
            batch = np.stack([tokens[r * seq_len:(r + 1) * seq_len] for r in rows]).astype(np.int64)
            model(torch.from_numpy(batch).to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    frac = zeros.sum(0) / total.sum(0)
    per_layer = zeros / total
    return {"input_zeros": {r: float(frac[j]) for j, r in enumerate(ROLES)},
            "gate_output_zeros": float(frac[-1]),
            "per_layer": [{**{r: float(row[j]) for j, r in enumerate(ROLES)}, "gate_out": float(row[-1])}
                          for row in per_layer],
            "tokens": n_windows * seq_len, "activation_scheme": model.activation_scheme}


def skippable(stats: dict, model: CausalLM) -> dict:
    """What a sparsity-aware kernel skips, per projection, and the active fraction of weights.

    q/k/v/o/gate/down: the weight columns of zero inputs (``input_zeros``); up: the rows whose gate
    output is zero (``gate_output_zeros``), the paper's up_proj figure. ``active_weights`` is
    ``Σ params·(1 - skipped) / Σ params`` over all projections (the paper's "~55% active")."""
    skip = {r: stats["input_zeros"][r] for r in ROLES}
    skip["up"] = stats["gate_output_zeros"]
    params = {r: 0 for r in ROLES}
    for _, role, lin in model.projections():
        params[role] += lin.weight.numel()
    active = sum(params[r] * (1 - skip[r]) for r in ROLES) / sum(params.values())
    return {"skipped": skip, "params": params, "active_weights": active}
