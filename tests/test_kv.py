"""KV cache quantization (a4.8): the quantizer against a numpy oracle, the worked bytes of
docs/formats.md §10, the BOS rule, cached generation vs a full forward, memory accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from onebit import quant
from onebit.config import ConfigError, ModelConfig
from onebit.engine.stats import kv_cache_bytes, kv_row_bytes
from onebit.model import CausalLM

F32 = np.float32


def np_kv(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy float32 oracle of docs/formats.md §10 (step rounded to fp16, reciprocal in fp32)."""
    h = F32(2 ** (bits - 1))
    x = x.astype(F32)
    m = np.maximum(np.abs(x).max(-1), F32(1e-5))
    step = np.minimum(m / h, F32(65504)).astype(np.float16)
    r = F32(1) / step.astype(F32)
    codes = np.clip(np.floor(x * r[..., None]) + h, 0, 2 * h - 1).astype(np.uint8)
    return codes, step


def np_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """LSB-first bit string, written the slow way: one bit at a time."""
    hd = codes.shape[-1]
    out = np.zeros(codes.shape[:-1] + (-(-hd * bits // 8),), np.uint8)
    for idx in np.ndindex(codes.shape[:-1]):
        for i in range(hd):
            for j in range(bits):
                k = bits * i + j
                out[idx + (k // 8,)] |= ((int(codes[idx + (i,)]) >> j) & 1) << (k % 8)
    return out


# ---------------------------------------------------------------------------------------------
# The worked example of docs/formats.md §10 (golden bytes)
# ---------------------------------------------------------------------------------------------

ROW = [1.0, -1.0, 0.0, 0.3, -0.3, 0.6, -0.8, 0.25]
GOLDEN = {
    3: ([7, 0, 4, 5, 2, 6, 0, 5], 0.25, bytes([0x07, 0x2B, 0xA3])),
    4: ([15, 0, 8, 10, 5, 12, 1, 10], 0.125, bytes([0x0F, 0xA8, 0xC5, 0xA1])),
    8: ([255, 0, 128, 166, 89, 204, 25, 160], 1 / 128, bytes([255, 0, 128, 166, 89, 204, 25, 160])),
}


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_worked_example_bytes(bits):
    codes, step_v, raw = GOLDEN[bits]
    x = torch.tensor(ROW)
    c, s = quant.kv_quant_codes(x, bits)
    assert c.tolist() == codes and s.dtype == torch.float16 and s.item() == step_v
    packed, s2 = quant.quantize_kv(x, bits)
    assert bytes(packed.tolist()) == raw and torch.equal(s, s2)
    h = 2 ** (bits - 1)
    expect = torch.tensor([(c_ - (h - 0.5)) * step_v for c_ in codes])
    assert torch.equal(quant.dequantize_kv(packed, s, bits, 8), expect)
    assert torch.equal(quant.fake_kv(x[None], bits, pos=1)[0], expect)


def test_worked_example_3bit_dequant_values():
    packed, s = quant.quantize_kv(torch.tensor(ROW), 3)
    assert quant.dequantize_kv(packed, s, 3, 8).tolist() == [0.875, -0.875, 0.125, 0.375, -0.375,
                                                              0.625, -0.875, 0.375]


# ---------------------------------------------------------------------------------------------
# Against the numpy oracle; pack/unpack; error bounds
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("shape", [(1, 8), (2, 3, 5, 32), (4, 7), (3, 128)])
def test_codes_match_numpy_and_pack_roundtrips(bits, shape):
    rng = np.random.default_rng(bits * 100 + len(shape))
    x = (rng.standard_normal(shape) * rng.uniform(0.01, 30, shape[:-1] + (1,))).astype(F32)
    x[..., 0] = 0.0  # an exact zero in every row
    codes, step = quant.kv_quant_codes(torch.from_numpy(x), bits)
    ref_c, ref_s = np_kv(x, bits)
    np.testing.assert_array_equal(codes.numpy(), ref_c)
    np.testing.assert_array_equal(step.numpy(), ref_s)
    packed = quant.pack_kv(codes, bits)
    np.testing.assert_array_equal(packed.numpy(), np_pack(ref_c, bits))
    assert packed.shape[-1] == kv_row_bytes(shape[-1], bits) - 2
    assert torch.equal(quant.unpack_kv(packed, bits, shape[-1]), codes)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_roundtrip_error_bound(bits):
    torch.manual_seed(bits)
    x = torch.randn(64, 16, 64) * torch.rand(64, 16, 1) * 10
    packed, step = quant.quantize_kv(x, bits)
    y = quant.dequantize_kv(packed, step, bits, 64)
    m = x.abs().amax(-1, keepdim=True)
    # half a step Δ = absmax / 2^(bits-1); the fp16 rounding of Δ (relative 2^-11) can shift the top
    # code's value by (2^(bits-1) - 1/2)·Δ·2^-11 when it saturates: error <= Δ/2·(1 + 2^bits·2^-11)
    bound = m / 2 ** bits * (1 + 2 ** bits * 2 ** -11) + 1e-6
    assert ((x - y).abs() <= bound).all()
    # and the error is not trivially small: the grid really has 2^bits levels
    assert (x - y).abs().amax() > (m / 2 ** (bits + 2)).amin()
    assert len(torch.unique(quant.kv_quant_codes(x, bits)[0])) == 2 ** bits


def test_all_zero_and_huge_rows():
    z = torch.zeros(2, 16)
    y = quant.fake_kv(z[None], 3, pos=1)[0]
    assert torch.isfinite(y).all() and y.abs().max() < 1e-5
    big = torch.full((1, 8), 1e9)
    codes, step = quant.kv_quant_codes(big, 3)
    assert torch.isfinite(step).all() and step.item() == 65504.0 and (codes == 7).all()


def test_bad_bits_and_packed_shape():
    with pytest.raises(ValueError, match="bits"):
        quant.quantize_kv(torch.randn(2, 8), 2)
    with pytest.raises(ValueError, match="bits"):
        quant.fake_kv(torch.randn(1, 2, 8), 5)
    with pytest.raises(ValueError, match="uint8"):
        quant.unpack_kv(torch.zeros(2, 4, dtype=torch.uint8), 3, 8)
    with pytest.raises(TypeError):
        quant.quantize_kv(torch.arange(8).reshape(1, 8), 4)


# ---------------------------------------------------------------------------------------------
# fake_kv: BOS rule, STE
# ---------------------------------------------------------------------------------------------

def test_bos_row_at_4_bits_only_at_position_0():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 16)   # [B, Hkv, T, hd]
    y = quant.fake_kv(x, 3, pos=0)
    four = quant.dequantize_kv(*quant.quantize_kv(x[:, :, :1], 4), 4, 16)
    three = quant.dequantize_kv(*quant.quantize_kv(x, 3), 3, 16)
    assert torch.equal(y[:, :, :1], four) and torch.equal(y[:, :, 1:], three[:, :, 1:])
    assert not torch.equal(four, three[:, :, :1])
    assert torch.equal(quant.fake_kv(x, 3, pos=4), three)         # no BOS row in this chunk
    assert torch.unique(quant.kv_quant_codes(x[:, :, :1], 4)[0]).numel() > 8
    assert quant.kv_row_bits(3, 0) == 4 and quant.kv_row_bits(3, 1) == 3 and quant.kv_row_bits(4, 0) == 4
    # at 4 and 8 bits position 0 is not special
    for b in (4, 8):
        assert torch.equal(quant.fake_kv(x, b, pos=0), quant.dequantize_kv(*quant.quantize_kv(x, b), b, 16))
    assert quant.fake_kv(x, 16) is x


def test_fake_kv_gradient_is_identity():
    x = torch.randn(2, 4, 16, requires_grad=True)
    g = torch.randn(2, 4, 16)
    quant.fake_kv(x, 3, pos=0).backward(g)
    assert torch.equal(x.grad, g)


# ---------------------------------------------------------------------------------------------
# The model: config, cached generation == full forward with the same fake quant
# ---------------------------------------------------------------------------------------------

TINY = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)


@pytest.mark.parametrize("bad", [2, 5, 32, 0])
def test_config_kv_bits_validation(bad):
    with pytest.raises(ConfigError, match="kv_bits"):
        ModelConfig(**TINY, kv_bits=bad)
    with pytest.raises(ConfigError, match="kv_bits"):
        CausalLM(ModelConfig(**TINY)).set_kv_bits(bad)


@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("scheme", ["a8", "a4.8"])
def test_cached_generation_equals_full_forward_with_kv_quant(bits, scheme):
    # float64 weights: a one-ulp difference between the batched and the one-token matmul could
    # move a value across a rounding boundary of the (discontinuous) quantizers; in float64 the
    # values reaching them (computed in float32) are the same bits.
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(**TINY, kv_bits=bits, activation_scheme=scheme)).double().eval()
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        full, _ = model(ids)
        model.setup_cache(1, 16, dtype=torch.float64)
        steps = [model(ids[:, :5], pos=0)[0]] + [model(ids[:, t:t + 1], pos=t)[0] for t in range(5, 12)]
        model.clear_cache()
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-9, atol=1e-9)
    # the quantization is really applied: the same weights without it give other logits
    model.set_kv_bits(16)
    with torch.no_grad():
        plain, _ = model(ids)
    assert not torch.allclose(plain, full, atol=1e-4)
    assert model.config.kv_bits == 16


def test_attention_sees_fake_quantized_k_v(monkeypatch):
    """What scaled_dot_product_attention receives is exactly fake_kv(rope(k)) and fake_kv(v)."""
    import onebit.model as om

    torch.manual_seed(0)
    model = CausalLM(ModelConfig(**TINY, kv_bits=3)).eval()
    roped, vs, seen = [], [], []
    orig_rope, orig_sdpa = om.apply_rope, om.F.scaled_dot_product_attention

    def rope_spy(x, cos, sin):
        roped.append(orig_rope(x, cos, sin))
        return roped[-1]

    def sdpa_spy(q, k, v, *a, **kw):
        seen.append((k, v))
        return orig_sdpa(q, k, v, *a, **kw)

    monkeypatch.setattr(om, "apply_rope", rope_spy)
    monkeypatch.setattr(om.F, "scaled_dot_product_attention", sdpa_spy)
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.v_proj.register_forward_hook(
            lambda mod, args, out, a=attn: vs.append(out.view(*out.shape[:2], a.n_kv, a.head_dim).transpose(1, 2)))
    with torch.no_grad():
        model(torch.randint(0, 64, (2, 9)))
    assert len(seen) == len(vs) == 2 and len(roped) == 4
    for i, (k, v) in enumerate(seen):
        assert torch.equal(k, quant.fake_kv(roped[2 * i + 1], 3, pos=0))   # RoPE first, then quantize
        assert torch.equal(v, quant.fake_kv(vs[i], 3, pos=0))
        assert len(torch.unique(k[0, 0, 3])) <= 8 and len(torch.unique(k[0, 0, 0])) <= 16


# ---------------------------------------------------------------------------------------------
# Memory accounting (torch-free, for `onebit bench`)
# ---------------------------------------------------------------------------------------------

def test_kv_bytes_accounting():
    cfg = ModelConfig.preset("bitnet-2b4t")  # 30 layers, 5 kv heads, head_dim 128
    rows = 2 * 30 * 5
    assert kv_row_bytes(128, 16) == 256 and kv_row_bytes(128, 32) == 512
    assert kv_row_bytes(128, 8) == 130 and kv_row_bytes(128, 4) == 66 and kv_row_bytes(128, 3) == 50
    assert kv_row_bytes(36, 3) == 14 + 2   # ceil(108 / 8) = 14 code bytes
    assert kv_cache_bytes(cfg, 16, 4096) == rows * 256 * 4096
    assert kv_cache_bytes(cfg, 3, 4096) == rows * (66 + 50 * 4095)   # BOS row at 4 bits
    assert kv_cache_bytes(cfg, 4, 1) == kv_cache_bytes(cfg, 3, 1) == rows * 66
    assert kv_cache_bytes(cfg, 8, 0) == 0
    ratio = kv_cache_bytes(cfg, 16, 4096) / kv_cache_bytes(cfg, 3, 4096)
    assert 5.0 < ratio < 256 / 50 + 1e-9
    with pytest.raises(ValueError, match="bits"):
        kv_cache_bytes(cfg, 2, 10)
    # the accounting and the packed rows of quant.quantize_kv agree
    for bits in (3, 4, 8):
        packed, step = quant.quantize_kv(torch.randn(128), bits)
        assert packed.numel() + 2 * step.numel() == kv_row_bytes(128, bits)
