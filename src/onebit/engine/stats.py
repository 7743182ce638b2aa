"""Sizes and memory accounting of a loaded packed model (for `onebit generate` and `onebit bench`)."""

from __future__ import annotations

from .runtime import Runtime

__all__ = ["model_sizes"]


def model_sizes(rt: Runtime) -> dict[str, int]:
    """Parameter count and bytes: packed ternary weights, embeddings/head as stored, fp16 twin.

    ``weight_bytes_per_token`` is what one decode step reads: every packed projection once,
    the (tied or untied) LM head as stored, the norms; the embedding row read is negligible.
    """
    cfg = rt.config
    packed = sum(L[name].q.nbytes for L in rt.layers for name in L if not name.endswith(("quant", "_in")))
    ternary = sum(L[name].n * L[name].k for L in rt.layers for name in L
                  if not name.endswith(("quant", "_in")))
    V, D = cfg.vocab_size, cfg.hidden_size
    emb_stored = rt._tensors["model.embed_tokens.weight"].nbytes
    head_stored = emb_stored if cfg.tie_word_embeddings else rt._tensors["lm_head.weight"].nbytes
    n_emb = V * D * (1 if cfg.tie_word_embeddings else 2)
    other = sum(t.size for name, t in rt._tensors.items() if name.endswith("norm.weight")
                or "layernorm" in name)
    params = ternary + n_emb + other
    head_read = head_stored  # the engine reads the head as stored (f32, f16 or int8 kernels)
    return {"params": params, "ternary_params": ternary, "packed_bytes": packed,
            "embedding_bytes": emb_stored, "head_bytes": head_stored,
            "fp16_bytes": 2 * params,
            "weight_bytes_per_token": packed + head_read + 4 * other}
