"""The onebit decoder: one model, BitNet b1.58 / 2B4T or its full-precision twin.

Parameter names follow transformers' BitNet/Llama checkpoints one to one
(``model.embed_tokens``, ``model.layers.N.self_attn.q_proj``, ``...attn_sub_norm``,
``model.norm``, ``lm_head``), so importing a real checkpoint is a key table.

Shapes: B batch, T tokens, D hidden, H heads, Hkv kv heads, hd head dim, F ffn dim, V vocab.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from . import quant
from .config import ConfigError, ModelConfig
from .nn import BitLinear, RMSNorm, apply_rope, rope_cache

# Which activation quantizer each projection input gets, per activation scheme (BITNET.md §2).
ACT_SCHEMES = {
    "a8": dict(q="int8", k="int8", v="int8", o="int8", gate="int8", up="int8", down="int8"),
    "a4.8": dict(q="int4", k="int4", v="int4", o="topk_int8", gate="int4", up="int4", down="int8"),
}


def make_linear(cfg: ModelConfig, role: str, in_f: int, out_f: int) -> BitLinear:
    """The builder: a ternary BitLinear, or the fp twin's plain linear, for projection ``role``."""
    inner_norm = cfg.norm_placement == "inner"
    bias = cfg.qkv_bias and role in ("q", "k", "v")
    if cfg.linear == "fp":
        return BitLinear(in_f, out_f, norm=inner_norm, norm_eps=cfg.rms_norm_eps,
                         weight_quant=False, act=None, bias=bias)
    return BitLinear(in_f, out_f, norm=inner_norm, norm_eps=cfg.rms_norm_eps, weight_quant=True,
                     act=ACT_SCHEMES[cfg.activation_scheme][role], keep=cfg.topk_keep, bias=bias)


