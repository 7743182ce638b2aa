"""The continuous-batching engine (onebit.engine.batch): batch invariance token for token and
logprob for logprob, chunked prefill, joins, cancellation, prefix reuse, prompt logprobs, limits."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import onebit
from onebit import kernels
from onebit.config import ModelConfig
from onebit.engine import Runtime, SamplingParams, default_model_path
from onebit.engine.api import Model
from onebit.engine.batch import BatchEngine, EngineBusy, PromptTooLong
from onebit.engine.synth import write_random_model


def tiny_config(**kw) -> ModelConfig:
    # head_dim 64 (the AVX2 attention paths), a context long enough for split-K (pos >= 511)
    base = dict(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                bos_token_id=0, eos_token_id=1, norm_placement="subln", hidden_act="relu2")
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = write_random_model(tmp_path_factory.mktemp("tiny") / "m", tiny_config(), embedding="f32")
    return folder


def _events(req):
    return [(e.token, e.logprob, e.top_logprobs) for e in req if e.token is not None]


def _run(eng, prompts, params):
    reqs = [eng.submit(p, params) for p in prompts]
    while eng.step():
        pass
    return [_events(r) for r in reqs]


@pytest.mark.parametrize("kv_bits", [32, 3])
def test_runtime_chunked_prefill_equals_one_shot(tiny, kv_bits):
    """The logits of every position are the same floats whether the prompt is fed at once, in
    chunks of 7 or token by token, past 512 positions (split-K) and on 4 threads. Before the fix
    the attention's 4-key blocks and its tail summed in other orders (prefill != decode)."""
    rt = Runtime(tiny, kv_bits=kv_bits, batch_invariant=True)
    ids = np.random.default_rng(0).integers(2, 300, 600)
    with kernels.threads(4):
        outs = []
        for chunk in (600, 7, 1):
            rt.reset(640)
            rows = [rt.forward(ids[p:p + chunk], p, last_only=False) for p in range(0, 600, chunk)]
            outs.append(np.concatenate(rows))
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


@pytest.mark.parametrize("kv_bits,head", [(32, "f32"), (8, "i8"), (16, "f16")])
def test_batch_invariance_alone_vs_among_15(tiny, tmp_path, kv_bits, head):
    """At temperature 0 a request's tokens and logprobs (and top logprobs) are identical alone or
    among 15 others of other lengths, at any prefill chunking, past 512 positions, on 4 threads;
    with each LM head kernel (float32 numpy row by row, int8, float16)."""
    folder = tiny if head == "f32" else write_random_model(tmp_path / head, tiny_config(), embedding=head)
    m = onebit.load(folder, kv_bits=kv_bits)
    rng = np.random.default_rng(1)
    lens = [530, 3, 17, 100, 64, 1, 250, 9, 40, 560, 2, 33, 128, 77, 5, 300]
    prompts = [[0] + rng.integers(2, 300, n - 1).tolist() if n > 1 else [0] for n in lens]
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=3, ignore_eos=True)
    with kernels.threads(4):
        alone = {}
        for i in (0, 5, 9):
            eng = m.batch(slots=1, max_len=600, prefill_chunk=600)
            alone[i] = _run(eng, [prompts[i]], params)[0]
        for chunk in (13, 256):
            eng = m.batch(slots=16, max_len=600, prefill_chunk=chunk)
            together = _run(eng, prompts, params)
            for i, want in alone.items():
                assert together[i] == want, (i, chunk)
    assert all(len(v) == 12 for v in alone.values())


def test_batch_matches_model_generate_and_seeds(tiny):
    """Short contexts (no split-K): the engine's greedy and seeded sampled tokens equal
    Model.generate_ids; a request joining while others decode gets the same tokens."""
    m = onebit.load(tiny)
    prompts = [[0, 5, 9, 200], [0, 17], [0] + list(range(30, 90))]
    for kw in (dict(temperature=0.0), dict(temperature=1.0, top_k=40, seed=3),
               dict(temperature=0.7, top_p=0.9, min_p=0.05, repetition_penalty=1.3, seed=11)):
        want = [list(m.generate_ids(p, 20, stop_ids=set(), **kw)) for p in prompts]
        eng = m.batch(slots=4, prefill_chunk=8)
        params = SamplingParams(max_tokens=20, ignore_eos=True, **kw)
        r0 = eng.submit(prompts[0], params)
        for _ in range(5):   # r0 decodes a few tokens before the others join
            eng.step()
        rest = [eng.submit(p, params) for p in prompts[1:]]
        while eng.step():
            pass
        assert [r0.tokens()] + [r.tokens() for r in rest] == want


def test_cancel_frees_slot_and_stop_ids(tiny):
    m = onebit.load(tiny)
    eng = m.batch(slots=2)
    p = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    a, b = eng.submit([0, 3, 4], p), eng.submit([0, 5, 6], p)
    waiting = eng.submit([0, 7], p)
    eng.step()
    eng.step()
    assert eng.active == 2 and eng.queue_depth == 1
    a.cancel()
    eng.step()                 # a leaves, the waiting request takes its slot in the same step
    evs = list(a)
    assert evs[-1].finish_reason == "cancelled" and len(evs) == 3
    assert eng.active == 2 and eng.queue_depth == 0
    b.cancel()
    waiting.cancel()
    eng.step()
    assert eng.active == 0 and list(b)[-1].finish_reason == "cancelled"
    # a stop id ends the request without emitting it
    first = [t for t, _, _ in _run(eng, [[0, 3, 4]], SamplingParams(max_tokens=8, temperature=0,
                                                                       ignore_eos=True))[0]]
    stop = first[-1]
    evs = []
    eng.submit([0, 3, 4], SamplingParams(max_tokens=8, temperature=0, stop_ids={stop}),
               sink=evs.append)
    while eng.step():
        pass
    assert [e.token for e in evs[:-1]] == first[:first.index(stop)]
    assert evs[-1].finish_reason == "stop" and evs[-1].token is None


