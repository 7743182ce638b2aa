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

    Ties at the threshold are broken by ``torch.topk`` (lowest index first on CPU); the result
    has the dtype of ``x``.
    """
    _check_float(x, "x")
    if not 0.0 < float(keep) <= 1.0:
        raise ValueError(f"keep={keep} is out of range: the kept fraction must be in (0, 1]")
    d = x.shape[-1]
    k = max(1, math.ceil(keep * d))
    if k >= d:
        return x.clone()
    idx = x.abs().topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))


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
    """Top-K sparsified activation with an STE through the mask (a4.8); dtype of ``x``."""
    _check_float(x, "x")
    _check_lam(lam)
    if lam == 0.0:
        return x
    return ste(x, topk_sparsify(x.detach(), keep), lam)
