"""The engine's compact KV caches (docs/formats.md §10): the C row quantizer byte for byte against
onebit.quant (8/4/3 bits) and numpy's float16 (16 bits), the cache the attention kernel writes
(layout of onebit_kernels.h, BOS rule), its attention against a float64 oracle over the
dequantized rows, and the whole engine against the PyTorch model with the same kv_bits (logits as
tests/test_engine.py, greedy tokens identical)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

import onebit
from onebit import kernels, quant
from onebit.engine import Runtime
from onebit.engine.stats import kv_cache_bytes
from onebit.generate import generate as torch_generate
from test_engine import assert_logits_close, make_packed, small_config, tokenizer  # noqa: F401

BITS = (8, 4, 3)


def awkward_rows(rng: np.random.Generator, hd: int) -> np.ndarray:
    """Rows of every scale (fp16 subnormal steps to saturation), outliers, zeros, fp16 ties."""
    n = 400
    x = rng.standard_normal((n, hd)).astype(np.float32)
    x *= np.exp(rng.uniform(np.log(1e-7), np.log(1e6), n)).astype(np.float32)[:, None]
    x[:20, rng.integers(0, hd, 20)] *= 1000.0             # one outlier per row
    x[20] = 0.0                                          # all zero: step = fp16(1e-5 / h)
    x[21, :] = 1e-9                                       # below the 1e-5 clamp
    x[22, 0] = -3e5                                       # step saturates at 65504
    # m / h exactly between two fp16 values, for every h: ties to even both ways
    for i, (mant, h) in enumerate([(1 + 2**-11, 1), (1 + 3 * 2**-11, 1), (3 * 2**-25, 1)]):
        for j, hh in enumerate((4.0, 8.0, 128.0)):
            x[23 + 3 * i + j, :] = 0.1 * mant * hh
            x[23 + 3 * i + j, 1] = -mant * hh             # absmax on a negative value
    return x


@pytest.mark.parametrize("isa", ["reference", None])  # None: this CPU's (AVX2 unpacking, hd % 8 == 0)
@pytest.mark.parametrize("hd", [8, 32, 128, 5, 24])
@pytest.mark.parametrize("bits", BITS)
def test_kv_quantize_matches_quant(bits, hd, isa):
    x = awkward_rows(np.random.default_rng(bits * 1000 + hd), hd)
    packed, step = kernels.kv_quantize(x, bits)
    want_p, want_s = quant.quantize_kv(torch.from_numpy(x), bits)
    assert step.dtype == np.float16 and packed.dtype == np.uint8
    np.testing.assert_array_equal(step.view(np.uint16), want_s.numpy().view(np.uint16))
    np.testing.assert_array_equal(packed, want_p.numpy())
    with kernels.use(isa or kernels.isa()):
        got = kernels.kv_dequantize(packed, step, bits, hd)
    want = quant.dequantize_kv(want_p, want_s, bits, hd).numpy()
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def f16(x: np.ndarray) -> np.ndarray:
    """The 16-bit cache's values: IEEE float16, round to nearest even, saturating at +-65504."""
    return np.clip(x, -65504, 65504).astype(np.float16)


@pytest.mark.parametrize("isa", ["reference", None])
@pytest.mark.parametrize("hd", [8, 128, 5, 24])
def test_kv_f16_rows_match_numpy(hd, isa):
    x = awkward_rows(np.random.default_rng(hd), hd)             # 1e-7 .. 1e9: subnormals, saturation
    x[30, :3] = [65519.0, 65520.0, -7e4]                        # rounds to 65504; saturates; saturates
    x[31, :2] = [2.0**-25, 3 * 2.0**-26]                        # half the smallest subnormal: ties
    packed, step = kernels.kv_quantize(x, 16)
    assert packed.shape == (len(x), 2 * hd) and (step == 1.0).all()
    np.testing.assert_array_equal(packed.view(np.uint16), f16(x).view(np.uint16))
    assert np.isfinite(f16(x)).all() and f16(x)[30, 2] == -65504
    with kernels.use(isa or kernels.isa()):
        got = kernels.kv_dequantize(packed, step, 16, hd)
    np.testing.assert_array_equal(got, f16(x).astype(np.float32))


