"""C kernels (onebit.kernels) against numpy/torch oracles, for every variant this CPU runs.

Integer accumulators compare exactly with ``unpack(packed) @ x`` in int32; the activation
quantizer bit for bit with quant.int8_absmax; ``linear`` with the fake-quant BitLinear forward
within float tolerance (after the scales).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from onebit import kernels as K
from onebit import quant
from onebit.formats import PackedFormatError, pack, packed_row_bytes, unpack
from onebit.formats.packed_model import unpack_i4_rows
from onebit.nn import BitLinear, RMSNorm

LAYOUTS = ("i2", "t1_6")
BLOCK = {"i2": 128, "t1_6": 160}


def _impl_param(name: str):
    ok = name in K.available_isas()
    return pytest.param(name, marks=pytest.mark.skipif(not ok, reason=f"CPU lacks {name}"))


IMPLS = [_impl_param(v) for v in K.VARIANTS]


def oracle(packed: np.ndarray, k: int, layout: str, x: np.ndarray) -> np.ndarray:
    w = unpack(packed, k, layout).astype(np.int32)  # [n, k] in {-1, 0, 1}
    return x.astype(np.int32) @ w.T                 # [m, n], exact


def rand_case(rng, m, n, k, layout):
    w = rng.integers(-1, 2, size=(n, k), dtype=np.int8)
    x = rng.integers(-128, 128, size=(m, k), dtype=np.int8)
    return pack(w, layout), x


# ---------------------------------------------------------------------------------------------
# gemm: exact int32 parity
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("m", [1, 3, 17, 30])
@pytest.mark.parametrize("k", [1, 5, 127, 129, 160, 300, 2560])
def test_gemm_exact(impl, layout, m, k):
    rng = np.random.default_rng(1000 * m + k)
    with K.use(impl):
        for n in (1, 3, 64):
            packed, x = rand_case(rng, m, n, k, layout)
            np.testing.assert_array_equal(K.gemm(packed, k, layout, x), oracle(packed, k, layout, x))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("m", [3, 20, 30])  # row kernels (m < 24); panel GEMM with whole and edge tiles
def test_gemm_extremes_and_strided_rows(impl, layout, m):
    # |sum| = 128 * 6912 needs int32; every product at the int8 edge, so the int16 partial sums
    # of the SIMD kernels reach their bound; x rows strided (ldx > k); 20 weight rows fill a
    # whole 16-column panel and an edge one
    k = 6912
    w = np.stack([np.full(k, 1), np.full(k, -1), np.zeros(k), np.resize([1, -1, 0], k)] * 5).astype(np.int8)
    wide = np.empty((m, k + 77), dtype=np.int8)
    for r in range(m):
        wide[r, :k] = (-128, 127, np.resize([-128, 127], k))[r % 3]
    x = wide[:, :k]
    packed = pack(w, layout)
    with K.use(impl):
        acc = K.gemm(packed, k, layout, x)
    np.testing.assert_array_equal(acc, oracle(packed, k, layout, np.ascontiguousarray(x)))
    assert acc[0, 0] == -128 * k


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gemm_ignores_nonzero_padding(impl, layout):
    # padding lanes holding valid nonzero codes contribute nothing (they meet zero activations)
    rng = np.random.default_rng(7)
    k, n = 5, 3
    packed, x = rand_case(rng, 2, n, k, layout)
    want = oracle(packed, k, layout, x)
    dirty = packed.copy()
    if layout == "i2":
        dirty[:, k:] = 0xAA          # bytes 5..31: all four lanes code 2 (+1)
        dirty[:, :k] = (dirty[:, :k] & 0x03) | 0xA8  # bytes 0..4: lanes 1..3 (elements 32..) +1
    else:
        dirty[:, k:] = 255           # q = 242: every lane +1
    with K.use(impl):
        np.testing.assert_array_equal(K.gemm(dirty, k, layout, x), want)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout,bad_byte", [("i2", 0xFF), ("i2", 0x03), ("t1_6", 0x01), ("t1_6", 237)])
@pytest.mark.parametrize("where", [0, 40, -1])  # first byte, second block, last byte
def test_gemm_rejects_corrupt_packed(impl, layout, bad_byte, where):
    rng = np.random.default_rng(3)
    packed, x = rand_case(rng, 2, 3, 300, layout)
    packed[1, where] = bad_byte
    with K.use(impl), pytest.raises(PackedFormatError, match="invalid code"):
        K.gemm(packed, 300, layout, x)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("m", [1, 2, 7, 8, 13, 30])  # row kernels below 24 rows, the panel GEMM above
def test_gemm_threads_exact(impl, layout, m):
    # big enough to be split over threads; every thread count gives the oracle's integers,
    # including splits that leave a thread without columns (n < 16 * threads)
    rng = np.random.default_rng(m)
    for n, k in ((1000, 700), (40, 4000)):
        packed, x = rand_case(rng, m, n, k, layout)
        want = oracle(packed, k, layout, x)
        with K.use(impl):
            for nt in (1, 2, 3, 5):
                with K.threads(nt):
                    np.testing.assert_array_equal(K.gemm(packed, k, layout, x), want, err_msg=f"{nt} threads")


def test_gemm_concurrent_callers():
    # four Python threads (ctypes drops the GIL) share the pool: the losers run serially, exact
    import threading

    rng = np.random.default_rng(9)
    cases = [rand_case(rng, m, 700, 900, "i2") for m in (1, 3, 9, 20)]
    wants = [oracle(p, 900, "i2", x) for p, x in cases]
    errors: list[str] = []

    def run(i):
        p, x = cases[i]
        for _ in range(20):
            if not np.array_equal(K.gemm(p, 900, "i2", x), wants[i]):
                errors.append(f"caller {i}")

    with K.threads(2):
        ts = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    assert not errors


def test_c_pack_matches_numpy():
    rng = np.random.default_rng(2)
    for layout in LAYOUTS:
        for n, k in ((1, 1), (3, 127), (5, 160), (4, 1000), (2, 6912)):
            codes = rng.integers(-1, 2, size=(n, k + 3), dtype=np.int8)[:, :k]  # strided rows
            packed = K.pack(codes, layout)
            np.testing.assert_array_equal(packed, pack(np.ascontiguousarray(codes), layout))
            np.testing.assert_array_equal(K.unpack(packed, k, layout), codes)
    with pytest.raises(ValueError, match="must be ternary"):
        K.pack(np.full((2, 3), 2, np.int8), "i2")
    bad = pack(np.zeros((1, 5), np.int8), "i2")
    assert bad[0, 9] == 0x55  # padding elements 9, 41, 73, 105: code 1 (value 0) in every lane
    bad[0, 9] = 0x56          # element 9 -> code 2 (value +1): not allowed in padding
    with pytest.raises(PackedFormatError, match="nonzero padding"):
        K.unpack(bad, 5, "i2")
    bad[0, 9] = 0x57          # code 3: not a code at all
    with pytest.raises(PackedFormatError, match="invalid code"):
        K.unpack(bad, 5, "i2")


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_i8_exact(impl):
    rng = np.random.default_rng(4)
    # m = 8 and 37: a batched step's rows, in groups of 16 per weight row (OB_HEAD_ROWS) and a tail
    for m, n, k in ((1, 1, 1), (1, 7, 33), (3, 9, 64), (3, 64, 100), (2, 1000, 2560), (8, 65, 2560),
                    (37, 9, 130)):
        w = rng.integers(-127, 128, size=(n, k), dtype=np.int8)
        x = rng.integers(-127, 128, size=(m, k), dtype=np.int8)
        x[0, :3] = 127
        w[0, :3] = -127
        ws = rng.uniform(0.001, 0.1, n).astype(np.float32)
        xs = rng.uniform(0.001, 0.1, m).astype(np.float32)
        acc = (x.astype(np.int64) @ w.T.astype(np.int64)).astype(np.float32)
        want = acc * ws[None, :] * xs[:, None]
        with K.use(impl):
            np.testing.assert_array_equal(K.linear_i8(w, ws, x, xs), want)
    with pytest.raises(ValueError, match="-128"):
        K.linear_i8(w, ws, np.full((1, k), -128, np.int8), xs[:1])


def _attention_reference(q, k, v, pos, cos, sin, ck, cv):
    # numpy float64 oracle: rotate-half RoPE, cache write, causal GQA softmax attention
    T, H, hd = q.shape
    Hkv, half = k.shape[1], hd // 2

    def rope(x):
        c = cos[pos:pos + T, None, :].astype(np.float64)
        s_ = sin[pos:pos + T, None, :].astype(np.float64)
        a, b = x[..., :half].astype(np.float64), x[..., half:].astype(np.float64)
        return np.concatenate([a * c - b * s_, b * c + a * s_], axis=-1)

    q, k = rope(q), rope(k)
    ck, cv = ck.astype(np.float64), cv.astype(np.float64)
    ck[:, pos:pos + T] = k.transpose(1, 0, 2)
    cv[:, pos:pos + T] = v.transpose(1, 0, 2)
    y = np.zeros((T, H, hd))
    for t in range(T):
        for h in range(H):
            kv = h // (H // Hkv)
            sc = ck[kv, :pos + t + 1] @ q[t, h] / np.sqrt(hd)
            p = np.exp(sc - sc.max())
            y[t, h] = (p / p.sum()) @ cv[kv, :pos + t + 1]
    return y.reshape(T, H * hd), ck, cv


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T,pos,H,Hkv,hd", [(1, 0, 1, 1, 2), (1, 37, 4, 2, 64), (5, 0, 6, 2, 32),
                                            (7, 20, 20, 5, 128), (3, 9, 3, 3, 6), (2, 3, 2, 1, 72),
                                            (1, 300, 8, 2, 64),  # long context: grouped heads
                                            # few work items: the keys split over the threads
                                            (1, 700, 4, 1, 64), (1, 1500, 20, 5, 128), (2, 1000, 4, 1, 32),
                                            # prefill: blocks of 4 query tokens (AVX2), partial last
                                            # block, MHA and GQA, hd % 16 == 8
                                            (37, 20, 4, 4, 48), (66, 0, 8, 2, 64), (9, 100, 6, 2, 40)])
def test_attention_matches_reference(impl, T, pos, H, Hkv, hd):
    rng = np.random.default_rng(T * 100 + pos)
    L = max(64, pos + T + 8)
    ang = np.outer(np.arange(L), 1.0 / 10000 ** (np.arange(0, hd, 2) / hd))
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    q = rng.standard_normal((T, H, hd)).astype(np.float32)
    k = rng.standard_normal((T, Hkv, hd)).astype(np.float32)
    v = rng.standard_normal((T, Hkv, hd)).astype(np.float32)
    ck = rng.standard_normal((Hkv, L, hd)).astype(np.float32)  # positions < pos: earlier tokens
    cv = rng.standard_normal((Hkv, L, hd)).astype(np.float32)
    want, wk, wv = _attention_reference(q, k, v, pos, cos, sin, ck, cv)
    for nt in (1, 2):
        with K.threads(nt), K.use(impl):
            qq, kk, cck, ccv = q.copy(), k.copy(), ck.copy(), cv.copy()
            y = K.attention(qq, kk, v, pos, cos, sin, cck, ccv)
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(cck[:, :pos + T], wk[:, :pos + T], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(ccv[:, pos:pos + T], v.transpose(1, 0, 2))
    with pytest.raises(ValueError, match="must fit the cache"):
        K.attention(q.copy(), k.copy(), v, L - T + 1, cos, sin, ck.copy(), cv.copy())
    with pytest.raises(ValueError, match="multiple of Hkv"):
        K.attention(q.copy(), np.zeros((T, H + 1, hd), np.float32), np.zeros((T, H + 1, hd), np.float32),
                    pos, cos, sin, ck.copy(), cv.copy())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_validate_and_unchecked_linear(impl, layout):
    rng = np.random.default_rng(8)
    for m, n, k in ((1, 37, 300), (1, 600, 2560), (3, 64, 1000), (9, 40, 700)):
        packed, x = rand_case(rng, m, n, k, layout)
        xs = rng.uniform(0.01, 0.1, m).astype(np.float32)
        with K.use(impl):
            K.validate(packed, k, layout)
            np.testing.assert_array_equal(K.linear_unchecked(packed, k, layout, 0.5, x, xs),
                                          K.linear(packed, k, layout, 0.5, x, xs))
        bad = packed.copy()
        bad[n // 2, -1] = 0xFF if layout == "i2" else 0x01
        with pytest.raises(PackedFormatError, match="invalid code"):
            K.validate(bad, k, layout)


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_f16(impl):
    rng = np.random.default_rng(6)
    specials = np.array([0.0, -0.0, 6.1e-5, 5.96e-8, -3.0e-6, 65504.0, 1.0], np.float16)  # subnormals
    for m, n, k in ((1, 1, 1), (1, 9, 37), (3, 70, 300), (2, 500, 2560), (37, 21, 300)):
        w = (rng.standard_normal((n, k)) * 0.05).astype(np.float16)
        w[0, :min(k, specials.size)] = specials[:min(k, specials.size)]
        x = rng.standard_normal((m, k)).astype(np.float32)
        want = x.astype(np.float64) @ w.astype(np.float64).T
        with K.use(impl):
            got = K.linear_f16(w, x)
            # batch invariance: each row's floats are those of the row alone (the batched engine)
            for r in (0, m // 2, m - 1):
                np.testing.assert_array_equal(got[r], K.linear_f16(w, x[r:r + 1])[0])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.sqrt(k) * 70)
    # every one of the 65536 half values converts exactly (k = 1, x = 1): subnormals, inf, NaN
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16).reshape(-1, 1)
    with K.use(impl):
        got = K.linear_f16(halves, np.ones((1, 1), np.float32))[0]
    np.testing.assert_array_equal(got, halves[:, 0].astype(np.float32))


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_i4_exact(impl):
    rng = np.random.default_rng(14)
    for m, n, k in ((1, 1, 1), (1, 5, 63), (2, 33, 64), (3, 70, 200), (2, 300, 2560), (37, 9, 200)):
        q = rng.integers(-8, 8, size=(n, k), dtype=np.int8)
        q[0, 0] = -8
        x = rng.integers(-127, 128, size=(m, k), dtype=np.int8)
        ws = rng.uniform(0.001, 0.1, n).astype(np.float32)
        xs = rng.uniform(0.001, 0.1, m).astype(np.float32)
        want = (x.astype(np.int64) @ q.T.astype(np.int64)).astype(np.float32) * ws[None, :] * xs[:, None]
        with K.use(impl):
            np.testing.assert_array_equal(K.linear_i4(K.pack_i4(q), k, ws, x, xs), want)
        np.testing.assert_array_equal(unpack_i4_rows(K.pack_i4(q), k), q)  # the engine's lookup


def test_read_probe():
    buf = np.arange(1 << 16, dtype=np.uint64).view(np.uint8)
    s1 = K.read_probe(buf, 1)
    assert s1 == K.read_probe(buf, 2) != 0  # same checksum however it is split


# ---------------------------------------------------------------------------------------------
# quantize_act_i8
# ---------------------------------------------------------------------------------------------

def _act_cases():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((17, 300)).astype(np.float32)
    x[3] = 0.0                                  # all-zero row: amax clamps to 1e-5
    x[4, 7] = 3e4                               # huge outlier: the rest rounds to 0
    x[5] *= 1e-8                                # below the clamp
    x[6, :5] = [127.0, 0.5, 1.5, 2.5, -0.5]     # s = 1: ties round half to even
    x[7] = -1e30
    return x


def test_quantize_act_matches_int8_absmax():
    x = _act_cases()
    codes, scale = K.quantize_act_i8(x)
    ref_codes, ref_scale = quant.int8_absmax(torch.from_numpy(x))
    np.testing.assert_array_equal(codes, ref_codes.numpy())
    np.testing.assert_array_equal(scale, ref_scale.numpy()[:, 0])
    assert list(codes[6, :5]) == [127, 0, 2, 2, 0]


@pytest.mark.parametrize("m,k", [(1, 1), (1, 2560), (3, 5), (17, 129)])
def test_quantize_act_shapes_strided_and_torch(m, k):
    rng = np.random.default_rng(m * k)
    wide = (rng.standard_normal((m, k + 9)) * 4).astype(np.float32)
    x = wide[:, :k]                             # rows with stride k + 9
    ref_codes, ref_scale = quant.int8_absmax(torch.from_numpy(np.ascontiguousarray(x)))
    for arg in (x, torch.from_numpy(wide)[:, :k]):
        codes, scale = K.quantize_act_i8(arg)
        np.testing.assert_array_equal(codes, ref_codes.numpy())
        np.testing.assert_array_equal(scale, ref_scale.numpy()[:, 0])


@pytest.mark.parametrize("impl", IMPLS)
def test_quantize_act_variants_bit_identical(impl):
    # every variant sums squares in the reference's lane order: codes and scales equal bit for bit
    rng = np.random.default_rng(21)
    for k in (1, 7, 8, 9, 31, 32, 33, 100, 2560):
        x = (rng.standard_normal((5, k)) * rng.choice([1e-3, 1.0, 50.0], size=(5, 1))).astype(np.float32)
        x[1, : min(k, 4)] = 0.5  # exact ties after scaling
        nw = rng.uniform(0.5, 1.5, k).astype(np.float32)
        for norm in (None, nw):
            with K.use("reference"):
                want = K.quantize_act_i8(x, norm)
            with K.use(impl):
                got = K.quantize_act_i8(x, norm)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])
    bad = np.ones((2, 40), np.float32)
    for pos in (3, 39):  # in the SIMD body and in the scalar tail
        for val in (np.nan, np.inf):
            bad[1, pos] = val
            with K.use(impl), pytest.raises(ValueError, match="NaN or inf"):
                K.quantize_act_i8(bad)
            bad[1, pos] = 1.0


def test_quantize_act_with_rmsnorm():
    rng = np.random.default_rng(5)
    m, k = 17, 2560
    x = (rng.standard_normal((m, k)) * 3).astype(np.float32)
    norm = RMSNorm(k, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, k).astype(np.float32)))
        ref_codes, ref_scale = quant.int8_absmax(norm(torch.from_numpy(x)))
    codes, scale = K.quantize_act_i8(x, norm.weight.detach().numpy(), eps=1e-5)
    diff = np.abs(codes.astype(np.int16) - ref_codes.numpy().astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # float summation order only
    np.testing.assert_allclose(scale, ref_scale.numpy()[:, 0], rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# linear: a whole BitLinear against the fake-quant training forward
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("m,n,k", [(1, 64, 2560), (3, 3, 129), (17, 64, 300)])
def test_linear_matches_bitlinear(impl, layout, m, n, k):
    torch.manual_seed(m * n + k)
    layer = BitLinear(k, n, norm=False, act="int8")
    x = torch.randn(m, k)
    with torch.no_grad():
        want = layer(x).numpy()
    w_codes, w_scale = quant.ternary_absmean(layer.weight.detach())
    packed = pack(w_codes.numpy(), layout)
    with K.use(impl):
        xc, xs = K.quantize_act_i8(x.numpy())
        out = K.linear(packed, k, layout, float(w_scale), xc, xs)
    assert out.dtype == np.float32 and out.shape == (m, n)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("m", [1, 5, 40])
def test_linear_with_norm_matches_bitlinear(impl, layout, m):
    # the b1.58 BitLinear (its own RMSNorm inside) = fused norm+quantize, then the packed linear;
    # outlier tokens and an all-zero token included
    torch.manual_seed(m)
    n, k = 96, 700
    layer = BitLinear(k, n, norm=True, act="int8")
    with torch.no_grad():
        layer.norm.weight.uniform_(0.5, 1.5)
        x = torch.randn(m, k) * 2
        x[0, 3] = 400.0
        if m > 1:
            x[1] = 0.0
        want = layer(x).numpy()
    w_codes, w_scale = quant.ternary_absmean(layer.weight.detach())
    packed = pack(w_codes.numpy(), layout)
    with K.use(impl):
        xc, xs = K.quantize_act_i8(x.numpy(), layer.norm.weight.detach().numpy(), eps=layer.norm.eps)
        out = K.linear(packed, k, layout, float(w_scale), xc, xs)
    # the norm's float sum order may differ from torch's by an ulp, which can move a code by one
    # at a rounding tie: a difference of at most one activation step times a row of weights
    tol = float(w_scale) * xs[:, None] * k ** 0.5 * 4
    assert (np.abs(out - want) <= tol + 1e-5 * np.abs(want).max()).all()
    np.testing.assert_allclose(out, want, rtol=1e-3, atol=2e-3 * np.abs(want).max())


# ---------------------------------------------------------------------------------------------
# Bad input: clean exceptions before C runs
# ---------------------------------------------------------------------------------------------

def test_bad_inputs_raise():
    rng = np.random.default_rng(0)
    packed, x = rand_case(rng, 2, 3, 300, "i2")
    xs = np.ones(2, np.float32)
    with pytest.raises(TypeError, match="x_codes must have dtype int8"):
        K.gemm(packed, 300, "i2", x.astype(np.int16))
    with pytest.raises(TypeError, match="packed must have dtype uint8"):
        K.gemm(packed.view(np.int8), 300, "i2", x)
    with pytest.raises(ValueError, match="contiguous"):
        K.gemm(packed, 300, "i2", np.asfortranarray(x))
    with pytest.raises(ValueError, match="x_codes has 299 columns"):
        K.gemm(packed, 300, "i2", x[:, :299])
    with pytest.raises(PackedFormatError, match="does not fit k=200"):
        K.gemm(packed, 200, "i2", x[:, :200])                   # 3 blocks of bytes, k=200 is 2
    with pytest.raises(PackedFormatError, match="does not fit k=100"):
        K.gemm(packed, 100, "i2", x[:, :100])                   # k too small for the packed bytes
    with pytest.raises(ValueError, match="unknown packed layout"):
        K.gemm(packed, 300, "i3", x)
    with pytest.raises(ValueError, match="k=0"):
        K.gemm(packed, 0, "i2", x)
    with pytest.raises(ValueError, match=r"x_scale must have shape \[2\]"):
        K.linear(packed, 300, "i2", 0.5, x, np.ones(3, np.float32))
    with pytest.raises(ValueError, match="w_scale"):
        K.linear(packed, 300, "i2", float("nan"), x, xs)
    with pytest.raises(TypeError, match="x must have dtype float32"):
        K.quantize_act_i8(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="x must be 2-D"):
        K.quantize_act_i8(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="NaN or inf"):
        K.quantize_act_i8(np.array([[1.0, np.nan]], np.float32))
    with pytest.raises(ValueError, match=r"norm_weight must have shape \[4\]"):
        K.quantize_act_i8(np.zeros((2, 4), np.float32), np.ones(3, np.float32))
    with pytest.raises(ValueError, match="aligned"):
        K.quantize_act_i8(np.frombuffer(bytes(33), np.uint8)[1:].view(np.float32).reshape(2, 4))
    with pytest.raises(TypeError, match="numpy array"):
        K.gemm(packed.tolist(), 300, "i2", x)
    with pytest.raises(ValueError, match="unknown kernel variant"):
        with K.use("avx9000"):
            pass


def test_isa_and_threads():
    assert K.isa() in K.VARIANTS and "reference" in K.available_isas()
    if not os.environ.get("ONEBIT_KERNELS"):
        assert K.isa() in K.available_isas()[-2:]  # the fastest (verified) one is the default
    with K.use("reference") as impl:
        assert impl == K.isa() == "reference"
    n0 = K.get_num_threads()
    assert n0 >= 1
    with K.threads(3):
        assert K.get_num_threads() == 3
    assert K.get_num_threads() == n0
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="integer >= 1"):
            K.set_num_threads(bad)
    for v in K.VARIANTS:
        if v not in K.available_isas():
            with pytest.warns(UserWarning, match="does not run on this CPU"), K.use(v) as got:
                assert got == "reference"


@pytest.mark.parametrize("env,want,warns", [("reference", "reference", False), ("avx9000", "reference", True)])
def test_env_forces_variant(env, want, warns):
    code = ("import warnings; warnings.simplefilter('always'); import onebit.kernels as K\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    print(K.isa(), len(w))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ONEBIT_KERNELS": env},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == [want, "1" if warns else "0"]


def test_c_status_codes():
    # the raw ABI (csrc/onebit_kernels.h) rejects what the binding normally stops earlier
    lib = K._lib()
    packed, x = rand_case(np.random.default_rng(1), 2, 3, 300, "i2")
    acc = np.empty((2, 3), np.int32)
    args = (packed.ctypes.data, packed.nbytes, 3, 300, x.ctypes.data, 2, 300, acc.ctypes.data)
    assert lib.ob_gemm_i2(*args) == 0
    np.testing.assert_array_equal(acc, oracle(packed, 300, "i2", x))
    assert lib.ob_gemm_i2(None, *args[1:]) == -1                      # OB_ERR_NULL
    assert lib.ob_gemm_i2(*args[:3], 0, *args[4:]) == -2              # OB_ERR_SIZE
    assert lib.ob_gemm_i2(*args[:3], (1 << 24) + 1, *args[4:]) == -2  # k > OB_MAX_K
    assert lib.ob_gemm_i2(*args[:6], 299, args[7]) == -3              # OB_ERR_STRIDE
    # OB_ERR_BUFFER: the buffer length must be exactly n * row_bytes(k, layout); a t1_6 matrix
    # read as i2 (the engine's old layout-swap crash) is refused before any byte is read
    for w_bytes in (packed.nbytes - 1, packed.nbytes + 1, 3 * packed_row_bytes(300, "t1_6"), 0, -1):
        assert lib.ob_gemm_i2(args[0], w_bytes, *args[2:]) == -8
        assert lib.ob_validate_packed(args[0], w_bytes, 3, 300, 0) == -8
    assert lib.ob_gemm_i2(args[0], 1 << 62, 1 << 60, 300, *args[4:]) == -2  # n * row bytes overflows
    assert lib.ob_set_isa(b"avx9000") == -5                           # OB_ERR_ISA
    assert lib.ob_packed_row_bytes(300, 0) == packed_row_bytes(300, "i2") == 96
    assert lib.ob_packed_row_bytes(300, 1) == packed_row_bytes(300, "t1_6") == 64
    xf = np.array([[1.0, np.inf]], np.float32)
    out, sc = np.empty((1, 2), np.int8), np.empty(1, np.float32)
    assert lib.ob_quantize_act_i8(xf.ctypes.data, 1, 2, 2, None, 1e-5, out.ctypes.data,
                                  sc.ctypes.data) == -7               # OB_ERR_VALUE


# ---------------------------------------------------------------------------------------------
# glu: the decoder layer's gated activation, every path the same floats as a numpy spec
# ---------------------------------------------------------------------------------------------

def _expf_nonpos_spec(x: np.ndarray) -> np.ndarray:
    """ob_expf_nonpos in numpy float32, op for op (IEEE float32 mul/add/sub, no FMA)."""
    f = np.float32
    x = x.astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        n = np.floor(x * f(1.44269504088896341) + f(0.5))
        r = x - n * f(0.693359375)
        r = r - n * f(-2.12194440e-4)
        p = np.full_like(x, f(1.9875691500e-4))
        for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
            p = p * r + f(c)
        p = p * r * r + r + f(1.0)
        ni = np.nan_to_num(n, nan=0.0).astype(np.int32)
        y = (p.view(np.int32) + (ni << 23)).view(np.float32)
    return np.where(x < f(-87.0), f(0.0), y)


def _glu_spec(g: np.ndarray, u: np.ndarray, act: str) -> np.ndarray:
    f = np.float32
    with np.errstate(invalid="ignore", over="ignore"):
        if act == "relu2":
            r = np.where(g > 0, g, f(0.0)).astype(np.float32)
            return r * r * u
        e = _expf_nonpos_spec(-np.abs(g))
        sg = np.where(g >= 0, f(1.0) / (f(1.0) + e), e / (f(1.0) + e)).astype(np.float32)
        return g * sg * u


@pytest.mark.parametrize("isa", ["reference", None])
@pytest.mark.parametrize("act", ["silu", "relu2"])
@pytest.mark.parametrize("n", [1, 7, 8, 13, 4096, 3 * 2**15 + 5])  # the last one on threads
def test_glu_matches_spec(isa, act, n):
    rng = np.random.default_rng(n)
    g = (rng.standard_normal(n) * np.exp(rng.uniform(-3, 4, n))).astype(np.float32)
    u = rng.standard_normal(n).astype(np.float32)
    specials = np.array([0.0, -0.0, 1e-30, -1e-30, 86.9, -86.9, 87.5, -87.5, 1e30, -1e30, np.inf,
                         -np.inf, np.nan], np.float32)
    g[:min(n, len(specials))] = specials[:n]
    with K.use(isa or K.isa()), np.errstate(invalid="ignore", over="ignore"):
        got = K.glu(g, u, act)
    want = _glu_spec(g, u, act)
    nan = np.isnan(want)
    assert np.isnan(got[nan]).all()
    np.testing.assert_array_equal(np.where(nan, 0, got).view(np.uint32), np.where(nan, 0, want).view(np.uint32))
    if act == "silu":  # and it is silu: within a few float32 ulps of float64 math where finite
        ok = np.isfinite(g) & (np.abs(g) < 80)
        g64 = g[ok].astype(np.float64)
        exact = g64 / (1 + np.exp(-g64)) * u[ok]
        np.testing.assert_allclose(got[ok], exact, rtol=3e-6, atol=1e-37)


def test_glu_errors():
    with pytest.raises(ValueError, match="act='gelu'"):
        K.glu(np.zeros(3, np.float32), np.zeros(3, np.float32), "gelu")
    with pytest.raises(ValueError, match="same shape"):
        K.glu(np.zeros(3, np.float32), np.zeros(4, np.float32))
    with pytest.raises(TypeError, match="float32"):
        K.glu(np.zeros(3), np.zeros(3, np.float32))
