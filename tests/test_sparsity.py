"""Activation sparsity statistics (a4.8 Table 2) against what F.linear actually receives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from onebit import nn as onn
from onebit.config import ModelConfig
from onebit.model import CausalLM
from onebit.sparsity import ROLES, activation_sparsity, skippable

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)


def oracle(model, tokens, seq_len):
    """Count zeros of every F.linear input by module, and of relu(gate out)² by hand."""
    names = {id(lin): role for _, role, lin in model.projections()}
    zeros = {r: 0 for r in ROLES}
    total = {r: 0 for r in ROLES}
    gate = [0, 0]
    current = []
    orig = F.linear

    def spy(x, w, *a, **k):
        out = orig(x, w, *a, **k)
        if current:
            role = current[-1]
            zeros[role] += (x == 0).sum().item()
            total[role] += x.numel()
            if role == "gate":
                gate[0] += (F.relu(out).square() == 0).sum().item()
                gate[1] += out.numel()
        return out

    handles = []
    for _, role, lin in model.projections():
        handles.append(lin.register_forward_pre_hook(lambda m, a, r=role: current.append(r)))
        handles.append(lin.register_forward_hook(lambda m, a, o: current.pop() and None))
    onn.F.linear = spy
    try:
        n = len(tokens) // seq_len
        with torch.no_grad():
            model(torch.from_numpy(tokens[:n * seq_len].reshape(n, seq_len).astype(np.int64)))
    finally:
        onn.F.linear = orig
        for h in handles:
            h.remove()
    return {r: zeros[r] / total[r] for r in ROLES}, gate[0] / gate[1]


@pytest.mark.parametrize("scheme, placement", [("a4.8", "subln"), ("a4.8", "inner"), ("a8", "subln")])
def test_sparsity_matches_what_f_linear_sees(scheme, placement):
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(**TINY, activation_scheme=scheme, norm_placement=placement))
    tokens = np.random.default_rng(0).integers(0, 64, 200)
    ref = model(torch.from_numpy(tokens[:32].astype(np.int64))[None])[0]
    st = activation_sparsity(model, tokens, seq_len=16, batch_size=3)
    exp, gate_out = oracle(model, tokens, 16)
    assert st["tokens"] == 12 * 16 and st["activation_scheme"] == scheme
    for r in ROLES:
        assert st["input_zeros"][r] == pytest.approx(exp[r], abs=1e-12), r
    assert st["gate_output_zeros"] == pytest.approx(gate_out, abs=1e-12)
    # the hooks are gone and did not change the model
    assert torch.equal(model(torch.from_numpy(tokens[:32].astype(np.int64))[None])[0], ref)
    assert model.training
    # structure: a ReLU² gate zeroes about half at init; every zero gate output is a zero down input
    assert 0.2 < st["gate_output_zeros"] < 0.8
    assert st["input_zeros"]["down"] >= st["gate_output_zeros"]
    if scheme == "a4.8":
        assert st["input_zeros"]["o"] >= 0.5        # top-50%
        assert st["input_zeros"]["q"] > 0.05        # INT4 rounds small entries to zero
    sk = skippable(st, model)
    assert sk["skipped"]["up"] == st["gate_output_zeros"]
    assert 0 < sk["active_weights"] < 1
    assert sk["params"]["up"] == 2 * 32 * 48


def test_sparsity_bad_window():
    model = CausalLM(ModelConfig(**TINY))
    with pytest.raises(ValueError, match="window"):
        activation_sparsity(model, np.arange(10) % 64, seq_len=16)