def test_kv_quantize_worked_example():
    x = np.array([[1.0, -1.0, 0.0, 0.3, -0.3, 0.6, -0.8, 0.25]], np.float32)
    for bits, want, step in ((3, "072ba3", 0x3400), (4, "0fa8c5a1", 0x3000),
                             (8, bytes([255, 0, 128, 166, 89, 204, 25, 160]).hex(), 0x2000)):
        p, s = kernels.kv_quantize(x, bits)
        assert p[0].tobytes().hex() == want and int(s.view(np.uint16)[0]) == step


def test_kv_quantize_errors():
    with pytest.raises(ValueError, match="bits=5"):
        kernels.kv_quantize(np.zeros((1, 8), np.float32), 5)
    for bits in (4, 16):
        with pytest.raises(ValueError, match="NaN or inf"):
            kernels.kv_quantize(np.array([[0.0, np.inf]], np.float32), bits)
    with pytest.raises(ValueError, match="head_dim=8"):
        kernels.kv_dequantize(np.zeros((1, 4), np.uint8), np.zeros(1, np.float16), 3, 8)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [T, heads, hd] at rows of cos/sin [T, hd/2] (rotate-half), float32 like the model."""
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([a * c + (-b) * s, b * c + a * s], -1).astype(np.float32)


def cache_rows(block: np.ndarray, Hkv: int, L: int, hd: int, bits: int, n: int):
    """(packed rows, steps) of positions 0..n-1 read from one cache block by the documented layout."""
    if bits == 16:  # float16 rows only, no steps
        assert block.size == Hkv * L * hd * 2
        return block.view(np.float16).reshape(Hkv, L, hd)[:, :n], None, None
    rb, rb4 = -(-hd * bits // 8), hd // 2
    steps = block[:Hkv * L * 2].view(np.float16).reshape(Hkv, L)[:, :n]
    codes = block[Hkv * L * 2:Hkv * L * (2 + rb)].reshape(Hkv, L, rb)[:, :n]
    bos = block[Hkv * L * (2 + rb):].reshape(Hkv, rb4) if bits == 3 else None
    assert block.size == Hkv * L * (2 + rb) + (Hkv * rb4 if bits == 3 else 0)
    return codes, steps, bos


@pytest.mark.parametrize("bits", BITS + (16,))
@pytest.mark.parametrize("isa", ["reference", None])
@pytest.mark.parametrize("H,Hkv,hd,L,chunks", [(4, 2, 32, 40, (7, 1, 5)),
                                               # long: blocks of 64 rows, grouped heads, tails
                                               (8, 2, 128, 300, (203, 1, 70)),
                                               # decode past 512 keys: split into key ranges
                                               (4, 1, 64, 620, (600, 1, 2)),
                                               # 3 heads per kv head, hd % 16 == 8: the generic loops
                                               (6, 2, 40, 560, (530, 1, 2))])
def test_attention_over_quantized_cache(bits, isa, H, Hkv, hd, L, chunks):
    """Prefill, then 1 token, then a few more: the cache holds quant.quantize_kv's bytes of the
    rotated K and of V (position 0 at 4 bits when bits == 3; float16 values at 16 bits), and y is
    softmax attention over the dequantized rows (float64 oracle)."""
    rng = np.random.default_rng(bits)
    lib = kernels._lib()
    nbytes = lib.ob_kv_cache_bytes(Hkv, L, hd, bits)
    ck, cv = np.zeros(nbytes, np.uint8), np.zeros(nbytes, np.uint8)
    ang = np.outer(np.arange(L, dtype=np.float64), 1.0 / 10000 ** (np.arange(0, hd, 2) / hd))
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    ks, vs, pos = [], [], 0
    ctx = kernels.use(isa) if isa else kernels.use(kernels.isa())
    with ctx:
        for T in chunks:
            q = rng.standard_normal((T, H, hd)).astype(np.float32)
            k = rng.standard_normal((T, Hkv, hd)).astype(np.float32) * 3
            v = rng.standard_normal((T, Hkv, hd)).astype(np.float32)
            q0, k0 = q.copy(), k.copy()
            y = np.empty((T, H * hd), np.float32)
            st = lib.ob_attention_kv(q.ctypes.data, k.ctypes.data, v.ctypes.data, T, pos, H, Hkv, hd,
                                     cos.ctypes.data, sin.ctypes.data, L, bits, ck.ctypes.data,
                                     cv.ctypes.data, L, y.ctypes.data)
            assert st == 0
            ks.append(rope(k0, cos[pos:pos + T], sin[pos:pos + T]))
            vs.append(v)
            qr = rope(q0, cos[pos:pos + T], sin[pos:pos + T])
            np.testing.assert_array_equal(q, qr)
            n = pos + T
            K, Vv = np.concatenate(ks), np.concatenate(vs)            # [n, Hkv, hd]
            deq = {}
            for name, block, X in (("k", ck, K), ("v", cv, Vv)):
                codes, steps, bos = cache_rows(block, Hkv, L, hd, bits, n)
                if bits == 16:
                    want16 = f16(X.transpose(1, 0, 2))                  # [Hkv, n, hd]
                    np.testing.assert_array_equal(codes.view(np.uint16), want16.view(np.uint16))
                    deq[name] = want16.astype(np.float64)
                    continue
                X = torch.from_numpy(X.transpose(1, 0, 2).copy())       # [Hkv, n, hd]
                wp, ws = quant.quantize_kv(X, bits)
                if bits == 3:
                    wp0, ws0 = quant.quantize_kv(X[:, :1], 4)
                    np.testing.assert_array_equal(bos, wp0[:, 0].numpy())
                    ws[:, 0] = ws0[:, 0]
                    codes = codes[:, 1:]
                    wp = wp[:, 1:]
                np.testing.assert_array_equal(codes, wp.numpy())
                np.testing.assert_array_equal(steps.view(np.uint16), ws.numpy().view(np.uint16))
                deq[name] = quant.fake_kv(X, bits, 0).numpy().astype(np.float64)   # [Hkv, n, hd]
            g = H // Hkv
            for t in range(T):
                for h in range(H):
                    kk, vv = deq["k"][h // g, :pos + t + 1], deq["v"][h // g, :pos + t + 1]
                    s = kk @ qr[t, h].astype(np.float64) / np.sqrt(hd)
                    p = np.exp(s - s.max())
                    want = (p / p.sum()) @ vv
                    np.testing.assert_allclose(y[t, h * hd:(h + 1) * hd], want, rtol=1e-4, atol=1e-5)
            pos = n


def test_kv_cache_bytes_layout():
    lib = kernels._lib()
    Hkv, L, hd = 5, 4096, 128
    assert lib.ob_kv_cache_bytes(Hkv, L, hd, 32) == Hkv * L * hd * 4
    assert lib.ob_kv_cache_bytes(Hkv, L, hd, 16) == Hkv * L * hd * 2       # llama.cpp's f16 cache
    assert lib.ob_kv_cache_bytes(Hkv, L, hd, 8) == Hkv * L * (128 + 2)
    assert lib.ob_kv_cache_bytes(Hkv, L, hd, 4) == Hkv * L * (64 + 2)
    assert lib.ob_kv_cache_bytes(Hkv, L, hd, 3) == Hkv * L * (48 + 2) + Hkv * 64
    assert lib.ob_kv_cache_bytes(Hkv, L, hd, 5) == 0


@pytest.fixture
def exact_zeros(monkeypatch):
    """The PyTorch oracle with the engine's exact zeros. A K/V value whose integer accumulator is
    0 is exactly 0.0 in the engine (exact int32 GEMM) but ~1e-7 of the row's absmax, either sign,
    in PyTorch's float fake-quant matmul; 0 sits on the mid-rise grid's threshold between codes
    h-1 and h, so that noise picks a code one step (at 3 bits 1/8 of the row's range) away and
    every later position sees it. Values below 1e-5 of their row's absmax (a nonzero accumulator
    is >= ~1e-3 of it) are set to 0 before PyTorch quantizes them."""
    fake = quant.fake_kv

    def snapped(x, bits, pos=0):
        tiny = x.detach().abs() < 1e-5 * x.detach().abs().amax(-1, keepdim=True)
        return fake(x.masked_fill(tiny, 0.0), bits, pos)

    monkeypatch.setattr(quant, "fake_kv", snapped)


@pytest.mark.usefixtures("exact_zeros")
@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("placement", ["subln", "inner"])
def test_engine_matches_pytorch_kv_bits(tmp_path, tokenizer, bits, placement):
    """Prefill, then token-by-token decode, and a 2-slot batch: the logits of the PyTorch model
    with the same kv_bits, to test_engine's tolerance; the cache is the quantized block."""
    cfg = small_config(norm_placement=placement, kv_bits=bits,
                       hidden_act="relu2" if placement == "subln" else "silu")
    model, folder = make_packed(tmp_path, tokenizer, cfg)
    ids = np.random.default_rng(bits).integers(0, cfg.vocab_size, 40)
    with torch.no_grad():
        want = model(torch.tensor(ids)[None])[0][0].numpy()                     # [T, V]
    rt = Runtime(folder)
    assert rt.kv_bits == bits
    rt.reset(64)
    assert rt.cache_k[0].dtype == np.uint8
    assert_logits_close(rt.forward(ids, 0, last_only=False), want)
    rt.reset(64, slots=2)
    rt.forward(ids[:25], 0, slot=1)
    got = [rt.forward(ids[t:t + 1], t, slot=1) for t in range(25, 40)]
    assert_logits_close(np.stack(got), want[25:])
    # the 16-bit model's logits differ: the cache really is quantized
    with torch.no_grad():
        model.set_kv_bits(16)
        off = model(torch.tensor(ids)[None])[0][0].numpy()
    assert np.abs(off - want).max() > 1e-3 * np.abs(want).max()


