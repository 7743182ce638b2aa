"""Layers: RMSNorm, rotary embeddings and BitLinear (BITNET.md §1-3).

``BitLinear`` is an ``nn.Linear`` (bias optional, kept in full precision) whose forward
fake-quantizes the weight to ternary and the input activation per token (INT8 now; INT4, or top-K
then INT8, for a4.8), with the straight-through estimator. Built with
``weight_quant=False, act=None`` it is exactly a (optionally normalised) full-precision linear:
that is how a model becomes its own fp twin while keeping the same parameter names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import quant

ACT_MODES = ("int8", "int4", "topk_int8", None)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) * weight, computed in float32 (as Llama/BitNet do)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class BitLinear(nn.Linear):
    """Linear layer with ternary weights and quantized activations (training form).

    Args:
        norm: put an RMSNorm (with its own weight, eps ``norm_eps``) on the input, as b1.58 does
            inside every BitLinear; ``False`` for the SubLN placement, where the block norms.
        weight_quant: ternary absmean fake-quantization of the weight (``False``: fp weight).
        act: ``"int8"`` (absmax per token), ``"int4"`` (absmean per token), ``"topk_int8"``
            (keep the top ``keep`` fraction by |x| per token, then INT8) or ``None`` (fp input).
        lam: blend λ in [0, 1] of quantization (1 = fully quantized), set by warm-up fine-tuning.
        bias: add a full-precision bias after the ternary product (Qwen2's q/k/v projections).
    Shapes: input ``[..., in_features]`` → output ``[..., out_features]``.
    """

    def __init__(self, in_features: int, out_features: int, *, norm: bool = False,
                 norm_eps: float = 1e-5, weight_quant: bool = True, act: str | None = "int8",
                 keep: float = 0.5, lam: float = 1.0, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        if act not in ACT_MODES:
            raise ValueError(f"act={act!r} is not a BitLinear activation mode: use one of {ACT_MODES}")
        if not 0.0 < float(keep) <= 1.0:
            raise ValueError(f"keep={keep} is out of range: the kept top-K fraction must be in (0, 1]")
        self.norm = RMSNorm(in_features, norm_eps) if norm else None
        self.weight_quant = weight_quant
        self.act = act
        self.keep = keep
        self.lam = lam

    @property
    def lam(self) -> float:
        return self._lam

    @lam.setter
    def lam(self, value: float) -> None:
        quant._check_lam(value)
        self._lam = float(value)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        lam = self._lam
        if self.act == "int8":
            return quant.fake_int8(x, lam)
        if self.act == "int4":
            return quant.fake_int4(x, lam)
        if self.act == "topk_int8":
            return quant.fake_int8(quant.fake_topk(x, self.keep, lam), lam)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            x = self.norm(x)
        if self.weight_quant and self.act is not None and self._lam == 1.0 and not torch.is_grad_enabled():
            return self._integer_forward(x)
        x = self.quantize_input(x)
        w = quant.fake_ternary(self.weight, self._lam) if self.weight_quant else self.weight
        return F.linear(x, w, self.bias)

    def _integer_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inference without gradients: the integer dot products of the codes, then the two scales
        — what the C engine computes, bit for bit given the same codes. The fake-quant form
        (dequantize, then a float matmul) rounds each product: its results differ by ulps, enough
        to break the exact ties that a4.8's top-K and INT4 rounding then resolve differently."""
        x32 = x.float()
        if self.act == "topk_int8":
            x32 = quant.topk_sparsify(x32, self.keep)
        codes, xs = quant.int4_absmean(x32) if self.act == "int4" else quant.int8_absmax(x32)
        wc, ws = quant.ternary_absmean(self.weight)
        acc = F.linear(codes.float(), wc.float())          # exact: integer sums below 2^24
        out = (acc * ws) * xs
        if self.bias is not None:                           # nn.Linear's bias, full precision
            out = out + self.bias.float()
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, norm={self.norm is not None}, "
                f"weight_quant={self.weight_quant}, act={self.act}, lam={self._lam}, "
                f"bias={self.bias is not None}")


def rope_cache(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables ``[max_len, head_dim]`` in float32, Llama/HF "rotate_half" layout."""
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be even for rotary embeddings")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    t = torch.arange(max_len, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq)                      # [T, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)               # [T, hd]
    return emb.cos().float(), emb.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, H, T, hd] by position tables ``cos``/``sin`` [T, hd]."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)