class KVCache(nn.Module):
    """Pre-allocated per-layer cache: k, v ``[B, Hkv, max_len, hd]``. With ``kv_bits < 16`` it holds
    the already fake-quantized (dequantized) rows: the same numbers the engine's packed codes stand for."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[2]
        if pos + T > self.k.shape[2] or k.shape[0] != self.k.shape[0]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions for batch {self.k.shape[0]}, got "
                             f"positions up to {pos + T} for batch {k.shape[0]}: call setup_cache() with a "
                             f"larger max_len / the right batch size")
        self.k[:, :, pos:pos + T] = k
        self.v[:, :, pos:pos + T] = v
        return self.k[:, :, :pos + T], self.v[:, :, :pos + T]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, H, Hkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads, cfg.resolved_head_dim
        self.n_heads, self.n_kv, self.head_dim = H, Hkv, hd
        self.q_proj = make_linear(cfg, "q", D, H * hd)
        self.k_proj = make_linear(cfg, "k", D, Hkv * hd)
        self.v_proj = make_linear(cfg, "v", D, Hkv * hd)
        self.attn_sub_norm = RMSNorm(H * hd, cfg.rms_norm_eps) if cfg.norm_placement == "subln" else None
        self.o_proj = make_linear(cfg, "o", H * hd, D)
        self.kv_bits = cfg.kv_bits
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: int) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)     # [B, Hkv, T, hd]
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)     # [B, Hkv, T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # KV quantization after RoPE, per (token, kv head); identity at 16 bits. Cached and
        # full-sequence forwards see the same values, so perplexity measures the KV cost.
        k, v = quant.fake_kv(k, self.kv_bits, pos), quant.fake_kv(v, self.kv_bits, pos)
        if self.cache is not None:
            k, v = self.cache.update(pos, k, v)                                     # [B, Hkv, pos+T, hd]
        if pos == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:  # query i sits at absolute position pos+i and sees keys 0..pos+i
            S = k.shape[2]
            mask = torch.arange(S, device=x.device)[None, :] <= (pos + torch.arange(T, device=x.device))[:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)            # [B, T, H*hd]
        if self.attn_sub_norm is not None:
            y = self.attn_sub_norm(y)
        return self.o_proj(y)                                                        # [B, T, D]


class MLP(nn.Module):
    """Gated FFN: ``down(act(gate(x)) * up(x))`` with act = ReLU² (2B4T/a4.8) or SiLU (SwiGLU)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, Fd = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = make_linear(cfg, "gate", D, Fd)
        self.up_proj = make_linear(cfg, "up", D, Fd)
        self.ffn_sub_norm = RMSNorm(Fd, cfg.rms_norm_eps) if cfg.norm_placement == "subln" else None
        self.down_proj = make_linear(cfg, "down", Fd, D)
        self.relu2 = cfg.hidden_act == "relu2"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate_proj(x)                                      # [B, T, F]
        g = F.relu(g).square() if self.relu2 else F.silu(g)
        h = g * self.up_proj(x)                                    # [B, T, F]
        if self.ffn_sub_norm is not None:
            h = self.ffn_sub_norm(h)
        return self.down_proj(h)                                   # [B, T, D]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        pre = cfg.norm_placement in ("subln", "pre")
        # "inner" (b1.58): every BitLinear normalises its own input, so the block has no pre-norms.
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if pre else None
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if pre else None
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: int) -> torch.Tensor:
        h = self.input_layernorm(x) if self.input_layernorm is not None else x
        x = x + self.self_attn(h, cos, sin, pos)
        h = self.post_attention_layernorm(x) if self.post_attention_layernorm is not None else x
        return x + self.mlp(h)


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """``CausalLM(cfg)(input_ids [B, T], targets=None, pos=0) -> (logits [B, T, V], loss | None)``.

    ``targets`` uses -1 for positions to ignore. ``pos`` is the absolute position of the first
    token (non-zero only with a KV cache, see ``setup_cache``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.activation_scheme = cfg.activation_scheme  # the scheme the BitLinears run now
        # training: recompute each block in the backward instead of keeping its activations
        self.activation_checkpointing = False
        self.model = DecoderModel(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        cos, sin = rope_cache(cfg.resolved_head_dim, cfg.max_position_embeddings, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)   # [maxT, hd]
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) weights; residual outputs (o/down) scaled by 1/sqrt(2L);
        biases 0."""
        std = self.config.initializer_range
        resid_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, resid_std)
            else:
                nn.init.normal_(p, 0.0, std)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def setup_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype = torch.float32) -> None:
        """Allocate a KV cache for generation (``None`` max_len = max_position_embeddings)."""
        cfg = self.config
        max_len = cfg.max_position_embeddings if max_len is None else max_len
        if not 0 < max_len <= cfg.max_position_embeddings:
            raise ValueError(f"max_len={max_len} must be in [1, max_position_embeddings="
                             f"{cfg.max_position_embeddings}] of this model")
        dev = self.rope_cos.device
        for layer in self.model.layers:
            layer.self_attn.cache = KVCache(batch, cfg.kv_heads, max_len, cfg.resolved_head_dim, dtype).to(dev)

    def clear_cache(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.cache = None

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                pos: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T = input_ids.shape
        if pos + T > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {pos + T} tokens exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        if pos and self.model.layers[0].self_attn.cache is None:
            raise ValueError("pos > 0 needs a KV cache holding positions 0..pos-1: call setup_cache() first")
        cos, sin = self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T]  # [T, hd]
        x = self.model.embed_tokens(input_ids)                             # [B, T, D]
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.model.layers:
            if recompute:  # (under fsdp the block's weights are gathered again for the recompute)
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, pos, use_reentrant=False)
            else:
                x = layer(x, cos, sin, pos)
        x = self.model.norm(x)
        logits = F.linear(x, self.output_weight)                           # [B, T, V]
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1),
                                   ignore_index=-1)
        return logits, loss

    def set_quant_lambda(self, lam: float) -> None:
        """Set the quantization blend λ of every BitLinear (warm-up fine-tuning)."""
        for m in self.modules():
            if isinstance(m, BitLinear):
                m.lam = lam

    def projections(self):
        """Yield ``(layer index, role, BitLinear)`` for every projection, role in q k v o gate up down."""
        for i, layer in enumerate(self.model.layers):
            a, m = layer.self_attn, layer.mlp
            yield from ((i, "q", a.q_proj), (i, "k", a.k_proj), (i, "v", a.v_proj), (i, "o", a.o_proj),
                        (i, "gate", m.gate_proj), (i, "up", m.up_proj), (i, "down", m.down_proj))

    def set_activation_scheme(self, scheme: str) -> None:
        """Switch every BitLinear's input quantizer to ``ACT_SCHEMES[scheme]`` in place (the a4.8
        two-stage recipe: A8 first, then a4.8 on the same weights and optimizer state). The config
        keeps the scheme the model is trained for; ``self.activation_scheme`` is the one running."""
        if self.config.linear != "bitnet":
            raise ConfigError(f"activation_scheme={scheme!r}: a linear='{self.config.linear}' model has no "
                              f"quantized activations to switch")
        if scheme not in ACT_SCHEMES:
            raise ConfigError(f"activation_scheme={scheme!r} is not valid: use one of {list(ACT_SCHEMES)}")
        if scheme == "a4.8" and self.config.activation_scheme != "a4.8":
            warnings.warn(f"running a4.8 activations (INT4, top-K) on a model trained with activation_scheme="
                          f"{self.config.activation_scheme!r}: expect a perplexity cost; train it for a4.8 "
                          f"(--model.activation_scheme=a4.8 --train.a48_switch=0.95)", stacklevel=2)
        for _, role, lin in self.projections():
            lin.act = ACT_SCHEMES[scheme][role]
            lin.keep = self.config.topk_keep
        self.activation_scheme = scheme

    def set_kv_bits(self, bits: int) -> None:
        """Quantize the KV cache to ``bits`` (16 = off) from now on; updates ``self.config``."""
        self.config = self.config.replace(kv_bits=bits)  # validates, naming kv_bits
        for layer in self.model.layers:
            layer.self_attn.kv_bits = bits

    def num_params(self, include_embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not include_embeddings:
            n -= self.model.embed_tokens.weight.numel()
            if self.lm_head is not None:
                n -= self.lm_head.weight.numel()
        return n