@pytest.mark.usefixtures("exact_zeros")
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_greedy_50_tokens_identical_kv_bits(tmp_path, tokenizer, bits):
    cfg = small_config(norm_placement="subln", hidden_act="relu2", kv_bits=bits)
    model, folder = make_packed(tmp_path, tokenizer, cfg)
    prompt = [0] + tokenizer.encode("Once upon a time").ids
    want = list(torch_generate(model, prompt, 50, temperature=0.0))
    got = list(onebit.load(folder).generate_ids(prompt, 50, temperature=0.0, stop_ids=()))
    assert len(want) == 50 and got == want


@pytest.mark.parametrize("bits", [16, 8, 4, 3])
def test_runtime_cache_bytes_follow_kv_cache_bytes(tmp_path, tokenizer, bits):
    """reset allocates kv_cache_bytes plus, at 3 bits, the unused 3-bit slot of position 0."""
    cfg = small_config(kv_bits=bits, num_hidden_layers=1)
    _, folder = make_packed(tmp_path, tokenizer, cfg)
    rt = Runtime(folder)
    for n, slots in ((64, 1), (512, 3)):
        rt.reset(n, slots)
        want = kv_cache_bytes(cfg, 32 if bits == 16 else bits, n)
        waste = 2 * cfg.num_hidden_layers * cfg.kv_heads * cfg.resolved_head_dim * 3 // 8 if bits == 3 else 0
        assert rt.cache_bytes == slots * (want + waste)
        assert rt.cache_bytes == sum(c.nbytes for c in rt.cache_k + rt.cache_v)


