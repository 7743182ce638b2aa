"""onebit.quant pinned bit-exactly against independent oracles (BITNET.md §1-2).

Oracles:
- the BitNet b1.58 training-FAQ reference code (torch), written out below, for the ternary / INT8
  quantizers and their fake-quant forms;
- a numpy float32 transcription of the formulas (``np.round`` is half-to-even) for
  ``int8_absmax``, ``ternary_absmean`` and ``int4_absmean``. Inputs are chosen so that both sides
  reduce to the same float32 mean/max (small dyadic rationals, power-of-two row sizes and maxima),
  which makes exact comparison meaningful.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onebit import quant

F32 = np.float32
SQRT7_F32 = F32(math.sqrt(7.0))
EPS_F32 = F32(1e-5)




# ---------------------------------------------------------------------------------------------
# Oracle 1: the b1.58 FAQ reference code, verbatim
# ---------------------------------------------------------------------------------------------

def faq_weight_quant(w: torch.Tensor) -> torch.Tensor:
    scale = 1.0 / w.abs().mean().clamp_(min=1e-5)
    u = (w * scale).round().clamp_(-1, 1) / scale
    return u


def faq_activation_quant(x: torch.Tensor) -> torch.Tensor:
    scale = 127.0 / x.abs().max(dim=-1, keepdim=True).values.clamp_(min=1e-5)
    y = (x * scale).round().clamp_(-128, 127) / scale
    return y


# ---------------------------------------------------------------------------------------------
# Oracle 2: numpy float32, straight from the formulas
# ---------------------------------------------------------------------------------------------

def np_ternary(w: np.ndarray) -> tuple[np.ndarray, np.float32]:
    w = w.astype(F32)
    s = F32(1.0) / max(F32(np.abs(w).mean(dtype=F32)), EPS_F32)
    codes = np.clip(np.round(w * s), -1, 1)
    return codes.astype(np.int8), F32(1.0) / s


def np_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = x.astype(F32)
    s = F32(127.0) / np.maximum(np.abs(x).max(axis=-1, keepdims=True), EPS_F32)
    codes = np.clip(np.round(x * s), -128, 127)
    return codes.astype(np.int8), (F32(1.0) / s).astype(F32)


def np_int4(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = x.astype(F32)
    beta = np.abs(x).mean(axis=-1, keepdims=True, dtype=F32)
    s = SQRT7_F32 / (beta + EPS_F32)
    codes = np.clip(np.round(x * s), -8, 7)
    return codes.astype(np.int8), (beta / SQRT7_F32).astype(F32)


def dyadic(rng: np.random.Generator, shape, num: int = 64, den_log2: int = 4) -> np.ndarray:
    """Integers in [-num, num] over 2**den_log2: sums of few of them are exact in float32."""
    return (rng.integers(-num, num + 1, size=shape) / 2.0 ** den_log2).astype(F32)


def assert_np_equal(t: torch.Tensor, a: np.ndarray) -> None:
    assert t.shape == a.shape, (t.shape, a.shape)
    np.testing.assert_array_equal(t.numpy(), a, strict=True)


# ---------------------------------------------------------------------------------------------
# (a) FAQ reference
# ---------------------------------------------------------------------------------------------

SHAPES = [(1, 1), (3, 17), (64, 256), (2, 5, 33)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_fake_ternary_equals_faq(shape, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w[..., 0] *= 50  # entries > 2γ: where x + (q - x) would not round-trip to q
    out = quant.fake_ternary(w)
    assert out.dtype == w.dtype
    assert torch.equal(out, faq_weight_quant(w))
    s = 1.0 / w.abs().mean().clamp(min=1e-5)
    codes, scale = quant.ternary_absmean(w)
    assert codes.dtype == torch.int8 and codes.shape == w.shape
    assert torch.equal(codes, (w * s).round().clamp(-1, 1).to(torch.int8))
    assert scale.dtype == torch.float32 and scale.dim() == 0
    assert torch.equal(scale, 1.0 / s)


@pytest.mark.parametrize("shape", SHAPES + [(7,)])
@pytest.mark.parametrize("seed", [0, 1])
def test_fake_int8_equals_faq(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    out = quant.fake_int8(x)
    assert out.dtype == x.dtype
    assert torch.equal(out, faq_activation_quant(x))
    s = 127.0 / x.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)
    codes, scale = quant.int8_absmax(x)
    assert codes.dtype == torch.int8 and codes.shape == x.shape
    assert torch.equal(codes, (x * s).round().clamp(-128, 127).to(torch.int8))
    assert scale.shape == (*x.shape[:-1], 1) and scale.dtype == torch.float32
    assert torch.equal(scale, 1.0 / s)


def test_fake_ternary_takes_three_values():
    w = torch.randn(128, 96, generator=torch.Generator().manual_seed(3))
    out = quant.fake_ternary(w)
    gamma = 1.0 / (1.0 / w.abs().mean())
    vals = out.unique()
    assert vals.numel() == 3
    assert torch.equal(vals, torch.stack([-gamma, torch.zeros(()), gamma]))
    assert torch.allclose(gamma, w.abs().mean(), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# (b) numpy oracle
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n", [1, 8, 64, 1024])
def test_ternary_matches_numpy(seed, n):
    rng = np.random.default_rng(seed)
    w = dyadic(rng, (n // 8 or 1, min(n, 8)))  # power-of-two element count: the mean is exact
    codes, scale = quant.ternary_absmean(torch.from_numpy(w))
    rc, rs = np_ternary(w)
    assert_np_equal(codes, rc)
    assert scale.item() == rs


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("d", [1, 2, 16, 256])
def test_int8_matches_numpy(seed, d):
    rng = np.random.default_rng(seed)
    x = dyadic(rng, (32, d), num=63)
    # pin each row's absmax to a power of two so 127/max is exact whether computed as a
    # division (numpy) or as 127 * (1/max) (torch's scalar / tensor)
    e = rng.integers(-3, 8, size=32).astype(F32)
    x[:, 0] = np.where(rng.random(32) < 0.5, -1, 1) * F32(2.0) ** e
    x[:, 1:] = np.clip(x[:, 1:], -np.abs(x[:, :1]), np.abs(x[:, :1]))
    codes, scale = quant.int8_absmax(torch.from_numpy(x))
    rc, rs = np_int8(x)
    assert_np_equal(codes, rc)
    assert_np_equal(scale, rs)
    assert np.abs(rc[:, 0]).min() == 127


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("d", [1, 4, 64, 512])
def test_int4_matches_numpy(seed, d):
    rng = np.random.default_rng(seed)
    x = dyadic(rng, (64, d), num=200, den_log2=5)
    x[rng.random(x.shape) < 0.1] *= 40  # a few outliers so that the clamp at -8/7 is exercised
    codes, scale = quant.int4_absmean(torch.from_numpy(x))
    rc, rs = np_int4(x)
    assert_np_equal(scale, rs)
    # torch computes sqrt7/(β+ε) as sqrt7 * (1/(β+ε)), which can differ from the division in the
    # last bit; compare the rows where both readings of the formula give the same s
    beta = np.abs(x).mean(axis=-1, keepdims=True, dtype=F32)
    same_s = (SQRT7_F32 / (beta + EPS_F32) == SQRT7_F32 * (F32(1) / (beta + EPS_F32)))[:, 0]
    assert same_s.mean() > 0.4
    assert_np_equal(codes[torch.from_numpy(same_s)], rc[same_s])
    if d >= 64:
        assert rc.min() == -8 and rc.max() == 7


def test_int8_ties_round_half_to_even():
    # absmax 127 makes s == 1 exactly, so x*s == x: every ±(k + 0.5) below is an exact tie
    halves = [0.5, 1.5, 2.5, 3.5, 4.5, 125.5, 126.5]
    row = np.array([127.0] + halves + [-h for h in halves], dtype=F32)
    codes, scale = quant.int8_absmax(torch.from_numpy(row))
    assert scale.item() == 1.0
    expect = [127, 0, 2, 2, 4, 4, 126, 126, 0, -2, -2, -4, -4, -126, -126]
    assert codes.tolist() == expect
    assert_np_equal(codes, np_int8(row)[0])
    # and the fake form agrees with the FAQ code on the same ties
    assert quant.fake_int8(torch.from_numpy(row)).tolist() == [127.0] + [float(c) for c in expect[1:]]


def test_ternary_ties_round_half_to_even():
    # mean|w| == 1 so s == 1: ±0.5 are ties (→ 0, not ±1), ±1.5 round to ±2 then clamp to ±1
    w = np.array([0.5, -0.5, 1.5, -1.5, 1.0, -1.0, 1.0, -1.0], dtype=F32)
    codes, scale = quant.ternary_absmean(torch.from_numpy(w))
    assert scale.item() == 1.0
    assert codes.tolist() == [0, 0, 1, -1, 1, -1, 1, -1]
    assert_np_equal(codes, np_ternary(w)[0])


def _int4_tie_rows(target: float, n: int = 4) -> np.ndarray:
    """Rows [t, 1, 0, ...] (β = (t+1)/n exact in any summation order) with fl(t * s) == target."""
    u = 1.0
    t0 = F32(target * u / (n * math.sqrt(7.0) - target))
    for span in (20_000, 400_000):
        t = (np.arange(-span, span, dtype=np.int64) + int(t0.view(np.int32))).astype(np.int32).view(F32)
        beta = (t + F32(u)) / F32(n)
        s = SQRT7_F32 / (beta + EPS_F32)
        # exact tie under the division (numpy) and under torch's sqrt7 * (1/(β+ε)) alike
        ok = (t * s == F32(target)) & (s == SQRT7_F32 * (F32(1) / (beta + EPS_F32)))
        if ok.any():
            rows = np.zeros((2, n), dtype=F32)
            rows[:, 0] = [t[ok][0], -t[ok][0]]
            rows[:, 1] = u
            return rows
    raise AssertionError(f"no exact int4 tie found for {target}")


@pytest.mark.parametrize("target", [0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5])
def test_int4_ties_round_half_to_even(target):
    rows = _int4_tie_rows(target)
    codes, _ = quant.int4_absmean(torch.from_numpy(rows))
    k = math.floor(target)
    even = k if k % 2 == 0 else k + 1
    assert codes[:, 0].tolist() == [even, -even]
    assert_np_equal(codes, np_int4(rows)[0])


# ---------------------------------------------------------------------------------------------
# (c) edge cases: zeros, outliers, low-precision dtypes, ranks
# ---------------------------------------------------------------------------------------------

QUANTIZERS = {
    "ternary": quant.ternary_absmean,
    "int8": quant.int8_absmax,
    "int4": quant.int4_absmean,
}
FAKES = {
    "ternary": quant.fake_ternary,
    "int8": quant.fake_int8,
    "int4": quant.fake_int4,
    "topk": quant.fake_topk,
}


@pytest.mark.parametrize("name", QUANTIZERS)
@pytest.mark.parametrize("shape", [(5,), (3, 8), (2, 3, 8)])
def test_all_zero(name, shape):
    x = torch.zeros(shape)
    codes, scale = QUANTIZERS[name](x)
    assert torch.equal(codes, torch.zeros(shape, dtype=torch.int8))
    assert torch.isfinite(scale).all()
    fake = FAKES[name](x)
    assert torch.equal(fake, x) and not fake.isnan().any()


def test_zero_row_among_nonzero_rows():
    x = torch.randn(4, 16)
    x[2] = 0
    for name in ("int8", "int4"):
        codes, scale = QUANTIZERS[name](x)
        assert (codes[2] == 0).all() and torch.isfinite(scale).all()
        assert (codes[0] != 0).any()
        assert not FAKES[name](x).isnan().any()


@pytest.mark.parametrize("name", QUANTIZERS)
def test_huge_outliers(name):
    x = torch.full((2, 64), 1e-3)
    x[0, 7] = 1e30          # one huge outlier in a row of tiny values
    x[1] = 1e30             # a row of huge values
    x[1, ::2] = -1e30
    codes, scale = QUANTIZERS[name](x)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    qmax = {"ternary": 1, "int8": 127, "int4": 7}[name]
    assert codes[0, 7] == qmax
    assert (codes[0, :7] == 0).all() and (codes[0, 8:] == 0).all()
    assert (codes[1].abs() > 0).all()
    fake = FAKES[name](x)
    assert torch.isfinite(fake).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", QUANTIZERS)
def test_low_precision_inputs_quantize_in_fp32(dtype, name):
    x = (torch.randn(6, 40, generator=torch.Generator().manual_seed(5)) * 4).to(dtype)
    codes, scale = QUANTIZERS[name](x)
    codes32, scale32 = QUANTIZERS[name](x.float())
    assert torch.equal(codes, codes32) and torch.equal(scale, scale32)
    assert scale.dtype == torch.float32
    fake = FAKES[name](x)
    assert fake.dtype == dtype
    assert torch.equal(fake, FAKES[name](x.float()).to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_fake_equals_faq_in_fp32(dtype):
    x = (torch.randn(6, 40) * 4).to(dtype)
    assert torch.equal(quant.fake_int8(x), faq_activation_quant(x.float()).to(dtype))
    assert torch.equal(quant.fake_ternary(x), faq_weight_quant(x.float()).to(dtype))


def test_fp16_outlier():
    x = torch.full((1, 32), 1e-3, dtype=torch.float16)
    x[0, 3] = 6e4
    for name in QUANTIZERS:
        codes, scale = QUANTIZERS[name](x)
        assert torch.isfinite(scale).all() and codes[0, 3] > 0
        assert torch.isfinite(FAKES[name](x)).all()


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_per_token_over_last_dim(name):
    x = torch.randn(2, 3, 16)
    codes, scale = QUANTIZERS[name](x)
    assert scale.shape == (2, 3, 1)
    flat_codes, flat_scale = QUANTIZERS[name](x.reshape(6, 16))
    assert torch.equal(codes.reshape(6, 16), flat_codes)
    assert torch.equal(scale.reshape(6, 1), flat_scale)
    for i in range(2):  # each token on its own gives the same result
        c1, s1 = QUANTIZERS[name](x[i, 1])
        assert torch.equal(c1, codes[i, 1]) and torch.equal(s1, scale[i, 1])


def test_ternary_is_per_tensor():
    w = torch.randn(4, 5, 6)
    codes, scale = quant.ternary_absmean(w)
    c2, s2 = quant.ternary_absmean(w.reshape(-1))
    assert scale.dim() == 0 and torch.equal(scale, s2) and torch.equal(codes.reshape(-1), c2)
    assert torch.equal(quant.ternary_dequant(codes, scale), codes.float() * scale)


def test_inputs_are_not_mutated():
    x = torch.randn(4, 16)
    before = x.clone()
    for f in (*QUANTIZERS.values(), *FAKES.values(), quant.topk_sparsify):
        f(x)
    assert torch.equal(x, before)


# ---------------------------------------------------------------------------------------------
# (d) top-K sparsification
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [1e-9, 0.25, 0.3, 0.5, 0.75, 0.99])
@pytest.mark.parametrize("d", [1, 7, 64])
def test_topk_keeps_largest(keep, d):
    g = torch.Generator().manual_seed(d)
    mags = torch.stack([torch.randperm(d, generator=g) for _ in range(12)]).float() + 1  # distinct
    sign = torch.where(torch.rand(12, d, generator=g) < 0.5, -1.0, 1.0)
    x = (mags * sign).reshape(3, 4, d)
    y = quant.topk_sparsify(x, keep)
    k = math.ceil(keep * d)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert ((y != 0).sum(-1) == k).all()
    mask = y != 0
    assert torch.equal(y[mask], x[mask])
    # every kept |x| exceeds every dropped |x|
    kept_min = torch.where(mask, x.abs(), torch.inf).amin(-1)
    dropped_max = torch.where(mask, -torch.inf, x.abs()).amax(-1)
    assert (kept_min > dropped_max).all()
    ref = torch.zeros_like(x).scatter(-1, x.abs().topk(k, -1).indices, x.gather(-1, x.abs().topk(k, -1).indices))
    assert torch.equal(y, ref)


def test_topk_keep_one_is_identity():
    x = torch.randn(3, 10)
    y = quant.topk_sparsify(x, 1.0)
    assert torch.equal(y, x) and y is not x


@pytest.mark.parametrize("keep", [0.0, -0.5, 1.0001, 2, float("nan")])
def test_topk_bad_keep(keep):
    with pytest.raises(ValueError, match="keep"):
        quant.topk_sparsify(torch.randn(2, 4), keep)
    with pytest.raises(ValueError, match="keep"):
        quant.fake_topk(torch.randn(2, 4), keep)


def test_fake_topk_gradient_is_identity():
    x = torch.randn(4, 32, requires_grad=True)
    y = quant.fake_topk(x, 0.5)
    assert torch.equal(y.detach(), quant.topk_sparsify(x.detach(), 0.5))
    y.backward(torch.arange(128.0).reshape(4, 32))
    assert torch.equal(x.grad, torch.arange(128.0).reshape(4, 32))


# ---------------------------------------------------------------------------------------------
# (e) STE, λ blend, argument checks
# ---------------------------------------------------------------------------------------------

def _q(name, x):
    return FAKES[name](x, 1.0) if name != "topk" else quant.fake_topk(x, 0.5, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lam", [1.0, 0.3])
@pytest.mark.parametrize("name", FAKES)
def test_ste_gradient_is_identity(name, lam, dtype):
    x = torch.randn(3, 5, 16).to(dtype).requires_grad_()
    y = FAKES[name](x, lam=lam)
    y.sum().backward()
    assert x.grad.dtype == dtype
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("lam", [0.0, 0.25, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("name", FAKES)
def test_lambda_blend(name, lam):
    x = torch.randn(4, 24)
    q = _q(name, x)
    y = FAKES[name](x, lam=lam)
    if lam == 1.0:  # exactly q (x + (q - x) can be off by an ulp, see test_fake_ternary_*)
        assert torch.equal(y, q)
        assert torch.allclose(y, x + lam * (q - x), rtol=0, atol=1e-6)
    else:
        assert torch.equal(y, x + lam * (q - x))
    if lam == 0.0:
        assert torch.equal(y, x)


def test_lambda_zero_returns_input():
    x = torch.randn(4, 24, requires_grad=True)
    for name, f in FAKES.items():
        assert f(x, lam=0.0) is x, name


@pytest.mark.parametrize("lam", [-0.1, 1.5, float("nan")])
@pytest.mark.parametrize("name", FAKES)
def test_lambda_out_of_range(name, lam):
    with pytest.raises(ValueError, match="λ"):
        FAKES[name](torch.randn(2, 4), lam=lam)


@pytest.mark.parametrize("name", ["ternary", "int8", "int4", "topk", "f_ternary", "f_int8",
                                  "f_int4", "f_topk"])
def test_bad_inputs(name):
    f = {**{k: v for k, v in QUANTIZERS.items()}, "topk": quant.topk_sparsify,
         **{f"f_{k}": v for k, v in FAKES.items()}}[name]
    with pytest.raises(TypeError):
        f(torch.arange(8).reshape(2, 4))       # integer tensor
    with pytest.raises(TypeError):
        f([[1.0, 2.0]])                        # not a tensor
    with pytest.raises(ValueError):
        f(torch.tensor(1.5))                   # scalar: no token dimension


# ---------------------------------------------------------------------------------------------
# Property tests
# ---------------------------------------------------------------------------------------------

BIG = float(F32(1e30))
FINITE = st.one_of(
    st.floats(min_value=-BIG, max_value=BIG, allow_nan=False, allow_subnormal=False, width=32),
    st.floats(min_value=-8.0, max_value=8.0, allow_subnormal=False, width=32),
)
ARRAYS = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=24),
                    elements=FINITE)
QRANGE = {"ternary": (-1, 1), "int8": (-128, 127), "int4": (-8, 7)}


def _check_bound(name: str, x: np.ndarray) -> None:
    xt = torch.from_numpy(x)
    codes, scale = QUANTIZERS[name](xt)
    lo, hi = QRANGE[name]
    c = codes.numpy().astype(np.float64)
    assert codes.dtype == torch.int8 and codes.shape == xt.shape
    assert c.min() >= lo and c.max() <= hi
    sc = np.broadcast_to(scale.numpy().astype(np.float64), c.shape)
    assert np.isfinite(sc).all() and (sc >= 0).all()
    x64 = x.astype(np.float64)
    err = np.abs(x64 - c * sc)
    if name == "ternary":
        s = 1.0 / max(np.abs(x64).mean(), 1e-5)
    elif name == "int8":
        s = 127.0 / np.maximum(np.abs(x64).max(-1, keepdims=True), 1e-5)
    else:
        s = math.sqrt(7.0) / (np.abs(x64).mean(-1, keepdims=True) + 1e-5)
    in_range = (x64 * s >= lo - 0.5) & (x64 * s <= hi + 0.5)
    bound = sc / 2 * (1 + 1e-4) + 1e-30
    if name == "int4":
        # dequantization uses β/√7 but codes use s = √7/(β+ε): the ε costs (|c|+½)·ε/√7
        bound = bound + (np.abs(c) + 0.5) * 1e-5 / math.sqrt(7.0) * (1 + 1e-4)
    assert (err[in_range] <= bound[in_range]).all()


@settings(max_examples=200, deadline=None)
@given(ARRAYS)
def test_property_int8_bound(x):
    _check_bound("int8", x)


@settings(max_examples=200, deadline=None)
@given(ARRAYS)
def test_property_ternary_bound(x):
    _check_bound("ternary", x)


@settings(max_examples=200, deadline=None)
@given(ARRAYS)
def test_property_int4_bound(x):
    _check_bound("int4", x)


@settings(max_examples=100, deadline=None)
@given(ARRAYS)
def test_property_fake_forms_match_codes(x):
    xt = torch.from_numpy(x)
    c8, s8 = quant.int8_absmax(xt)
    assert torch.equal(quant.fake_int8(xt), faq_activation_quant(xt))
    assert torch.equal(quant.fake_ternary(xt), faq_weight_quant(xt))
    c4, s4 = quant.int4_absmean(xt)
    assert torch.equal(quant.fake_int4(xt), c4.float() * s4)
    assert ((quant.fake_int8(xt) == 0) == (c8 == 0)).all()
