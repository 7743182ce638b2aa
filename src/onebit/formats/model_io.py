"""One in-memory form of a ternary model that every reader produces and every writer takes.

``convert`` is read -> ``TernaryModel`` -> write -> read back -> compare logits. Readers live in
hf.py (transformers layouts), gguf_io.py (GGUF) and here (onebit packed folders); writers
likewise. Ternary matrices stay lazy (a loader per projection) so a 2B-parameter model is never
decoded all at once. ``reference_logits`` is the slow, obviously correct forward (numpy, float64
with the BitNet integer quantizers) that every conversion is checked against. Torch-free.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from .packed_model import (
    EMBEDDINGS,
    I8_SCALE_SUFFIX,
    PACKED_VERSION,
    read_packed_config,
    unpack_i4_rows,
)

__all__ = [
    "ROLES",
    "TOKENIZER_FILES",
    "Dense",
    "TernaryModel",
    "check_tokenizer_files",
    "compare_logits",
    "dense_shapes",
    "projections",
    "read_packed_folder",
    "reference_logits",
    "write_model_dir",
    "write_packed_folder",
]

ROLES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# copied verbatim between formats that keep a tokenizer folder (HF, onebit)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "tokenizer.model")


@dataclass
class Dense:
    """A high-precision tensor as stored: ``data`` float32/float16, or int8 / 4-bit rows with a
    per-row ``row_scale`` (embeddings and LM heads). ``kind`` is one of packed_model.EMBEDDINGS."""
    data: np.ndarray
    kind: str = "f32"
    row_scale: np.ndarray | None = None
    cols: int = 0  # i4 only: unpacked row length

    def f32(self) -> np.ndarray:
        if self.kind in ("f32", "f16"):
            return np.asarray(self.data, dtype=np.float32)
        q = self.data if self.kind == "i8" else unpack_i4_rows(self.data, self.cols)
        return q.astype(np.float32) * np.asarray(self.row_scale, np.float32)[:, None]


@dataclass
class TernaryModel:
    """config + ternary projections (lazy ``name -> (codes int8 [N, K], scale)``, value =
    code * scale) + dense tensors (norms, embeddings, LM head) + tokenizer files."""
    config: ModelConfig
    ternary: dict[str, Callable[[], tuple[np.ndarray, float]]]
    dense: dict[str, Dense]
    files: dict[str, bytes] = field(default_factory=dict)
    source: str = ""

    def norm(self, name: str) -> np.ndarray | None:
        d = self.dense.get(name)
        return None if d is None else d.f32()


def projections(cfg: ModelConfig) -> list[tuple[str, int, int]]:
    """``(name, N, K)`` of every ternary projection, in file order."""
    D, F = cfg.hidden_size, cfg.intermediate_size
    QD, KD = cfg.num_attention_heads * cfg.resolved_head_dim, cfg.kv_heads * cfg.resolved_head_dim
    shapes = dict(zip(ROLES, ((QD, D), (KD, D), (KD, D), (D, QD), (F, D), (F, D), (D, F))))
    return [(f"model.layers.{i}.{r}", *shapes[r]) for i in range(cfg.num_hidden_layers) for r in ROLES]


# --------------------------------------------------------------------------------------------
# onebit packed folders
# --------------------------------------------------------------------------------------------

def dense_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of every high-precision tensor but the embeddings / LM head: norms (by
    ``norm_placement``), the final norm and q/k/v biases (``qkv_bias``)."""
    D, F = cfg.hidden_size, cfg.intermediate_size
    QD = cfg.num_attention_heads * cfg.resolved_head_dim
    out: dict[str, tuple[int, ...]] = {"model.norm.weight": (D,)}
    for name, n, k in projections(cfg):
        role = name.split(".", 3)[3]
        if cfg.norm_placement == "inner":
            out[name + ".norm.weight"] = (k,)
        if cfg.qkv_bias and role in ROLES[:3]:
            out[name + ".bias"] = (n,)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        if cfg.norm_placement != "inner":
            out[p + "input_layernorm.weight"] = out[p + "post_attention_layernorm.weight"] = (D,)
        if cfg.norm_placement == "subln":
            out[p + "self_attn.attn_sub_norm.weight"], out[p + "mlp.ffn_sub_norm.weight"] = (QD,), (F,)
    return out