def test_synth_model_carries_kv_bits(tmp_path):
    from onebit.config import ModelConfig
    from onebit.engine.synth import write_random_model
    cfg = ModelConfig.preset("tiny", kv_bits=4)
    rt = Runtime(write_random_model(tmp_path / "m", cfg))
    assert rt.config.kv_bits == 4 and rt.kv_bits == 4
    rt.reset(32)
    assert rt.cache_k[0].dtype == np.uint8 and rt.cache_bytes == kv_cache_bytes(cfg, 4, 32)
    assert np.isfinite(rt.forward([1, 2, 3], 0)).all()


def test_bench_model_reports_kv_bytes(tmp_path):
    from onebit.benchmarks.model import bench_model
    from onebit.config import ModelConfig
    from onebit.engine.synth import write_random_model
    cfg = ModelConfig.preset("tiny", kv_bits=3)
    r = bench_model(write_random_model(tmp_path / "m", cfg), [8], 4, 1, 1)
    assert r["kv_bits"] == 3 and r["kv_context"] == 9
    assert r["kv_bytes"] == {str(n): kv_cache_bytes(cfg, 3, n) for n in (9, 4096, 16384)}
    assert r["kv_alloc_bytes"] >= r["kv_bytes"]["9"]


@pytest.mark.usefixtures("exact_zeros")
def test_load_kv_bits_overrides_the_config(tmp_path, tokenizer):
    """A model trained without KV quantization, run with a 3-bit cache: the logits of the PyTorch
    model set to 3 bits (what `onebit generate --kv-bits 3` runs)."""
    cfg = small_config(norm_placement="subln", hidden_act="relu2")
    model, folder = make_packed(tmp_path, tokenizer, cfg)
    ids = np.random.default_rng(5).integers(0, cfg.vocab_size, 30)
    with torch.no_grad():
        model.set_kv_bits(3)
        want = model(torch.tensor(ids)[None])[0][0].numpy()
    m = onebit.load(folder, kv_bits=3)
    assert m.runtime.config.kv_bits == 16 and m.runtime.kv_bits == 3
    m.runtime.reset(32)
    assert_logits_close(m.runtime.forward(ids, 0, last_only=False), want)
    assert Runtime(folder).kv_bits == Runtime(folder, kv_bits=32).kv_bits == 32  # float32 cache
    for bad in (5, "8", True, 0, 64):
        with pytest.raises(ValueError, match="kv_bits"):
            Runtime(folder, kv_bits=bad)


