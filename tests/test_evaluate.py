"""onebit.evaluate.perplexity against a manual forward on the same windows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from onebit.config import ModelConfig
from onebit.evaluate import perplexity
from onebit.model import CausalLM

V = 512  # tiny preset vocab




def make_model(seed: int = 0, **overrides) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(ModelConfig.preset("tiny", **overrides))


def random_tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, size=n, dtype=np.int64)


def manual_loss(model: CausalLM, tokens: np.ndarray, seq_len: int, n_windows: int) -> float:
    """Mean CE of the model's own loss over windows tokens[i*S : i*S + S + 1], one big batch."""
    windows = torch.stack([torch.from_numpy(tokens[i * seq_len: i * seq_len + seq_len + 1])
                           for i in range(n_windows)])                        # [n, S+1]
    model.eval()
    with torch.no_grad():
        _, loss = model(windows[:, :-1], targets=windows[:, 1:])
    return loss.item()


@pytest.mark.parametrize("linear", ["bitnet", "fp"])
def test_perplexity_matches_manual_forward(linear):
    model = make_model(linear=linear)
    tokens = random_tokens(5 * 16 + 3)  # 5 full windows of 16 targets, 2 tokens left over
    got = perplexity(model, tokens, seq_len=16, batch_size=2)  # batches of 2, 2, 1
    want = manual_loss(model, tokens, 16, 5)
    assert got["tokens"] == 80
    assert got["loss"] == pytest.approx(want, rel=1e-6)
    assert got["ppl"] == pytest.approx(math.exp(want), rel=1e-6)
    assert got["ppl"] == pytest.approx(math.exp(got["loss"]), rel=1e-12)
    assert isinstance(got["loss"], float) and isinstance(got["ppl"], float)
    assert isinstance(got["tokens"], int)


def test_perplexity_max_tokens_and_batch_size():
    model = make_model(seed=1)
    tokens = random_tokens(200, seed=1)
    full = perplexity(model, tokens, seq_len=16)
    assert full["tokens"] == (200 - 1) // 16 * 16
    for bs in (1, 3, 64):
        assert perplexity(model, tokens, seq_len=16, batch_size=bs)["loss"] == pytest.approx(
            full["loss"], rel=1e-6)
    for max_tokens in (32, 47):  # at most max_tokens // seq_len = 2 windows, from the start
        got = perplexity(model, tokens, seq_len=16, max_tokens=max_tokens)
        assert got["tokens"] == 32
        assert got["loss"] == pytest.approx(manual_loss(model, tokens, 16, 2), rel=1e-6)
    assert perplexity(model, tokens, seq_len=16, max_tokens=10_000) == full


def test_perplexity_exact_window_count():
    model = make_model()
    tokens = random_tokens(17)
    assert perplexity(model, tokens, seq_len=16)["tokens"] == 16  # seq_len + 1 tokens: 1 window
    assert perplexity(model, random_tokens(33), seq_len=16)["tokens"] == 32  # windows share a token


def test_uniform_model_has_perplexity_vocab_size():
    model = make_model(tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: the uniform distribution over V tokens
    got = perplexity(model, random_tokens(100), seq_len=32, batch_size=2)
    assert got["loss"] == pytest.approx(math.log(V), rel=1e-7)
    assert got["ppl"] == pytest.approx(V, rel=1e-6)


def test_perplexity_restores_training_flag_and_records_no_grad():
    model = make_model()
    assert model.training
    perplexity(model, random_tokens(40), seq_len=8)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    perplexity(model, random_tokens(40), seq_len=8)
    assert not model.training


def test_perplexity_reads_a_memmap(tmp_path):
    model = make_model()
    tokens = random_tokens(70, seed=3)
    path = tmp_path / "val.bin"
    tokens.astype(np.uint16).tofile(path)
    mm = np.memmap(path, dtype=np.uint16, mode="r")
    assert perplexity(model, mm, seq_len=16) == perplexity(model, tokens, seq_len=16)


@pytest.mark.parametrize("tokens,kwargs,match", [
    (random_tokens(16), dict(seq_len=16), "tokens has 16 ids.*needs 17"),
    (random_tokens(5), dict(seq_len=16), "pass more tokens or lower seq_len"),
    (random_tokens(300), dict(seq_len=129), "seq_len=129 must be in \\[1, max_position_embeddings=128\\]"),
    (random_tokens(300), dict(seq_len=0), "seq_len=0"),
    (random_tokens(300), dict(seq_len=16, batch_size=0), "batch_size=0"),
    (random_tokens(300), dict(seq_len=16, max_tokens=15), "max_tokens=15 is below seq_len=16"),
    (np.array([1, 2, V, 3, 4]), dict(seq_len=4), f"id {V}, outside \\[0, vocab_size={V}\\)"),
    (np.array([1, 2, -1, 3, 4]), dict(seq_len=4), "id -1"),
    (random_tokens(40).reshape(2, 20), dict(seq_len=4), "1-D integer array"),
    (np.zeros(40, dtype=np.float32), dict(seq_len=4), "1-D integer array"),
])
def test_perplexity_errors(tokens, kwargs, match):
    with pytest.raises(ValueError, match=match):
        perplexity(make_model(), tokens, **kwargs)
