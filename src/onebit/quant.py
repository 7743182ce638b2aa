"""Quantization primitives of BitNet b1.58 and a4.8 (docs: ../shared/docs/BITNET.md §1-2).

Convention everywhere in onebit: ``scale`` MULTIPLIES codes, i.e. ``value ≈ codes * scale``.

Every quantizer computes in float32 whatever the input dtype, exactly as the b1.58 FAQ code does
(``(x * s).round().clamp(...)`` with ``s`` the reciprocal scale), so integer codes are bit-exact
against the paper's formulas; ``round`` is round-half-to-even (``torch.round``).

Fake-quant (training) forms return ``x + lam * (q(x) - x).detach()``: the forward value is the
blend of the full-precision and the quantized value (``lam=1`` is plain quantization), and the
backward is the identity (straight-through estimator). ``lam`` in [0, 1] is used by warm-up
fine-tuning (BITNET.md §3).
"""

from __future__ import annotations

import math

import torch

EPS = 1e-5  # the clamp/epsilon of every BitNet quantizer (FAQ code, a4.8 paper)
SQRT7 = math.sqrt(7.0)

__all__ = [
    "EPS",
    "ternary_absmean",
    "int8_absmax",
    "int4_absmean",
    "topk_sparsify",
    "ternary_dequant",
    "fake_ternary",
    "fake_int8",
    "fake_int4",
    "fake_topk",
    "ste",
    "KV_BITS",
    "kv_row_bits",
    "kv_quant_codes",
    "pack_kv",
    "unpack_kv",
    "quantize_kv",
    "dequantize_kv",
    "fake_kv",
]


def _check_lam(lam: float) -> None:
    if not 0.0 <= float(lam) <= 1.0:
        raise ValueError(f"lam={lam} is out of range: the quantization blend λ must be in [0, 1]")


def _check_float(x: torch.Tensor, name: str) -> None:
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor, got {type(x).__name__}"
                        f"{'' if not torch.is_tensor(x) else ' of dtype ' + str(x.dtype)}")
    if x.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension, got a scalar")


# ---------------------------------------------------------------------------------------------
# Integer quantizers: (codes int8, scale float32) with value ≈ codes * scale
# ---------------------------------------------------------------------------------------------

def _ternary_recip(w32: torch.Tensor) -> torch.Tensor:
    # s = 1 / clamp(mean|W|, 1e-5) -- per tensor, no grouping (FAQ weight_quant)
    return 1.0 / w32.abs().mean().clamp(min=EPS)