def test_bench_model_decodes_at_depth(tmp_path):
    from onebit.benchmarks.model import bench_model
    from onebit.config import ModelConfig
    from onebit.engine.synth import write_random_model
    folder = write_random_model(tmp_path / "m", ModelConfig.preset("tiny"))
    r = bench_model(folder, [8], 4, 1, 1, depths=[20, 0], kv_bits=4)
    assert r["kv_bits"] == 4 and r["kv_context"] == 25
    assert list(r["tg_depth"]) == ["0", "20"] and min(r["tg_depth"].values()) > 0
    with pytest.raises(ValueError, match="context"):
        bench_model(folder, [8], 4, 1, 1, depths=[10**6])


@pytest.mark.parametrize("placement", ["subln", "inner"])
def test_engine_f16_cache(tmp_path, tokenizer, placement, monkeypatch):
    """kv_bits=16 (llama.cpp's f16 cache): half the float32 cache's bytes, and the logits of the
    PyTorch model whose K/V (after RoPE) are rounded to float16 as the cache stores them, to
    test_engine's tolerance, for a prefill and for prefill + decode in a second slot. (Against the
    float32 cache they differ by ~1% of the largest logit on this tiny model, as much as the 8-bit
    cache: per-token INT8 activations carry the rounding on.)"""
    cfg = small_config(norm_placement=placement, hidden_act="relu2" if placement == "subln" else "silu")
    model, folder = make_packed(tmp_path, tokenizer, cfg)
    ids = np.random.default_rng(16).integers(0, cfg.vocab_size, 40)
    fake = quant.fake_kv
    monkeypatch.setattr(quant, "fake_kv", lambda x, bits, pos=0: x.clamp(-65504, 65504).half().float()
                        if bits == 16 else fake(x, bits, pos))
    with torch.no_grad():
        want = model(torch.tensor(ids)[None])[0][0].numpy()                     # [T, V]
    r32, r16 = Runtime(folder), Runtime(folder, kv_bits=16)
    assert (r32.kv_bits, r16.kv_bits) == (32, 16)
    r32.reset(64)
    r16.reset(64)
    assert 2 * r16.cache_bytes == r32.cache_bytes == kv_cache_bytes(cfg, 32, 64)
    assert r16.cache_bytes == kv_cache_bytes(cfg, 16, 64)
    assert_logits_close(r16.forward(ids, 0, last_only=False), want)
    r16.reset(64, slots=2)
    r16.forward(ids[:25], 0, slot=1)
    got = [r16.forward(ids[t:t + 1], t, slot=1) for t in range(25, 40)]
    assert_logits_close(np.stack(got), want[25:])
    assert not np.array_equal(r32.forward(ids, 0, last_only=False), r16.forward(ids, 0, last_only=False))
