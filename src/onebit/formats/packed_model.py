"""Packed model folders: what the inference engine runs (spec: docs/formats.md §5).

A packed model folder holds::

    config.json        {"model": ModelConfig, "packed": {"layout", "embedding", "format_version"}}
    model.safetensors  every ternary projection packed (``{name}.qweight`` + ``{name}.scale``, the
                       onebit-packed container of formats.packing), norms float32, embeddings
                       (and an untied LM head) as float32, float16, int8 + per-row scale, or 4-bit (pack_i4
                       uint8 rows) + per-row scale
    tokenizer.json     when the source had one

``export_packed`` writes one from a trained model folder (it needs torch; reading does not).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..config import short
from .packing import LAYOUTS, save_packed

__all__ = ["EMBEDDINGS", "PACKED_VERSION", "export_packed", "quantize_rows_i8", "quantize_rows_i4",
           "pack_i4", "unpack_i4_rows", "packed_config"]

PACKED_VERSION = 1
EMBEDDINGS = ("f32", "f16", "i8", "i4")
I8_SCALE_SUFFIX = ".row_scale"  # int8 embeddings: value = q * row_scale[row]


def quantize_rows_i8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row absmax int8 of a float matrix [V, D]: (q int8 [V, D], scale float32 [V])."""
    w = np.asarray(w, dtype=np.float32)
    amax = np.maximum(np.abs(w).max(axis=1), 1e-8).astype(np.float32)
    scale = (amax / 127.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def pack_i4(q: np.ndarray) -> np.ndarray:
    """int8 [n, k] in [-8, 7] -> uint8 [n, ceil(k/64)*32]: per 32-byte block the low nibbles hold
    elements 0..31 and the high nibbles 32..63, as q + 8 (padding: q = 0). The C kernel
    ``ob_linear_i4`` reads this layout."""
    q = np.asarray(q)
    if q.dtype != np.int8 or q.ndim != 2 or q.size == 0 or q.min() < -8 or q.max() > 7:
        raise ValueError("q must be a non-empty int8 [n, k] array with values in [-8, 7]")
    n, k = q.shape
    kp = -(-k // 64) * 64
    u = np.full((n, kp), 8, np.uint8)
    u[:, :k] = (q.astype(np.int16) + 8).astype(np.uint8)
    u = u.reshape(n, kp // 64, 2, 32)
    return np.ascontiguousarray((u[:, :, 0] | (u[:, :, 1] << 4)).reshape(n, kp // 2))


def unpack_i4_rows(packed: np.ndarray, k: int) -> np.ndarray:
    """The inverse of ``pack_i4`` (for the rows given): int8 [n, k]."""
    b = np.asarray(packed, dtype=np.uint8)
    n = b.shape[0]
    blocks = b.reshape(n, -1, 32)
    u = np.stack([blocks & 15, blocks >> 4], axis=2).reshape(n, -1)   # [n, kp]
    return (u[:, :k].astype(np.int16) - 8).astype(np.int8)


def quantize_rows_i4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row absmax 4-bit of a float matrix [V, D]: (pack_i4 bytes, scale float32 [V]),
    value = q * scale with q in [-7, 7]."""
    w = np.asarray(w, dtype=np.float32)
    scale = (np.maximum(np.abs(w).max(axis=1), 1e-8) / 7.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -7, 7).astype(np.int8)
    return pack_i4(q), scale


def packed_config(folder: Path, raw: Any = None) -> dict[str, Any]:
    """The "packed" table of a packed folder's config.json (checked; ``raw``: the file's JSON if
    already read), or raise ValueError naming the file."""
    if raw is None:
        from ..jsonio import read_json

        raw = read_json(Path(folder) / "config.json", fix="re-export the model")
    p = raw.get("packed") if isinstance(raw, dict) else None
    if not isinstance(p, dict):
        raise ValueError(f"'{folder}/config.json' has no 'packed' table: this is not a packed model "
                         f"folder; write one with `onebit export` (formats.packed_model.export_packed)")
    if type(p.get("format_version")) is not int or p["format_version"] != PACKED_VERSION:
        raise ValueError(f"'{folder}' is packed format version {short(p.get('format_version'))}; this "
                         f"onebit reads version {PACKED_VERSION}: re-export the model")
    if not (isinstance(p.get("layout"), str) and p["layout"] in LAYOUTS
            and isinstance(p.get("embedding"), str) and p["embedding"] in EMBEDDINGS):
        raise ValueError(f"'{folder}/config.json': packed layout {short(p.get('layout'))} / embedding "
                         f"{short(p.get('embedding'))} unknown (layouts {sorted(LAYOUTS)}, embeddings "
                         f"{list(EMBEDDINGS)}); re-export the model")
    return p


def read_packed_config(folder: Path, error: type[ValueError]) -> tuple[dict[str, Any], Any]:
    """A packed folder's config.json: its checked "packed" table and its ModelConfig, or
    ``error`` (a ValueError subclass) naming the file."""
    from ..config import ModelConfig
    from ..jsonio import read_json

    raw = read_json(folder / "config.json", error, fix="re-export the model")
    p = packed_config(folder, raw)
    try:
        if not isinstance(raw.get("model"), dict):
            raise ValueError("it has no 'model' table")
        cfg = ModelConfig.from_dict(raw["model"])
    except ValueError as e:
        raise error(f"'{folder}/config.json': {e}") from None
    return p, cfg


def export_packed(src: str | Path, dst: str | Path, layout: str = "i2",
                  embedding: str = "f32", force: bool = False) -> Path:
    """Pack the trained model at ``src`` (a model, checkpoint or run folder) into folder ``dst``.

    ``layout``: "i2" (2 bits/weight, fastest) or "t1_6" (1.6 bits/weight). ``embedding``: "f32"
    (lossless), "f16", "i8" or "i4" (per-row absmax; the quality cost is measured in
    bench/results_heads.py and bounded by the engine tests).
    The folder is written atomically. Raises ValueError for a model that is not ternary, and
    DestinationError (before any work) for a ``dst`` that may not be written: the source or a
    folder holding it, files onebit did not write, an earlier onebit output unless ``force``.
    """
    import torch

    from .. import quant
    from ..checkpoint import TOKENIZER_FILE, load_model, write_dir_atomic
    from ..destination import check_destination
    from ..nn import BitLinear

    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is unknown; use one of {sorted(LAYOUTS)}")
    if embedding not in EMBEDDINGS:
        raise ValueError(f"embedding={embedding!r} is unknown; use one of {list(EMBEDDINGS)}")
    check_destination(dst, "model", [src], force=force)
    model, _, folder = load_model(src)
    cfg = model.config
    if cfg.linear != "bitnet":
        raise ValueError(f"'{folder}' is a full-precision model (linear={cfg.linear!r}); only "
                         f"ternary (linear='bitnet') models can be packed")
    ternary = {name for name, m in model.named_modules() if isinstance(m, BitLinear) and m.weight_quant}
    packed: dict[str, tuple[np.ndarray, float]] = {}
    extra: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for name, t in model.state_dict().items():
            owner = name.rsplit(".", 1)[0]
            if owner in ternary and name.endswith(".weight"):
                codes, scale = quant.ternary_absmean(t)
                packed[owner] = (codes.numpy(), float(scale))
            elif name in ("model.embed_tokens.weight", "lm_head.weight"):
                w = t.float().numpy()
                if embedding in ("i8", "i4"):
                    q, s = quantize_rows_i8(w) if embedding == "i8" else quantize_rows_i4(w)
                    extra[name], extra[name + I8_SCALE_SUFFIX] = q, s
                else:
                    extra[name] = w.astype(np.float16 if embedding == "f16" else np.float32)
            else:
                extra[name] = t.float().numpy()
    config = {"model": cfg.to_dict(),
              "packed": {"layout": layout, "embedding": embedding, "format_version": PACKED_VERSION}}
    tok = folder / TOKENIZER_FILE

    def fill(d: Path) -> None:
        save_packed(d / "model.safetensors", packed, layout, extra_tensors=extra,
                    metadata={"source": str(folder)})
        (d / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
        for f in (tok, folder / "tokenizer_config.json"):  # the config states the BOS convention
            if f.is_file():
                (d / f.name).write_bytes(f.read_bytes())

    return write_dir_atomic(Path(dst), fill)
