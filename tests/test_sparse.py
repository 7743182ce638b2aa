"""a4.8 in the engine and sparse decoding: the C quantizers against onebit.quant, the sparse
kernels against the dense ones (exact), and the engine's a4.8 / sparse paths against PyTorch."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from onebit import kernels, quant
from onebit.engine import EngineError, Runtime

from test_engine import assert_logits_close, make_packed, small_config, tokenizer  # noqa: F401

VARIANTS = [v for v in ("reference", "avx2") if v in kernels.available_isas()]


# ---- quantizers -----------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 7, 100, 2560])
def test_quantize_i4_matches_quant(k):
    x = torch.randn(16, k, generator=torch.Generator().manual_seed(k)) * 3
    x[3] = 0.0                                                       # an all-zero row
    codes, scale = kernels.quantize_act_i4(x.numpy())
    want_c, want_s = quant.int4_absmean(x)
    # mean|x| is summed in a different order than torch's: the scale may differ by an ulp, and
    # a code sitting on a rounding tie may then move by one step
    diff = np.abs(codes.astype(int) - want_c.numpy())
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    np.testing.assert_allclose(scale, want_s.numpy()[:, 0], rtol=1e-6, atol=0)
    assert codes.min() >= -8 and codes.max() <= 7


@pytest.mark.parametrize("k", [1, 5, 8, 12, 100, 2560, 6913])
def test_quantize_i4_variants_are_bit_identical(k):
    """The AVX2 INT4 quantizer is the scalar one (the spec) bit for bit: same RMSNorm, same
    summation order of mean|y|, same ties; with and without a norm weight, awkward widths."""
    g = np.random.default_rng(k)
    x = (g.standard_normal((9, k)) * np.exp(g.uniform(-8, 8, (9, 1)))).astype(np.float32)
    x[2] = 0.0
    x[4, ::3] = 0.5 * np.float32(x[4].std())                       # repeated values
    w = (g.random(k) + 0.5).astype(np.float32)
    for norm in (None, w):
        got = {}
        for v in VARIANTS:
            with kernels.use(v):
                got[v] = kernels.quantize_act_i4(x, norm, 1e-5) if norm is not None \
                    else kernels.quantize_act_i4(x)
        for v in VARIANTS[1:]:
            np.testing.assert_array_equal(got[v][0], got["reference"][0])
            np.testing.assert_array_equal(got[v][1].view(np.uint32), got["reference"][1].view(np.uint32))


def test_quantize_i4_with_norm_matches_bitlinear():
    from onebit.nn import RMSNorm

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 256, generator=g), torch.rand(256, generator=g) + 0.5
    norm = RMSNorm(256, 1e-5)
    norm.weight.data = w
    want_c, _ = quant.int4_absmean(norm(x).detach())
    codes, _ = kernels.quantize_act_i4(x.numpy(), w.numpy(), 1e-5)
    assert (codes != want_c.numpy()).mean() < 1e-3


@pytest.mark.parametrize("keep", [0.5, 0.3, 1.0, 1e-9])
def test_quantize_topk_matches_quant(keep):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 300, generator=g)
    x[2, :50] = 1.25                                                 # ties at the threshold
    x[5] = 0.0
    codes, scale = kernels.quantize_act_topk_i8(x.numpy(), keep)
    want_c, want_s = quant.int8_absmax(quant.topk_sparsify(x, keep))
    assert np.array_equal(codes, want_c.numpy())
    assert np.array_equal(scale, want_s.numpy()[:, 0])
    kept = max(1, int(np.ceil(keep * 300)))
    assert ((codes != 0).sum(1) <= kept).all()
    if kept < 300:  # row 2: ties at the threshold keep the lowest indices (both implementations)
        above = int((x[2].abs() > 1.25).sum())
        tied_kept = np.flatnonzero(codes[2, :50])
        assert list(tied_kept) == list(range(min(50, max(0, kept - above))))


def test_quantizers_refuse_bad_input():
    x = np.ones((2, 8), np.float32)
    with pytest.raises(ValueError, match="keep"):
        kernels.quantize_act_topk_i8(x, 0.0)
    with pytest.raises(ValueError, match="keep"):
        kernels.quantize_act_topk_i8(x, 1.5)
    x[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        kernels.quantize_act_i4(x)


# ---- sparse kernels -------------------------------------------------------------------------

SHAPES = [(1, 1), (5, 3), (128, 128), (130, 300), (257, 129), (640, 2560), (2560, 691), (4250, 77)]


@pytest.mark.parametrize("n,k", SHAPES)
def test_transpose_is_the_packing_of_wt(n, k):
    rng = np.random.default_rng(n * 7 + k)
    codes = rng.integers(-1, 2, size=(n, k)).astype(np.int8)
    wt = kernels.transpose_packed_i2(kernels.pack(codes, "i2"), k)
    assert np.array_equal(wt, kernels.pack(np.ascontiguousarray(codes.T), "i2"))


def test_transpose_refuses_a_corrupt_code():
    w = kernels.pack(np.zeros((4, 128), np.int8), "i2")
    w[2, 5] |= 0x03                                                  # code 3
    with pytest.raises(ValueError, match="invalid code"):
        kernels.transpose_packed_i2(w, 128)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8, 0.99, 1.0])
def test_colsparse_equals_dense(variant, n, k, sparsity):
    rng = np.random.default_rng(n + k)
    codes = rng.integers(-1, 2, size=(n, k)).astype(np.int8)
    w = kernels.pack(codes, "i2")
    wt = kernels.transpose_packed_i2(w, k)
    x = rng.integers(-128, 128, size=(3, k)).astype(np.int8)         # -128 too: the kernel allows it
    x[rng.random((3, k)) < sparsity] = 0
    xs = rng.random(3).astype(np.float32) + 0.1
    want = kernels.linear(w, k, "i2", 0.37, x, xs)
    with kernels.use(variant):
        for threads in (1, 2, 3):
            with kernels.threads(threads):
                assert np.array_equal(kernels.linear_colsparse_i2(wt, n, 0.37, x, xs), want)


def test_colsparse_worst_case_sums_are_exact():
    """Every input nonzero and extreme (|x| = 128 with code 2): the int16 partial sums flush
    before they could overflow."""
    n, k = 256, 4096
    w = kernels.pack(np.ones((n, k), np.int8), "i2")
    x = np.full((1, k), -128, np.int8)
    got = kernels.linear_colsparse_i2(kernels.transpose_packed_i2(w, k), n, 1.0, x, np.ones(1, np.float32))
    assert (got == -128.0 * k).all()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout", ["i2", "t1_6"])
@pytest.mark.parametrize("n,k", SHAPES)
def test_row_list_equals_dense(variant, layout, n, k):
    rng = np.random.default_rng(n * k)
    codes = rng.integers(-1, 2, size=(n, k)).astype(np.int8)
    w = kernels.pack(codes, layout)
    x = rng.integers(-127, 128, size=(1, k)).astype(np.int8)
    want = kernels.linear(w, k, layout, 0.5, x, np.array([0.25], np.float32))[0]
    for rows in (np.arange(n), rng.permutation(n)[: max(1, n // 3)], np.array([n - 1, 0]), np.array([], np.int64)):
        with kernels.use(variant):
            got = kernels.linear_rows(w, k, layout, 0.5, x, 0.25, rows)
        assert np.array_equal(got[rows], want[rows])
        assert np.isnan(np.delete(got, rows)).all()                  # unlisted rows untouched


def test_sparse_kernels_refuse_bad_input():
    w = kernels.pack(np.zeros((4, 128), np.int8), "i2")
    x = np.zeros((1, 128), np.int8)
    with pytest.raises(ValueError, match="rows must lie"):
        kernels.linear_rows(w, 128, "i2", 1.0, x, 1.0, [4])
    with pytest.raises(ValueError, match="transpose"):
        kernels.linear_colsparse_i2(w, 4, 1.0, x, np.ones(1, np.float32))  # w itself, not wt


# ---- engine ---------------------------------------------------------------------------------

A48 = dict(norm_placement="subln", hidden_act="relu2", activation_scheme="a4.8")


def engine_logits(folder, ids):
    rt = Runtime(folder)
    assert rt.activation_scheme == "a4.8" and rt.sparse
    rt.reset(64)
    full = rt.forward(ids, 0, last_only=False)
    rt.reset(64)                                                      # prefill 25, then one by one
    rt.forward(ids[:25], 0)
    steps = np.stack([rt.forward(ids[i:i + 1], i) for i in range(25, 40)])
    return full, steps


@pytest.mark.parametrize("keep", [1.0, 0.5])
@pytest.mark.parametrize("placement", ["subln", "inner"])
def test_engine_a48_matches_pytorch_and_reference(tmp_path, tokenizer, placement, keep):  # noqa: F811
    """The engine's a4.8 logits against PyTorch's fake-quant forward and the float64 reference
    (formats.model_io.reference_logits). Position 0 is checked loosely: there attention returns v
    itself: its o_proj input (and everywhere the down_proj input, ReLU²(g)·u) is an integer
    ratio times scales, so values land exactly on rounding points (x.5) and on equal magnitudes
    at the top-K threshold, and each implementation's last-ulp norm arithmetic (1/sqrtf vs
    torch.rsqrt, float32 vs float64) picks a side. With INT4 a flip moves a code by 1/8 of its
    range, and through the KV of position 0 it reaches later positions. PyTorch (exact-integer
    eval path) equals the float64 reference to 1e-4 here; the engine differs from both by 0-15%
    of the logit range at some positions, with the same argmax at >= 85% of them."""
    from onebit.formats.model_io import read_packed_folder, reference_logits

    cfg = small_config(**{**A48, "norm_placement": placement, "topk_keep": keep})
    model, folder = make_packed(tmp_path, tokenizer, cfg)
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, 40)
    with torch.no_grad():
        want = model(torch.tensor(ids)[None])[0][0].numpy()
    ref = reference_logits(read_packed_folder(folder), ids)
    full, steps = engine_logits(folder, ids)
    assert np.array_equal(want.argmax(-1), ref.argmax(-1))          # PyTorch = reference
    np.testing.assert_allclose(want, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    for got, oracle in ((full, want), (steps, want[25:])):
        err = np.abs(got - oracle).max(-1) / np.abs(oracle).max()
        assert err.max() < 0.25 and np.median(err) < 0.1, np.round(err, 4)
        assert (got.argmax(-1) == oracle.argmax(-1)).mean() >= 0.85


@pytest.mark.parametrize("cfg_kw", [dict(norm_placement="subln", hidden_act="relu2"), A48,
                                    dict(A48, norm_placement="inner"),
                                    dict(norm_placement="pre", hidden_act="relu2")])
def test_sparse_decode_is_bit_identical_to_dense(tmp_path, tokenizer, cfg_kw):  # noqa: F811
    cfg = small_config(**cfg_kw)
    _, folder = make_packed(tmp_path, tokenizer, cfg)
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, 30)
    out = {}
    for sparse in (False, True):
        rt = Runtime(folder, sparse=sparse, sparse_min_zeros=0)     # sparse kernels every step
        assert rt.sparse == sparse and (rt.sparse_bytes > 0) == sparse
        rt.reset(64)
        out[sparse] = [rt.forward(ids[:10], 0)] + [rt.forward(ids[i:i + 1], i) for i in range(10, 30)]
    for a, b in zip(out[False], out[True]):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("cfg_kw,copies", [(dict(norm_placement="subln", hidden_act="relu2"), False),
                                           (A48, True)])
def test_sparse_default_costs_memory_only_for_a48(tmp_path, tokenizer, cfg_kw, copies):  # noqa: F811
    """Default (sparse=None): ReLU² models skip up_proj rows (no extra RAM); the transposed
    column-sparse copies are built only for a4.8 activations, or when asked for."""
    _, folder = make_packed(tmp_path, tokenizer, small_config(**cfg_kw))
    rt = Runtime(folder)
    assert rt.sparse and (rt.sparse_bytes > 0) == copies
    assert Runtime(folder, sparse=True).sparse_bytes > 0
    assert Runtime(folder, sparse=False).sparse_bytes == 0


def test_sparse_batched_decode_equals_one_by_one(tmp_path, tokenizer):  # noqa: F811
    import onebit

    _, folder = make_packed(tmp_path, tokenizer, small_config(**A48))
    m = onebit.load(folder)
    prompts = [[0, 5, 6, 7], [0, 9], [0, 11, 12]]
    together = m.generate_ids_batch(prompts, 12, temperature=0.0, stop_ids=())
    alone = [list(m.generate_ids(p, 12, temperature=0.0, stop_ids=())) for p in prompts]
    assert [list(t) for t in together] == alone


def test_engine_scheme_override_warns_and_sparse_needs_i2(tmp_path, tokenizer):  # noqa: F811
    cfg = small_config(norm_placement="subln", hidden_act="relu2")
    _, folder = make_packed(tmp_path, tokenizer, cfg)
    with pytest.warns(UserWarning, match="costs quality"):
        rt = Runtime(folder, activation_scheme="a4.8")
    assert rt.activation_scheme == "a4.8"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Runtime(folder)                                             # trained scheme: no warning
    with pytest.raises(EngineError, match="activation_scheme"):
        Runtime(folder, activation_scheme="a2")
    _, t16 = make_packed(tmp_path, tokenizer, cfg, layout="t1_6")
    assert not Runtime(t16).sparse                                  # auto: dense for t1_6
    with pytest.raises(EngineError, match="i2 layout"):
        Runtime(t16, sparse=True)