def ternary_absmean(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor absmean ternary quantization of a weight.

    Returns ``codes`` (int8, values in {-1, 0, 1}, shape of ``w``) and ``scale`` (float32 scalar
    tensor ``1/s`` with ``s = 1/clamp(mean|w|, 1e-5)``, i.e. γ = mean|w|), with ``w ≈ codes*scale``.
    """
    _check_float(w, "w")
    w32 = w.float()
    s = _ternary_recip(w32)
    codes = (w32 * s).round().clamp(-1, 1).to(torch.int8)
    return codes, (1.0 / s)


def _absmax_recip(x32: torch.Tensor, qmax: float) -> torch.Tensor:
    # s = Qp / clamp(max|x|, 1e-5) per token (last dim), shape [..., 1]
    return qmax / x32.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)


def int8_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (last dim) absmax INT8 quantization of an activation.

    Returns ``codes`` (int8 in [-128, 127], shape of ``x``) and ``scale`` (float32, shape
    ``[..., 1]``) equal to ``1/s`` with ``s = 127 / clamp(max|x|, 1e-5)``.
    """
    _check_float(x, "x")
    x32 = x.float()
    s = _absmax_recip(x32, 127.0)
    codes = (x32 * s).round().clamp(-128, 127).to(torch.int8)
    return codes, 1.0 / s


def _absmean4_recip(x32: torch.Tensor) -> torch.Tensor:
    # s = sqrt(7) / (mean|x| + eps) per token (a4.8 paper; note eps is added, not clamped)
    return SQRT7 / (x32.abs().mean(dim=-1, keepdim=True) + EPS)


def int4_absmean(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (last dim) absmean INT4 quantization of an activation (BitNet a4.8).

    ``codes = clamp(round(x * sqrt(7) / (β + eps)), -8, 7)`` with ``β = mean|x|``; ``scale`` is
    ``β / sqrt(7)`` (float32, shape ``[..., 1]``) as the paper dequantizes with β, not β + eps.
    """
    _check_float(x, "x")
    x32 = x.float()
    s = _absmean4_recip(x32)
    codes = (x32 * s).round().clamp(-8, 7).to(torch.int8)
    scale = x32.abs().mean(dim=-1, keepdim=True) / SQRT7
    return codes, scale


def topk_sparsify(x: torch.Tensor, keep: float = 0.5) -> torch.Tensor:
    """Keep the ``ceil(keep * d)`` largest-|x| entries of each token (last dim), zero the rest.

    Ties at the threshold keep the lowest indices (the engine's C quantizer does the same). Ties
    are common: with GQA the first position's attention output repeats each kv head's values in
    every query head of its group, and ``torch.topk`` alone picks among them in an unspecified
    order. The result has the dtype of ``x``.
    """
    _check_float(x, "x")
    if not 0.0 < float(keep) <= 1.0:
        raise ValueError(f"keep={keep} is out of range: the kept fraction must be in (0, 1]")
    d = x.shape[-1]
    k = max(1, math.ceil(keep * d))
    if k >= d:
        return x.clone()
    a = x.abs()
    thr = a.topk(k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)  # the k-th largest
    above, tie = a > thr, a == thr
    need = k - above.sum(dim=-1, keepdim=True)                  # ties still to keep, lowest first
    mask = above | (tie & (tie.cumsum(dim=-1) <= need))
    return torch.where(mask, x, torch.zeros_like(x))


def ternary_dequant(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``codes * scale`` in float32 (the value a ternary weight stands for)."""
    return codes.float() * scale


# ---------------------------------------------------------------------------------------------
# Fake-quant (STE) forms for training. Dequantization divides by s like the FAQ code, so the
# forward values equal the paper's reference BitLinear bit for bit.
# ---------------------------------------------------------------------------------------------

def ste(x: torch.Tensor, q: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """Straight-through blend ``x + lam * (q - x).detach()`` (gradient is the identity).

    At ``lam == 1`` the forward value is exactly ``q``: the FAQ form ``x + (q - x)`` is not ``q``
    in floating point once |x| > 2|q| (a ternary weight above 2γ would come out as γ ± ulp),
    so ``q + (x - x.detach())`` (a zero that carries the gradient) is used instead.
    """
    if lam == 1.0:
        return q.detach() + (x - x.detach())
    return x + lam * (q - x).detach()


def fake_ternary(w: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """Fake-quantized ternary weight ``round(w*s).clamp(-1,1)/s`` with an STE; dtype of ``w``."""
    _check_float(w, "w")
    _check_lam(lam)
    if lam == 0.0:
        return w
    w32 = w.float()
    s = _ternary_recip(w32).detach()
    q = ((w32 * s).round().clamp(-1, 1) / s).to(w.dtype)
    return ste(w, q, lam)


def fake_int8(x: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """Fake-quantized per-token INT8 activation with an STE; dtype of ``x``."""
    _check_float(x, "x")
    _check_lam(lam)
    if lam == 0.0:
        return x
    x32 = x.float()
    s = _absmax_recip(x32, 127.0).detach()
    q = ((x32 * s).round().clamp(-128, 127) / s).to(x.dtype)
    return ste(x, q, lam)


def fake_int4(x: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """Fake-quantized per-token INT4 absmean activation (a4.8) with an STE; dtype of ``x``."""
    _check_float(x, "x")
    _check_lam(lam)
    if lam == 0.0:
        return x
    codes, scale = int4_absmean(x.detach())
    q = (codes.float() * scale).to(x.dtype)
    return ste(x, q, lam)


def fake_topk(x: torch.Tensor, keep: float = 0.5, lam: float = 1.0) -> torch.Tensor:
    """Top-K sparsified activation with an STE through the mask (a4.8); dtype of ``x``.

    The backward is the identity for every entry, the zeroed ones included: the a4.8 paper passes
    the gradient straight through the mask, so a dropped entry can grow back into the top K."""
    _check_float(x, "x")
    _check_lam(lam)
    if lam == 0.0:
        return x
    return ste(x, topk_sparsify(x.detach(), keep), lam)


# ---------------------------------------------------------------------------------------------
# KV cache (a4.8): after RoPE, per (token, kv head) absmax, unsigned b-bit codes with the fixed
# zero point 2^(b-1) - 1/2 (a mid-rise grid: 2^b levels symmetric about 0), fp16 step per row.
# Exact math and byte layout: docs/formats.md §10. 16 = not quantized.
# ---------------------------------------------------------------------------------------------

KV_BITS = (16, 8, 4, 3)
KV_BOS_BITS = 4  # with kv_bits=3 the row at position 0 (the BOS / attention-sink token) keeps 4 bits
_FP16_MAX = 65504.0


def kv_row_bits(bits: int, position: int) -> int:
    """Bits of the cache row at absolute ``position``: ``bits``, except 4 for position 0 at 3 bits."""
    return KV_BOS_BITS if bits == 3 and position == 0 else bits


def _check_kv_bits(bits: int, allowed: tuple[int, ...] = (8, 4, 3)) -> None:
    if bits not in allowed:
        raise ValueError(f"bits={bits!r} is not a KV cache width: use one of {list(allowed)}")


def kv_quant_codes(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize K or V rows ``x [..., hd]`` (one row = one token of one kv head) to ``bits``.

    ``h = 2^(bits-1)``; ``step = fp16(clamp(max|x|, 1e-5) / h)`` (clamped to the fp16 max);
    ``codes = clamp(floor(x * (1/step)) + h, 0, 2h - 1)`` in float32, so
    ``value ≈ (codes - (h - 1/2)) * step`` (see ``dequantize_kv``). Returns ``codes`` (uint8
    ``[..., hd]``) and ``step`` (float16 ``[...]``).
    """
    _check_float(x, "x")
    _check_kv_bits(bits)
    h = float(2 ** (bits - 1))
    x32 = x.float()
    step = (x32.abs().amax(dim=-1).clamp(min=EPS) / h).clamp(max=_FP16_MAX).to(torch.float16)
    r = 1.0 / step.float()                                               # [...] float32
    codes = (torch.floor(x32 * r.unsqueeze(-1)) + h).clamp(0, 2 * h - 1).to(torch.uint8)
    return codes, step


def _kv_values(codes: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    zero = float(2 ** (bits - 1)) - 0.5
    return (codes.float() - zero) * step.float().unsqueeze(-1)


def pack_kv(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes ``[..., hd]`` as an LSB-first bit string: element i holds bits ``[b*i, b*i+b)``,
    bit k lives in bit ``k % 8`` of byte ``k // 8``; zero-padded to ``ceil(hd*b/8)`` bytes (uint8)."""
    _check_kv_bits(bits)
    hd = codes.shape[-1]
    shifts = torch.arange(bits, dtype=torch.int32)
    bitstr = ((codes.to(torch.int32).unsqueeze(-1) >> shifts) & 1).flatten(-2)   # [..., hd*b]
    nbytes = -(-hd * bits // 8)
    bitstr = torch.nn.functional.pad(bitstr, (0, nbytes * 8 - hd * bits))
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.int32)
    return (bitstr.unflatten(-1, (nbytes, 8)) * weights).sum(-1).to(torch.uint8)


def unpack_kv(packed: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    """Inverse of ``pack_kv``: uint8 ``[..., ceil(head_dim*bits/8)]`` -> codes uint8 ``[..., head_dim]``."""
    _check_kv_bits(bits)
    nbytes = -(-head_dim * bits // 8)
    if packed.dtype != torch.uint8 or packed.shape[-1] != nbytes:
        raise ValueError(f"packed must be uint8 [..., {nbytes}] for head_dim={head_dim} at {bits} bits, "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    bitstr = ((packed.to(torch.int32).unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1).flatten(-2)
    bitstr = bitstr[..., :head_dim * bits].unflatten(-1, (head_dim, bits))          # [..., hd, b]
    return (bitstr << torch.arange(bits, dtype=torch.int32)).sum(-1).to(torch.uint8)


def quantize_kv(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V rows ``x [..., hd]`` -> (packed codes uint8 ``[..., ceil(hd*bits/8)]``, step float16 ``[...]``)."""
    codes, step = kv_quant_codes(x, bits)
    return pack_kv(codes, bits), step


def dequantize_kv(packed: torch.Tensor, step: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    """``(codes - (2^(bits-1) - 1/2)) * step`` in float32, shape ``[..., head_dim]``."""
    return _kv_values(unpack_kv(packed, bits, head_dim), step, bits)


def fake_kv(x: torch.Tensor, bits: int, pos: int = 0) -> torch.Tensor:
    """Fake-quantized K or V ``x [..., T, hd]`` holding absolute positions ``pos .. pos+T-1``, with
    an STE; the row at position 0 uses ``kv_row_bits`` (4 bits when ``bits == 3``). ``bits == 16``
    returns ``x``. Dtype of ``x``."""
    _check_float(x, "x")
    _check_kv_bits(bits, KV_BITS)
    if bits == 16:
        return x
    xd = x.detach()
    q = _kv_values(*kv_quant_codes(xd, bits), bits)
    if pos == 0 and kv_row_bits(bits, 0) != bits:
        first = _kv_values(*kv_quant_codes(xd[..., :1, :], KV_BOS_BITS), KV_BOS_BITS)
        q = torch.cat([first, q[..., 1:, :]], dim=-2)
    return ste(x, q.to(x.dtype))