def check_tokenizer_files(folder: Path, vocab_size: int, error) -> None:
    """The tokenizer files a conversion copies must load (and fit the vocabulary) here, where the
    error names the source, not later from the converted copy."""
    from ..jsonio import read_json, read_tokenizer

    if (folder / "tokenizer.json").is_file():
        read_tokenizer(folder / "tokenizer.json", error, vocab_size)
    if (folder / "tokenizer_config.json").is_file():
        read_json(folder / "tokenizer_config.json", error, fix="fix or remove it")


def read_packed_folder(folder: str | Path) -> TernaryModel:
    """A packed model folder (``onebit export``) as a TernaryModel (codes decoded on demand).
    Every tensor is checked against the config (names, shapes, dtypes, the layout config.json
    names) before anything is decoded, and tensors the config does not account for are refused.
    Raises PackedFormatError (a ValueError) naming the file."""
    from .packing import PackedFormatError, load_packed, unpack

    folder = Path(folder)
    p, cfg = read_packed_config(folder, PackedFormatError)
    weights = folder / "model.safetensors"
    packed, extra, _ = load_packed(weights)

    def bad(what: str) -> PackedFormatError:
        return PackedFormatError(f"'{weights}': {what}; the folder does not match its config.json "
                                 f"(num_hidden_layers={cfg.num_hidden_layers}, hidden_size="
                                 f"{cfg.hidden_size}): re-export the model")

    want = {name: (n, k) for name, n, k in projections(cfg)}
    for name in sorted(set(want) | set(packed)):
        t = packed.get(name)
        if name not in want or t is None or t.shape != want[name] or t.layout != p["layout"]:
            got = "missing" if t is None else f"{t.layout} {list(t.shape)}"
            exp = f"{p['layout']} {list(want[name])}" if name in want else "no such tensor"
            raise bad(f"packed tensor {name!r}: found {got}, the config expects {exp}")
    ternary = {}
    for name, t in packed.items():
        ternary[name] = (lambda t=t: (unpack(t.packed, t.shape[1], t.layout), t.scale))
    D, V, emb = cfg.hidden_size, cfg.vocab_size, p["embedding"]
    shapes: dict[str, tuple[tuple[int, ...], tuple]] = {
        n: (s, (np.float32, np.float16)) for n, s in dense_shapes(cfg).items()}
    heads = ["model.embed_tokens.weight"] + ([] if cfg.tie_word_embeddings else ["lm_head.weight"])
    for name in heads:
        kinds = {"f32": (np.float32, np.float16), "f16": (np.float32, np.float16),  # as the engine
                 "i8": (np.int8,), "i4": (np.uint8,)}
        shapes[name] = ((V, -(-D // 64) * 32) if emb == "i4" else (V, D), kinds[emb])
        if emb in ("i8", "i4"):
            shapes[name + I8_SCALE_SUFFIX] = ((V,), (np.float32,))
    for name in sorted(set(shapes) | set(extra)):
        arr = extra.get(name)
        if name not in shapes or arr is None or arr.shape != shapes[name][0] \
                or arr.dtype not in shapes[name][1]:
            got = "missing" if arr is None else f"{arr.dtype} {list(arr.shape)}"
            exp = f"{list(shapes[name][0])}" if name in shapes else "no such tensor"
            raise bad(f"tensor {name!r}: found {got}, the config expects {exp} ({emb} embeddings)")
    dense: dict[str, Dense] = {}
    for name, arr in extra.items():
        if name.endswith(I8_SCALE_SUFFIX):
            continue
        if name in ("model.embed_tokens.weight", "lm_head.weight") and emb in ("i8", "i4"):
            dense[name] = Dense(arr, emb, extra[name + I8_SCALE_SUFFIX], cfg.hidden_size)
        else:
            dense[name] = Dense(arr, "f16" if arr.dtype == np.float16 else "f32")
    files = {f: (folder / f).read_bytes() for f in TOKENIZER_FILES if (folder / f).is_file()}
    check_tokenizer_files(folder, cfg.vocab_size, PackedFormatError)
    return TernaryModel(cfg, ternary, dense, files, str(folder))


def write_packed_folder(tm: TernaryModel, dst: str | Path, layout: str = "i2",
                        embedding: str | None = None, verify=None) -> Path:
    """Write ``tm`` as a packed model folder (atomically). ``embedding`` None keeps each
    embedding's stored type (f32/f16/i8/i4); "f16"/"f32" converts float ones, refusing to widen
    (an int8 embedding is not silently written as f32). ``verify(tmpdir)`` runs on the complete
    folder before it is moved into place; an exception there leaves nothing behind."""
    from .. import kernels
    from .packed_model import quantize_rows_i4, quantize_rows_i8
    from .packing import save_packed

    cfg = tm.config
    kinds = {tm.dense[n].kind for n in ("model.embed_tokens.weight", "lm_head.weight") if n in tm.dense}
    if len(kinds) != 1:
        raise ValueError(f"{tm.source}: embeddings and LM head stored as {sorted(kinds)}; expected one type")
    src_kind = kinds.pop()
    want = embedding or src_kind
    if want not in EMBEDDINGS:
        raise ValueError(f"embedding={want!r} is unknown; use one of {list(EMBEDDINGS)}")
    rank = {"i4": 0, "i8": 1, "f16": 2, "f32": 3}
    if rank[want] > rank[src_kind]:
        raise ValueError(f"{tm.source}: the embeddings are stored as {src_kind}; writing them as "
                         f"{want} would widen them without adding information: use --embedding "
                         f"{src_kind} (or lower)")
    extra: dict[str, np.ndarray] = {}
    for name, d in tm.dense.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            if want == src_kind:
                extra[name] = np.ascontiguousarray(d.data)
                if d.row_scale is not None:
                    extra[name + I8_SCALE_SUFFIX] = np.asarray(d.row_scale, np.float32)
                continue
            w = d.f32()
            if want in ("i8", "i4"):
                extra[name], extra[name + I8_SCALE_SUFFIX] = (quantize_rows_i8 if want == "i8"
                                                              else quantize_rows_i4)(w)
            else:
                extra[name] = w.astype(np.float16 if want == "f16" else np.float32)
        else:
            extra[name] = d.f32()
    packed = {}
    for name, n, k in projections(cfg):
        if name not in tm.ternary:
            raise ValueError(f"{tm.source}: projection {name!r} is missing")
        codes, scale = tm.ternary[name]()
        if codes.shape != (n, k):
            raise ValueError(f"{tm.source}: {name} has shape {codes.shape}, config says {(n, k)}")
        packed[name] = (codes, scale)
    config = {"model": cfg.to_dict(),
              "packed": {"layout": layout, "embedding": want, "format_version": PACKED_VERSION}}

    return write_model_dir(dst, config, tm.files, verify, lambda d: save_packed(
        d / "model.safetensors", packed, layout, extra_tensors=extra,
        metadata={"source": tm.source[-200:]}, packer=kernels.pack))


def write_model_dir(dst: str | Path, config: dict, files: dict[str, bytes], verify,
                    write_weights) -> Path:
    """Atomically create folder ``dst``: ``write_weights(tmpdir)``, config.json, the tokenizer
    ``files``, then ``verify(tmpdir)`` (if given) before the folder is moved into place."""
    from ..atomic import write_dir_atomic

    def fill(d: Path) -> None:
        write_weights(d)
        (d / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
        for fname, data in files.items():
            (d / fname).write_bytes(data)
        if verify is not None:
            verify(d)

    return write_dir_atomic(Path(dst), fill)


# --------------------------------------------------------------------------------------------
# The reference forward (slow, obviously correct) and the logits comparison
# --------------------------------------------------------------------------------------------

def _rms(x: np.ndarray, w: np.ndarray | None, eps: float) -> np.ndarray:
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y if w is None else y * w


def _q8_linear(x: np.ndarray, codes: np.ndarray, scale: float) -> np.ndarray:
    """BitNet b1.58: per-token absmax INT8 activations (round half to even) x ternary codes."""
    s = 127.0 / np.maximum(np.abs(x).max(axis=-1, keepdims=True), 1e-5)
    xq = np.clip(np.rint(x * s), -128, 127)
    return (xq @ codes.T.astype(np.float64)) * (scale / s)


def _q4_linear(x: np.ndarray, codes: np.ndarray, scale: float) -> np.ndarray:
    """BitNet a4.8: per-token absmean INT4 activations (s = sqrt(7) / (mean|x| + 1e-5), dequantized
    with mean|x| / sqrt(7)) x ternary codes."""
    beta = np.abs(x).mean(axis=-1, keepdims=True)
    xq = np.clip(np.rint(x * (np.sqrt(7.0) / (beta + 1e-5))), -8, 7)
    return (xq @ codes.T.astype(np.float64)) * (scale * beta / np.sqrt(7.0))


def _topk(x: np.ndarray, keep: float) -> np.ndarray:
    """Keep the ceil(keep*d) largest |x| per row (ties: lowest index first), zero the rest."""
    d = x.shape[-1]
    k = max(1, math.ceil(keep * d))
    if k >= d:
        return x
    order = np.argsort(-np.abs(x), axis=-1, kind="stable")[..., :k]     # stable: lowest index first
    out = np.zeros_like(x)
    np.put_along_axis(out, order, np.take_along_axis(x, order, axis=-1), axis=-1)
    return out


def reference_logits(tm: TernaryModel, ids) -> np.ndarray:
    """Logits (float64) of token ids ``ids`` [T] or [B, T] at positions 0..T-1: [T, V] or
    [B, T, V], computed layer by layer from the decoded codes (each projection decoded once).
    Activations as the config's ``activation_scheme``: INT8 everywhere (a8), or a4.8's INT4
    q/k/v/gate/up, top-K then INT8 o_proj, INT8 down_proj."""
    cfg = tm.config
    a48 = cfg.activation_scheme == "a4.8"
    ids = np.asarray(ids, dtype=np.int64)
    single = ids.ndim == 1
    ids = ids[None] if single else ids
    B, T = ids.shape
    eps = cfg.rms_norm_eps
    H, Hkv, hd = cfg.num_attention_heads, cfg.kv_heads, cfg.resolved_head_dim
    place = cfg.norm_placement
    emb = tm.dense["model.embed_tokens.weight"]
    x = emb.f32()[ids].astype(np.float64)                                  # [B, T, D]
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = np.arange(T, dtype=np.float64)[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], 1)), np.sin(np.concatenate([ang, ang], 1))

    def rope(t):  # [B, T, h, hd], HF rotate_half
        rot = np.concatenate([-t[..., hd // 2:], t[..., :hd // 2]], axis=-1)
        return t * cos[None, :, None, :] + rot * sin[None, :, None, :]

    def lin(name, inp, norm_name=None):
        codes, scale = tm.ternary[name]()
        w = tm.norm(norm_name) if norm_name else None
        h = _rms(inp, w, eps) if norm_name else inp
        role = name.rsplit(".", 1)[-1]
        if a48 and role == "o_proj":
            h = _topk(h, cfg.topk_keep)
        out = (_q4_linear(h, codes, scale) if a48 and role in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
               else _q8_linear(h, codes, scale))
        if cfg.qkv_bias and role in ("q_proj", "k_proj", "v_proj"):  # Qwen2: full-precision bias
            out = out + tm.norm(name + ".bias").astype(np.float64)
        return out

    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        if place == "inner":
            h = x
            q, k, v = (lin(p + r, h, p + r + ".norm.weight") for r in ROLES[:3])
        else:
            h = _rms(x, tm.norm(p + "input_layernorm.weight"), eps)
            q, k, v = (lin(p + r, h) for r in ROLES[:3])
        q, k, v = q.reshape(B, T, H, hd), k.reshape(B, T, Hkv, hd), v.reshape(B, T, Hkv, hd)
        q, k = rope(q), rope(k)
        y = np.empty((B, T, H, hd))
        for b in range(B):
            for hh in range(H):
                kv = hh // (H // Hkv)
                a = q[b, :, hh] @ k[b, :, kv].T / np.sqrt(hd) + mask
                a = np.exp(a - a.max(-1, keepdims=True))
                y[b, :, hh] = (a / a.sum(-1, keepdims=True)) @ v[b, :, kv]
        y = y.reshape(B, T, H * hd)
        o_norm = {"inner": p + "self_attn.o_proj.norm.weight", "subln": p + "self_attn.attn_sub_norm.weight"}
        x = x + lin(p + "self_attn.o_proj", y, o_norm.get(place))
        if place == "inner":
            g = lin(p + "mlp.gate_proj", x, p + "mlp.gate_proj.norm.weight")
            u = lin(p + "mlp.up_proj", x, p + "mlp.up_proj.norm.weight")
        else:
            h = _rms(x, tm.norm(p + "post_attention_layernorm.weight"), eps)
            g, u = lin(p + "mlp.gate_proj", h), lin(p + "mlp.up_proj", h)
        a = np.maximum(g, 0.0) ** 2 if cfg.hidden_act == "relu2" else g / (1.0 + np.exp(-g))
        d_norm = {"inner": p + "mlp.down_proj.norm.weight", "subln": p + "mlp.ffn_sub_norm.weight"}
        x = x + lin(p + "mlp.down_proj", a * u, d_norm.get(place))
    x = _rms(x, tm.norm("model.norm.weight"), eps)
    head = tm.dense["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"]
    out = x @ head.f32().T.astype(np.float64)
    return out[0] if single else out


def compare_logits(ref: np.ndarray, got: np.ndarray, what: str, rtol: float = 5e-2) -> dict:
    """Check ``got`` against ``ref`` (both [T, V]): max |diff| <= rtol * max |ref|, and the same
    top-1 token wherever the reference's top-1 leads its runner-up by more than that bound
    (convert.py picks ``rtol``: 1e-6 for the same numbers through the same reference, loose for
    the float32 engine, whose int8 rounding flips against float64 grow with depth). Returns the
    measured numbers; raises ValueError naming ``what`` on a mismatch."""
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    if ref.shape != got.shape:
        raise ValueError(f"parity check failed for {what}: logits shape {got.shape} != {ref.shape}")
    if not np.isfinite(got).all():
        raise ValueError(f"parity check failed for {what}: non-finite logits")
    span = max(np.abs(ref).max(), 1e-12)
    err = float(np.abs(ref - got).max() / span)
    agree = ref.argmax(-1) == got.argmax(-1)
    top2 = np.sort(ref, axis=-1)[..., -2:]
    decisive = (top2[..., 1] - top2[..., 0]) > 2 * rtol * span
    res = {"max_rel_err": err, "top1_agree": float(agree.mean()), "positions": int(agree.size),
           "decisive": int(decisive.sum())}
    if err > rtol or not agree[decisive].all():
        raise ValueError(f"parity check failed for {what}: max |logit diff| = {err:.3g} of the logit "
                         f"range (limit {rtol}), top-1 agreement {agree.mean():.0%} "
                         f"({int((~agree & decisive).sum())} decisive positions differ); the output "
                         f"does not compute what the source computes: nothing was written")
    return res
