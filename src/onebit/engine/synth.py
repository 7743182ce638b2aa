"""Random-ternary packed models of any shape, for benchmarks (no torch, no download).

``write_random_model(folder, "bitnet-2b4t")`` writes a packed folder in exactly the layout
``export_packed`` writes, with uniform random ternary codes and plausible scales: the speed of a
2.4B-parameter BitNet without training one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .. import kernels
from ..config import ModelConfig
from ..formats.packed_model import (EMBEDDINGS, I8_SCALE_SUFFIX, PACKED_VERSION, quantize_rows_i4,
                                   quantize_rows_i8)
from ..formats.packing import LAYOUTS, packed_row_bytes, save_packed

__all__ = ["write_random_model", "random_config"]

ROWS = 4096  # rows generated at a time


def random_config(preset: str, **overrides) -> ModelConfig:
    return ModelConfig.preset(preset, **overrides)


def write_random_model(folder: str | Path, config: ModelConfig | str, layout: str = "i2",
                       embedding: str = "i8", seed: int = 0) -> Path:
    """Write a packed model folder with random weights; ``config`` a ModelConfig or preset name."""
    from ..atomic import write_dir_atomic

    cfg = random_config(config) if isinstance(config, str) else config
    if layout not in LAYOUTS or embedding not in EMBEDDINGS:
        raise ValueError(f"layout {layout!r} / embedding {embedding!r}: use one of {sorted(LAYOUTS)} "
                         f"/ {list(EMBEDDINGS)}")
    rng = np.random.default_rng(seed)
    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    H, Hkv, hd = cfg.num_attention_heads, cfg.kv_heads, cfg.resolved_head_dim
    # packed as generated, a block of rows at a time: an 8B model's int8 codes (7 GB) are never
    # held at once, only its packed bytes (1.75 GB in i2)
    packed: dict[str, tuple[np.ndarray, float, int]] = {}
    extra: dict[str, np.ndarray] = {}
    inner = cfg.norm_placement == "inner"
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for role, n, k in (("self_attn.q_proj", H * hd, D), ("self_attn.k_proj", Hkv * hd, D),
                           ("self_attn.v_proj", Hkv * hd, D), ("self_attn.o_proj", D, H * hd),
                           ("mlp.gate_proj", F, D), ("mlp.up_proj", F, D), ("mlp.down_proj", D, F)):
            q = np.empty((n, packed_row_bytes(k, layout)), np.uint8)
            for r0 in range(0, n, ROWS):
                r1 = min(n, r0 + ROWS)
                codes = (rng.integers(0, 3, size=(r1 - r0, k), dtype=np.int8) - 1).astype(np.int8)
                q[r0:r1] = kernels.pack(codes, layout)
            packed[p + role] = (q, float(1.0 / np.sqrt(k)), k)
            if inner:
                extra[p + role + ".norm.weight"] = np.ones(k, np.float32)
        if not inner:
            for name, n in (("input_layernorm", D), ("post_attention_layernorm", D),
                            ("self_attn.attn_sub_norm", H * hd), ("mlp.ffn_sub_norm", F)):
                extra[p + name + ".weight"] = np.ones(n, np.float32)
    extra["model.norm.weight"] = np.ones(D, np.float32)
    for name in ["model.embed_tokens.weight"] + ([] if cfg.tie_word_embeddings else ["lm_head.weight"]):
        parts, scales = [], []
        for r0 in range(0, V, ROWS):  # float32 rows a block at a time (8B: 2.1 GB per matrix)
            w = (rng.standard_normal((min(V, r0 + ROWS) - r0, D), dtype=np.float32) * 0.02).astype(np.float32)
            if embedding in ("i8", "i4"):
                quant = quantize_rows_i8 if embedding == "i8" else quantize_rows_i4
                q, s = quant(w)
                parts.append(q)
                scales.append(s)
            else:
                parts.append(w.astype(np.float16 if embedding == "f16" else np.float32))
        extra[name] = np.concatenate(parts)
        if scales:
            extra[name + I8_SCALE_SUFFIX] = np.concatenate(scales)
        del parts, scales
    config = {"model": cfg.to_dict(),
              "packed": {"layout": layout, "embedding": embedding, "format_version": PACKED_VERSION}}

    def fill(d: Path) -> None:
        save_packed(d / "model.safetensors", {}, layout, extra_tensors=extra,
                    metadata={"source": "random"}, prepacked=packed)
        (d / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")

    return write_dir_atomic(Path(folder), fill)
