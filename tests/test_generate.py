"""Samplers (onebit.sampling) and KV-cache generation (onebit.generate).

The oracle for generation is the slow, obviously correct loop: re-run the whole sequence without
a cache at every step and take the argmax of the last position.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from onebit.config import ModelConfig
from onebit.generate import generate, generate_text, stream_text
from onebit.model import CausalLM
from onebit.sampling import (apply_temperature, apply_top_k, apply_top_p, greedy, sample_next,
                             softmax, validate_sampling)

V = 512  # tiny preset vocab
CTX = 128  # tiny preset max_position_embeddings




def make_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> CausalLM:
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig.preset("tiny", **overrides))
    with torch.no_grad():
        # Norm weights start at 1, where "subln" and "inner" compute the same function: perturb
        # them so the two placements really differ.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model.to(dtype)


# Every architecture variant the cache must handle. tiny is GQA (4 heads, 2 kv heads).
# BitNet cases run in float64: in float32 a ~1e-7 difference between the cached and the full
# computation (different matmul/SDPA shapes) occasionally lands an activation on an INT8/INT4
# rounding boundary, and the flipped code moves the logits by ~1e-3 (measured: 6 of 60 seeds at
# 48 tokens). The quantizers themselves still run in float32, so this checks the same codes.
CASES = {
    "bitnet-subln": dict(linear="bitnet", norm_placement="subln"),
    "bitnet-inner": dict(linear="bitnet", norm_placement="inner"),
    "bitnet-a4.8": dict(linear="bitnet", activation_scheme="a4.8"),
    "fp-subln": dict(linear="fp", norm_placement="subln"),
    "fp-inner": dict(linear="fp", norm_placement="inner"),
    "fp-mha-untied": dict(linear="fp", num_key_value_heads=4, tie_word_embeddings=False),
    "fp-mqa-silu": dict(linear="fp", num_key_value_heads=1, hidden_act="silu"),
}


def case_model(name: str, seed: int = 0) -> CausalLM:
    cfg = CASES[name]
    return make_model(seed, torch.float64 if cfg["linear"] == "bitnet" else torch.float32, **cfg)


def greedy_reference(model: CausalLM, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


# ---------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------

def test_sampling_module_does_not_import_torch():
    code = "import sys, onebit.sampling; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("kwargs", [
    dict(temperature=0), dict(temperature=1e-6), dict(temperature=5.0, top_k=1, top_p=1.0),
    dict(temperature=np.float32(0.7), top_k=np.int64(3), top_p=np.float64(1e-9)),
])
def test_validate_sampling_accepts(kwargs):
    validate_sampling(**{"temperature": 1.0, "top_k": None, "top_p": None, **kwargs})


@pytest.mark.parametrize("name,value,hint", [
    ("temperature", -0.1, ">= 0"), ("temperature", float("nan"), ">= 0"),
    ("temperature", float("inf"), "finite"), ("temperature", True, ">= 0"),
    ("temperature", "1", ">= 0"),
    ("top_k", 0, ">= 1"), ("top_k", -3, ">= 1"), ("top_k", 2.0, "integer"), ("top_k", True, "integer"),
    ("top_p", 0.0, "(0, 1]"), ("top_p", 1.5, "(0, 1]"), ("top_p", -0.2, "(0, 1]"),
    ("top_p", float("nan"), "(0, 1]"),
])
def test_validate_sampling_rejects(name, value, hint):
    kwargs = {"temperature": 1.0, "top_k": None, "top_p": None, name: value}
    with pytest.raises(ValueError) as e:
        validate_sampling(**kwargs)
    assert f"{name}=" in str(e.value) and hint in str(e.value)
    with pytest.raises(ValueError, match=name):  # sample_next validates too
        sample_next(np.zeros(4), **kwargs)


def test_softmax_is_stable_and_masks():
    p = softmax([1000.0, 1000.0, -np.inf, 999.0])
    assert np.isfinite(p).all() and p.dtype == np.float64
    assert p[2] == 0.0 and p.sum() == pytest.approx(1.0, abs=1e-15)
    assert p[0] == p[1] and p[3] == pytest.approx(p[0] / np.e)


def test_apply_temperature_scales_and_flattens():
    x = np.array([2.0, -1.0, 0.5, 4.0])
    np.testing.assert_array_equal(apply_temperature(x, 2.0), x / 2.0)
    np.testing.assert_array_equal(apply_temperature(x, 1.0), x)
    entropy = [-(p * np.log(p)).sum() for p in (softmax(apply_temperature(x, t)) for t in (0.5, 1, 2))]
    assert entropy[0] < entropy[1] < entropy[2]
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(x, 0.0)


def test_apply_top_k_keeps_exactly_k():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    for k in (1, 3, 17, 49):
        y = apply_top_k(x, k)
        kept = np.flatnonzero(np.isfinite(y))
        assert kept.size == k
        assert set(kept) == set(np.argsort(-x)[:k])
        np.testing.assert_array_equal(y[kept], x[kept])
        assert np.isneginf(y[np.isinf(y)]).all()
    np.testing.assert_array_equal(apply_top_k(x, 50), x)
    np.testing.assert_array_equal(apply_top_k(x, 1000), x)


def test_apply_top_k_ties_keep_lowest_indices():
    y = apply_top_k(np.array([1.0, 2.0, 2.0, 2.0, 0.0]), 2)
    assert np.flatnonzero(np.isfinite(y)).tolist() == [1, 2]


def test_apply_top_p_boundary():
    x = np.log([0.5, 0.25, 0.125, 0.125])  # cumulative 0.5, 0.75, 0.875, 1
    for top_p, n_keep in [(1e-9, 1), (0.5 - 1e-9, 1), (0.5 + 1e-9, 2), (0.75 - 1e-9, 2),
                          (0.75 + 1e-9, 3), (0.875 + 1e-9, 4), (1.0, 4)]:
        y = apply_top_p(x, top_p)
        assert np.flatnonzero(np.isfinite(y)).tolist() == list(range(n_keep)), top_p
    # shuffled order: the kept set follows probability, not position
    y = apply_top_p(x[[2, 0, 3, 1]], 0.7)
    assert np.flatnonzero(np.isfinite(y)).tolist() == [1, 3]


def test_apply_top_p_ties_and_top_token():
    y = apply_top_p(np.zeros(4), 0.5)  # 0.25 each: cumulative reaches 0.5 exactly at 2 tokens
    assert np.flatnonzero(np.isfinite(y)).tolist() == [0, 1]
    x = np.array([0.0, 10.0, 0.0])
    assert np.flatnonzero(np.isfinite(apply_top_p(x, 1e-12))).tolist() == [1]


def test_samplers_do_not_mutate_input():
    x = np.array([3.0, 1.0, 2.0], dtype=np.float32)
    before = x.copy()
    apply_top_k(x, 1), apply_top_p(x, 0.1), apply_temperature(x, 0.5), softmax(x)
    sample_next(x, temperature=0.7, top_k=2, top_p=0.9, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(x, before)


def test_greedy_ties_go_to_lowest_index():
    assert greedy([1.0, 3.0, 3.0, 0.0]) == 1
    assert sample_next([1.0, 3.0, 3.0, 0.0], temperature=0) == 1
    assert sample_next(np.float32([-5, -1, -1]), temperature=0.0, top_k=3) == 1


def test_sample_next_rejects_bad_logits():
    for bad in ([0.0, np.nan], [0.0, np.inf], [0.0, -np.inf]):
        with pytest.raises(ValueError, match="NaN/inf"):
            sample_next(bad)
    with pytest.raises(ValueError, match="1-D"):
        sample_next(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="1-D"):
        sample_next([])


def test_sample_next_follows_the_tempered_distribution():
    x = np.array([1.0, 0.0, 2.0, -1.0])
    rng = np.random.default_rng(1)
    n = 20000
    for t in (0.5, 2.0):
        counts = np.bincount([sample_next(x, temperature=t, rng=rng) for _ in range(n)], minlength=4)
        expected = softmax(x / t)
        # 5 binomial standard deviations
        assert np.all(np.abs(counts / n - expected) < 5 * np.sqrt(expected * (1 - expected) / n) + 1e-9)


def test_sample_next_never_returns_a_masked_token():
    rng = np.random.default_rng(2)
    x = np.array([0.0, 0.1, 5.0, 0.2, 4.9, -3.0])
    got = {sample_next(x, temperature=3.0, top_k=2, rng=rng) for _ in range(500)}
    assert got == {2, 4}
    got = {sample_next(x, temperature=1.0, top_p=0.5, rng=rng) for _ in range(200)}
    assert got == {2}
    # extreme temperatures stay finite: tiny = greedy-like, huge = still only top-k
    assert sample_next(x, temperature=1e-300, rng=rng) == 2
    assert {sample_next(x, temperature=1e300, top_k=3, rng=rng) for _ in range(300)} == {2, 3, 4}


def test_sample_next_seeded_reproducible():
    x = np.random.default_rng(3).normal(size=100)
    draw = lambda seed: [sample_next(x, rng=rng) for rng in [np.random.default_rng(seed)] for _ in range(30)]
    assert draw(7) == draw(7)
    assert draw(7) != draw(8)
    assert 0 <= sample_next(x) < 100  # rng=None works


# ---------------------------------------------------------------------------------------------
# KV-cache generation against the no-cache reference
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_greedy_matches_uncached_reference(case):
    model = case_model(case)
    prompt = [5, 77, 300, 2, 411]
    got = list(generate(model, prompt, 12, temperature=0))
    assert got == greedy_reference(model, prompt, 12)


@pytest.mark.parametrize("case", sorted(CASES))
def test_chunked_prefill_and_decode_match_full_forward(case):
    model = case_model(case, seed=1).eval()
    ids = torch.randint(0, V, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = model(ids)                                        # [1, 40, V]
        model.setup_cache(batch=1, max_len=40, dtype=full.dtype)
        try:
            chunks = [model(ids[:, :17])[0], model(ids[:, 17:30], pos=17)[0]]
            chunks += [model(ids[:, t:t + 1], pos=t)[0] for t in range(30, 40)]
        finally:
            model.clear_cache()
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=0)


def test_generate_leaves_model_state_as_found():
    model = make_model()
    assert model.training
    it = generate(model, [1, 2, 3], 5, seed=0)
    for _ in it:
        # between yields the caller's grad mode and training flag are in place
        assert torch.is_grad_enabled() and model.training
        assert model.model.layers[0].self_attn.cache is not None
    assert model.training
    assert all(layer.self_attn.cache is None for layer in model.model.layers)
    assert all(p.grad is None for p in model.parameters())


def test_generate_closing_early_frees_the_cache_and_one_generation_at_a_time():
    model = make_model()
    first = generate(model, [1, 2, 3], 10, seed=0)
    next(first)
    with pytest.raises(RuntimeError, match="already has a KV cache"):
        next(generate(model, [4, 5], 3, seed=0))
    first.close()
    assert all(layer.self_attn.cache is None for layer in model.model.layers)
    assert len(list(generate(model, [4, 5], 3, seed=0))) == 3


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    model = make_model()
    run = lambda seed, **kw: list(generate(model, [10, 20, 30], 20, temperature=1.0, seed=seed, **kw))
    assert run(123) == run(123)
    assert run(123) != run(124)
    assert run(5, top_k=50, top_p=0.9) == run(5, top_k=50, top_p=0.9)


def test_top_k_one_and_tiny_top_p_are_greedy():
    model = make_model(seed=2)
    prompt = [3, 1, 4, 1, 5]
    ref = list(generate(model, prompt, 15, temperature=0))
    assert list(generate(model, prompt, 15, temperature=1.5, top_k=1, seed=9)) == ref
    assert list(generate(model, prompt, 15, temperature=1.5, top_p=1e-9, seed=9)) == ref


def test_stop_ids_end_generation_without_yielding_the_stop_token():
    model = make_model(seed=3)
    prompt = [9, 8, 7]
    kw = dict(temperature=1.0, seed=4)  # sampled, so the tokens vary (greedy may repeat one)
    ref = list(generate(model, prompt, 20, **kw))
    assert len(ref) == 20
    i = next(i for i in range(2, 20) if ref[i] not in ref[:i])
    assert list(generate(model, prompt, 20, stop_ids=[ref[i], V + 5], **kw)) == ref[:i]
    assert list(generate(model, prompt, 20, stop_ids=[ref[0]], **kw)) == []
    assert list(generate(model, prompt, 7, **kw)) == ref[:7]
    assert list(generate(model, prompt, 0)) == []


def test_generate_fills_the_context_exactly():
    model = make_model()
    out = list(generate(model, list(range(CTX - 4)), 4, temperature=0))
    assert len(out) == 4


@pytest.mark.parametrize("prompt,n,match", [
    ([], 4, "prompt is empty"),
    ([1, V], 4, f"prompt token 1 is {V}"),
    ([-1, 2], 4, "prompt token 0 is -1"),
    ([1, 2.5], 4, "prompt token 1"),
    ([1, 2], -1, "max_new_tokens=-1"),
    ([1] * 100, 29, "the prompt has 100 tokens and max_new_tokens=29, but the model's context is 128"),
    ([1] * 129, 0, "prompt has 129 tokens"),
])
def test_generate_request_errors_raise_at_call(prompt, n, match):
    model = make_model()
    with pytest.raises(ValueError, match=match) as e:
        generate(model, prompt, n)  # no iteration needed: checked eagerly
    if "context" in match:
        assert "shorten the prompt to at most 99 tokens or lower max_new_tokens to at most 28" in str(e.value)


@pytest.mark.parametrize("kwargs,name", [
    (dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p"),
])
def test_generate_sampling_errors_raise_at_call(kwargs, name):
    with pytest.raises(ValueError, match=name):
        generate(make_model(), [1, 2], 4, **kwargs)


def test_generate_on_bfloat16_model():
    model = make_model(linear="fp").to(torch.bfloat16)
    out = list(generate(model, [1, 2, 3], 6, seed=0))
    assert len(out) == 6 and all(0 <= t < V for t in out)


# ---------------------------------------------------------------------------------------------
# Text streaming
# ---------------------------------------------------------------------------------------------

SENTENCES = ["the quick brown fox jumps over the lazy dog", "a one-bit model is small and fast",
             "hello world, hello again", "ternary weights: minus one, zero, plus one"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer)
    assert tok.token_to_id("<s>") == 0 and tok.token_to_id("</s>") == 1  # = the config defaults
    return tok


def text_model(tokenizer: Tokenizer, seed: int = 0) -> CausalLM:
    return make_model(seed, vocab_size=tokenizer.get_vocab_size())


def test_stream_text_never_splits_a_multibyte_character(tokenizer):
    text = "café ü → ok"
    ids = tokenizer.encode(text).ids
    assert any(tokenizer.decode([i]) == "\ufffd" for i in ids)  # really split into byte tokens
    pieces = list(stream_text(tokenizer, ids))
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "é" in pieces[[i for i, p in enumerate(pieces) if "é" in p][0]]
    # an incomplete character at the very end is flushed as decode() renders it
    dangling = tokenizer.encode("ok é").ids[:-1]
    assert "".join(stream_text(tokenizer, dangling)) == tokenizer.decode(dangling)
    assert tokenizer.decode(dangling).endswith("\ufffd")
    assert list(stream_text(tokenizer, [])) == []


def test_generate_text_round_trip(tokenizer):
    model = text_model(tokenizer)
    prompt = "hello world"
    kw = dict(temperature=1.0, top_k=40, seed=11)
    pieces = list(generate_text(model, tokenizer, prompt, 24, **kw))
    ids = [0] + tokenizer.encode(prompt, add_special_tokens=False).ids
    tokens = list(generate(model, ids, 24, stop_ids={1}, **kw))
    assert "".join(pieces) == tokenizer.decode(tokens)
    assert len(pieces) >= 1
    assert list(generate_text(model, tokenizer, prompt, 24, **kw)) == pieces  # seeded
    # without BOS the model sees a different prompt
    no_bos = list(generate(model, ids[1:], 24, stop_ids={1}, **kw))
    text = "".join(generate_text(model, tokenizer, prompt, 24, add_bos=False, **kw))
    assert text == tokenizer.decode(no_bos)


def test_generate_text_stops_at_eos(tokenizer):
    model = text_model(tokenizer, seed=4)
    ids = [0] + tokenizer.encode("the lazy dog", add_special_tokens=False).ids
    kw = dict(temperature=1.0, seed=6)
    ref = list(generate(model, ids, 16, **kw))
    i = next(i for i in range(2, 16) if ref[i] not in ref[:i])
    text = "".join(generate_text(model, tokenizer, "the lazy dog", 16, eos_id=ref[i], **kw))
    assert text == tokenizer.decode(ref[:i])
    text = "".join(generate_text(model, tokenizer, "the lazy dog", 16, eos_id=V + 1,
                                 stop_ids=[ref[i]], **kw))
    assert text == tokenizer.decode(ref[:i])


def test_generate_text_errors_and_early_close(tokenizer):
    model = text_model(tokenizer)
    with pytest.raises(ValueError, match="context is 128"):
        generate_text(model, tokenizer, "hello " * 80, 64)
    with pytest.raises(ValueError, match="prompt is empty"):
        generate_text(model, tokenizer, "", 4, add_bos=False)
    stream = generate_text(model, tokenizer, "hello", 30, temperature=1.0, seed=0, eos_id=V + 1)
    next(stream)
    stream.close()
    assert all(layer.self_attn.cache is None for layer in model.model.layers)
