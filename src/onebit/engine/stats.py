"""Sizes and memory accounting of a loaded packed model (for `onebit generate` and `onebit bench`)."""

from __future__ import annotations

import sys

from .runtime import KV_CACHE_BITS, Runtime

__all__ = ["kv_cache_bytes", "kv_row_bytes", "model_sizes", "peak_rss_mb", "peak_rss_text"]

KV_STORAGE_BITS = KV_CACHE_BITS  # 32 float32, 16 float16, 8/4/3 quantized (quant.fake_kv)


def kv_row_bytes(head_dim: int, bits: int) -> int:
    """Bytes of one cache row (one token of one kv head, K or V) as docs/formats.md §10 lays it out:
    ``head_dim`` floats at 32/16 bits, or ``ceil(head_dim*bits/8)`` code bytes + a 2-byte fp16 step."""
    if bits not in KV_STORAGE_BITS:
        raise ValueError(f"kv bits={bits!r} is not a KV storage width: use one of {list(KV_STORAGE_BITS)}")
    if bits >= 16:
        return head_dim * bits // 8
    return -(-head_dim * bits // 8) + 2


def kv_cache_bytes(cfg, bits: int, n_tokens: int) -> int:
    """Bytes of the whole KV cache (all layers, K and V, batch 1) holding ``n_tokens`` positions.

    ``cfg`` is a ``ModelConfig`` (``num_hidden_layers``, ``kv_heads``, ``resolved_head_dim``).
    At 3 bits the row at position 0 is stored at 4 bits (the BOS rule of ``quant.kv_row_bits``).
    Per-token average: ``kv_cache_bytes(cfg, bits, n) / n``."""
    if n_tokens < 0:
        raise ValueError(f"n_tokens={n_tokens} must be >= 0")
    per_row_set = 2 * cfg.num_hidden_layers * cfg.kv_heads  # rows per position: K and V, every layer
    hd = cfg.resolved_head_dim
    if n_tokens == 0:
        return 0
    first = kv_row_bytes(hd, 4 if bits == 3 else bits)
    return per_row_set * (first + (n_tokens - 1) * kv_row_bytes(hd, bits))


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


def _vm_hwm_kib() -> int | None:
    """VmHWM of /proc/self/status (Linux): the peak RSS of this program's own address space."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_mb() -> dict[str, float]:
    """The real memory high-water marks so far, in MB (2**20 bytes): ``self`` = this process from
    its start (interpreter, imports, loading, setup and the work: what /usr/bin/time reports for
    it), ``children`` = the largest child process it waited for (0 if none).

    ``self`` is Linux's VmHWM where there is one: ru_maxrss survives fork and exec, so in a
    process started by a bigger one (a benchmark's child, a test's subprocess) it reports at
    least the parent's RSS at the fork (measured: a child of a pytest process read 0 MB of growth
    over a prefill that grew its own peak by 60 MB); elsewhere ru_maxrss."""
    import resource

    scale = 1024 if sys.platform != "darwin" else 2**20  # ru_maxrss: KiB on Linux, bytes on macOS
    hwm = _vm_hwm_kib()
    return {"self": hwm / 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale,
            "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / scale}


def peak_rss_text(children: str = "a child process") -> str:
    """``peak RSS 48 MB`` (the whole process), plus the largest child's when one ran."""
    rss = peak_rss_mb()
    text = f"peak RSS {rss['self']:.0f} MB"
    if rss["children"] > 0:
        text += f" ({children}: {rss['children']:.0f} MB)"
    return text