def test_prefix_reuse_skips_prefill(tiny):
    """The second turn of a chat starts with the first turn's tokens: they are not prefilled
    again, and the answer equals a run without the cache."""
    m = onebit.load(tiny)
    p = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    turn1 = [0] + list(range(10, 60))
    eng = m.batch(slots=2)
    out1 = [t for t, _, _ in _run(eng, [turn1], p)[0]]
    turn2 = turn1 + out1 + [70, 71, 72]
    before = eng.stats.prompt_tokens
    got = _run(eng, [turn2], p)[0]
    assert eng.stats.reused_tokens == len(turn1) + len(out1) - 1  # the last answer token was not fed
    assert eng.stats.prompt_tokens - before == 4
    fresh = m.batch(slots=2)
    assert _run(fresh, [turn2], p)[0] == got and fresh.stats.reused_tokens == 0


def test_prompt_logprobs_equal_full_forward(tiny):
    m = onebit.load(tiny)
    ids = [0] + list(range(40, 140))
    logits = Runtime(tiny, batch_invariant=True)
    logits.reset(256)
    full = logits.forward(ids, 0, last_only=False).astype(np.float64)
    lse = np.log(np.exp(full - full.max(-1, keepdims=True)).sum(-1)) + full.max(-1)
    want = [full[i, ids[i + 1]] - lse[i] for i in range(len(ids) - 1)]
    eng = m.batch(slots=2, prefill_chunk=16)
    evs = []
    eng.submit(ids, SamplingParams(max_tokens=0, prompt_logprobs=2), sink=evs.append)
    while eng.step():
        pass
    assert len(evs) == 1 and evs[0].finish_reason == "length"
    plp = evs[0].prompt_logprobs
    assert [t for t, _, _ in plp] == ids and plp[0][1] is None
    np.testing.assert_allclose([lp for _, lp, _ in plp[1:]], want, rtol=0, atol=1e-9)
    top = plp[5][2]
    assert len(top) == 2 and top[0][1] >= top[1][1]
    assert top[0][0] == int(np.argmax(full[4]))


def test_limits_and_bad_input(tiny):
    m = onebit.load(tiny)
    eng = m.batch(slots=1, max_len=64, max_queue=2)
    with pytest.raises(PromptTooLong, match="64"):
        eng.submit(list(range(64)), SamplingParams(max_tokens=1))
    eng.submit(list(range(64)), SamplingParams(max_tokens=0))   # fits when nothing is generated
    with pytest.raises(ValueError, match="token ids"):
        eng.submit([0, 300])
    with pytest.raises(ValueError, match="empty"):
        eng.submit([])
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=21)
    eng.submit([0, 1])
    eng.submit([0, 2])   # two waiting (beyond the one free slot's)
    with pytest.raises(EngineBusy, match="retry"):
        eng.submit([0, 3])
    with pytest.raises(ValueError, match="slots"):
        m.batch(slots=0)
    # generation stops at the context with "length"
    eng2 = m.batch(slots=1, max_len=20)
    evs = []
    eng2.submit(list(range(2, 17)), SamplingParams(max_tokens=100, ignore_eos=True), sink=evs.append)
    while eng2.step():
        pass
    assert len(evs) == 6 and evs[-1].finish_reason == "length"


def test_engine_thread_many_submitters():
    """The engine thread serves requests submitted from 8 threads at once; the built-in model
    with its tokenizer; greedy answers equal the solo ones."""
    m = onebit.load(default_model_path())
    texts = ["Once upon a time", "The sea", "He said", "It was night"]
    params = SamplingParams(max_tokens=16, temperature=0)
    solo = [list(m.generate_ids(m.encode(t), 16, temperature=0, stop_ids=m.batch(slots=1).stop_ids))
            for t in texts]
    results: dict[int, list[int]] = {}
    with m.batch(slots=4, max_queue=8) as eng:
        def client(i):
            results[i] = eng.submit(m.encode(texts[i % 4]), params).tokens()
        ts = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
    assert [results[i] for i in range(8)] == [solo[i % 4] for i in range(8)]
    assert isinstance(m, Model)


def test_text_stream_pieces_and_stop_strings():
    """TextStream's pieces add up to decode(all ids); a stop string ends the text just before it,
    even when it spans tokens."""
    from onebit.streaming import TextStream

    m = onebit.load(default_model_path())
    ids = list(m.generate_ids(m.encode("Once upon a time"), 80, temperature=0, stop_ids=set()))
    full = m.decode(ids)
    ts = TextStream(m.tokenizer)
    assert "".join(ts.push(t)[0] for t in ids) + ts.finish() == full
    for stop in (full[20:27], "\n", "no such text here"):
        ts, out = TextStream(m.tokenizer, [stop, "zz"]), ""
        for t in ids:
            piece, stopped = ts.push(t)
            out += piece
            if stopped:
                break
        else:
            out += ts.finish()
        assert out == (full[:full.find(stop)] if stop in full else full)
        assert ts.stopped == (stop in full)
