"""GGUF files in (a defensive reader) and out (TQ2_0 / TQ1_0 / I2_S), torch-free.

Reader: every count, length, offset, type and shape in the header is checked against the file
size and hard limits *before* anything is allocated, so a truncated or hostile file raises
``GGUFError`` naming the file and the field (tests/test_gguf_io.py fuzzes it). Only the tensor
types of ternary models are decoded: F32, F16, TQ1_0 (34), TQ2_0 (35) and bitnet.cpp's I2_S (36).

I2_S (bitnet.cpp, x86 layout, docs/formats.md §7c): the row-major [N, K] codes (value + 1) in
blocks of 128; value j of a block sits in byte j % 32 of the block's 32 bytes at bits
7-2(j//32) .. 6-2(j//32) (the first 32 values in bits 7:6); after the N*K/4 data bytes one
float32 scale (value = code * scale), then padding to N*K/4 + 32 bytes.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from .model_io import Dense, TernaryModel

__all__ = [
    "I2_S",
    "GGUFError",
    "GGUFFile",
    "decode_i2_s",
    "decode_tq1_0",
    "decode_tq2_0",
    "encode_i2_s",
    "parse_gguf",
    "read_gguf",
    "write_gguf",
]

F32, F16, TQ1_0, TQ2_0, I2_S = 0, 1, 34, 35, 36
_BLOCK = {F32: (1, 4), F16: (1, 2), TQ1_0: (256, 54), TQ2_0: (256, 66)}  # values, bytes
_NAMES = {F32: "F32", F16: "F16", TQ1_0: "TQ1_0", TQ2_0: "TQ2_0", I2_S: "I2_S"}
MAX_STRING = 64 << 20     # one metadata string (a merges list item is tiny; a chat template < 1 MB)
MAX_COUNT = 1 << 24       # tensors, metadata keys, array items
MAX_DIMS = 4
MAX_ELEMENTS = 1 << 40
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
           11: "<q", 12: "<d"}


class GGUFError(ValueError):
    """A GGUF file is truncated, corrupt, or holds something onebit does not read."""


class GGUFFile:
    """Parsed header: ``kv`` (key -> value), ``tensors`` (name -> (type, shape [N, K] row-major,
    absolute offset, nbytes)) and the read-only map ``data``."""

    def __init__(self, path: Path, kv: dict, tensors: dict, data: mmap.mmap):
        self.path, self.kv, self.tensors, self.data = path, kv, tensors, data

    def array(self, name: str) -> np.ndarray:
        typ, shape, off, nbytes = self.tensors[name]
        return np.frombuffer(self.data, np.uint8, nbytes, off)


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"'{self.path}' is not a valid GGUF file: {what} (at byte {self.pos}); "
                         f"the file is truncated or corrupt: re-create or re-download it")

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"needs {n} more bytes but only {self.size - self.pos} remain")
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > MAX_STRING:
            raise self.fail(f"a string claims {n} bytes (limit {MAX_STRING})")
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("a string is not UTF-8") from None

    def value(self, typ: int, depth: int = 0):
        if typ in _SCALAR:
            return self.unpack(_SCALAR[typ])
        if typ == 8:
            return self.string()
        if typ == 9:
            if depth > 2:
                raise self.fail("arrays nested deeper than 2")
            sub, n = self.unpack("<I"), self.unpack("<Q")
            min_item = struct.calcsize(_SCALAR[sub]) if sub in _SCALAR else 8 if sub in (8, 9) else 0
            if min_item == 0:
                raise self.fail(f"array of unknown value type {sub}")
            if n > MAX_COUNT or n * min_item > self.size - self.pos:
                raise self.fail(f"an array claims {n} items of type {sub}, more than the file holds")
            if sub in _SCALAR and sub != 7:
                arr = np.frombuffer(self.take(n * min_item), np.dtype(_SCALAR[sub]))
                return arr.tolist()
            return [self.value(sub, depth + 1) for _ in range(n)]
        raise self.fail(f"unknown metadata value type {typ}")


def _nbytes(typ: int, n: int, k: int, name: str, cur: _Cursor) -> int:
    if typ == I2_S:
        if (n * k) % 128:
            raise cur.fail(f"I2_S tensor {name!r} holds {n * k} values, not a multiple of 128")
        return n * k // 4 + 32
    if typ not in _BLOCK:
        raise cur.fail(f"tensor {name!r} has type {typ}; onebit reads F32, F16, TQ1_0, TQ2_0 and "
                       f"I2_S only")
    per, size = _BLOCK[typ]
    if k % per:
        raise cur.fail(f"tensor {name!r} rows of {k} values are not whole {per}-value blocks")
    return n * (k // per) * size


def parse_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse and check a GGUF file's header (v2/v3, little-endian). Raises GGUFError."""
    path = Path(path)
    size = path.stat().st_size
    if size < 24:
        raise GGUFError(f"'{path}' is {size} bytes, too short for a GGUF header")
    with open(path, "rb") as f:
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    cur = _Cursor(data, path)
    if cur.take(4) != b"GGUF":
        raise cur.fail("the magic is not 'GGUF'")
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise cur.fail(f"version {version} is not supported (2 or 3)")
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    if n_tensors > MAX_COUNT or n_kv > MAX_COUNT or (n_tensors + n_kv) * 12 > size:
        raise cur.fail(f"it claims {n_tensors} tensors and {n_kv} metadata keys, more than fit")
    kv = {}
    for _ in range(n_kv):
        key = cur.string()
        kv[key] = cur.value(cur.unpack("<I"))
    align = kv.get("general.alignment", 32)
    if not isinstance(align, int) or align < 1 or align > 1 << 20 or align & (align - 1):
        raise cur.fail(f"general.alignment {align!r} must be a power of two")
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        nd = cur.unpack("<I")
        if not 1 <= nd <= MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {nd} dimensions (1..{MAX_DIMS})")
        dims = [cur.unpack("<Q") for _ in range(nd)]
        count = 1
        for d in dims:
            if d < 1 or d > MAX_ELEMENTS:
                raise cur.fail(f"tensor {name!r} has a dimension of {d}")
            count *= d
        if count > MAX_ELEMENTS:
            raise cur.fail(f"tensor {name!r} has {count} elements")
        typ, off = cur.unpack("<I"), cur.unpack("<Q")
        k = dims[0]
        n = count // k
        infos.append((name, typ, (n, k), off, _nbytes(typ, n, k, name, cur)))
    start = -(-cur.pos // align) * align
    tensors, spans = {}, []
    for name, typ, shape, off, nb in infos:
        if name in tensors:
            raise cur.fail(f"tensor {name!r} appears twice")
        if off % align or start + off + nb > size:
            raise cur.fail(f"tensor {name!r} at data offset {off} + {nb} bytes lies outside the "
                           f"{size}-byte file or is misaligned")
        tensors[name] = (typ, shape, start + off, nb)
        spans.append((off, off + nb, name))
    spans.sort()
    for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise cur.fail(f"tensors {n0!r} and {n1!r} overlap")
    return GGUFFile(path, kv, tensors, data)


# --------------------------------------------------------------------------------------------
# Block decoders (the inverse of gguf_export's encoders and of encode_i2_s)
# --------------------------------------------------------------------------------------------

def _codes(u: np.ndarray, what: str) -> np.ndarray:
    if (u > 2).any():
        raise GGUFError(f"{what}: a 2-bit code is 3 (valid: 0, 1, 2); the file is corrupt")
    return (u.astype(np.int8) - 1)


def decode_tq2_0(raw: np.ndarray, n: int, k: int, what: str = "TQ2_0") -> tuple[np.ndarray, np.ndarray]:
    """uint8 blocks -> (codes int8 [n, k], d float32 [n, k/256])."""
    b = raw.reshape(n, k // 256, 66)
    qs = b[:, :, :64].reshape(n, k // 256, 2, 1, 32)
    u = (qs >> (2 * np.arange(4, dtype=np.uint8))[None, None, None, :, None]) & 3  # [.., c, j, m]
    d = b[:, :, 64:].copy().view(np.float16)[..., 0].astype(np.float32)
    return _codes(u.reshape(n, k), what), d


def _trits(b: np.ndarray, count: int) -> np.ndarray:
    """ggml's fixed-point trit extraction: trit j = ((b * 3^j mod 256) * 3) >> 8."""
    pow3 = np.array([1, 3, 9, 27, 81][:count], np.uint16)
    q = (b.astype(np.uint16)[..., None, :] * pow3[:, None]) & 0xFF   # [..., j, m]
    return ((q * 3) >> 8).astype(np.uint8)


def decode_tq1_0(raw: np.ndarray, n: int, k: int, what: str = "TQ1_0") -> tuple[np.ndarray, np.ndarray]:
    b = raw.reshape(n, k // 256, 54)
    a = _trits(b[:, :, 0:32], 5).reshape(n, -1, 160)
    c = _trits(b[:, :, 32:48], 5).reshape(n, -1, 80)
    h = _trits(b[:, :, 48:52], 4).reshape(n, -1, 16)
    u = np.concatenate([a, c, h], axis=2)
    d = b[:, :, 52:].copy().view(np.float16)[..., 0].astype(np.float32)
    return _codes(u.reshape(n, k), what), d


def encode_i2_s(codes: np.ndarray, scale: float) -> np.ndarray:
    """codes int8 [N, K] (N*K a multiple of 128) -> uint8 [N*K/4 + 32] (bitnet.cpp x86 I2_S)."""
    u = (np.asarray(codes, np.int16).reshape(-1, 4, 32) + 1).astype(np.uint8)  # [blocks, g, m]
    q = (u[:, 0] << 6) | (u[:, 1] << 4) | (u[:, 2] << 2) | u[:, 3]
    out = np.zeros(q.size + 32, np.uint8)
    out[:q.size] = q.reshape(-1)
    out[q.size:q.size + 4] = np.array([scale], "<f4").view(np.uint8)
    return out


def decode_i2_s(raw: np.ndarray, n: int, k: int, what: str = "I2_S") -> tuple[np.ndarray, float]:
    q = raw[:n * k // 4].reshape(-1, 32)
    u = np.stack([(q >> s) & 3 for s in (6, 4, 2, 0)], axis=1)  # [blocks, g, m]
    scale = float(raw[n * k // 4:n * k // 4 + 4].copy().view("<f4")[0])
    return _codes(u.reshape(n, k), what), scale


# --------------------------------------------------------------------------------------------
# GGUF -> TernaryModel
# --------------------------------------------------------------------------------------------

_PROJ = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj"}
_NORMS = {"attn_norm": "input_layernorm", "attn_sub_norm": "self_attn.attn_sub_norm",
          "ffn_norm": "post_attention_layernorm", "ffn_sub_norm": "mlp.ffn_sub_norm"}


def _f32_decimal(v) -> float:
    """GGUF stores eps / rope base as float32: 1e-5 comes back as 9.99999974e-06. The shortest
    decimal that round-trips the float32 recovers the value the model was written with."""
    return float(str(np.float32(v)))


def _float_codes(v: np.ndarray, has_scale: bool, what: str) -> tuple[np.ndarray, float]:
    """A projection stored as floats (gguf_export's F16 fallback): exactly -1/0/+1 when a
    ``.scale`` tensor carries the scale, else exactly -s/0/+s; anything else is not ternary."""
    v = np.asarray(v, np.float32)
    s = 1.0 if has_scale else float(np.abs(v).max(initial=0.0)) or 1.0
    codes = v / np.float32(s)
    if not np.isin(codes, (-1.0, 0.0, 1.0)).all():
        raise GGUFError(f"{what}: a float projection whose values are not "
                        f"{'-1/0/+1' if has_scale else 'one scale times -1/0/+1'}; onebit reads "
                        f"ternary models only: convert from the source model")
    return codes.astype(np.int8), s


def read_gguf(path: str | os.PathLike) -> TernaryModel:
    """A ternary GGUF (llama.cpp ``bitnet`` / bitnet.cpp ``bitnet-b1.58``, TQ1_0/TQ2_0/I2_S)
    as a TernaryModel. Exact only when every block of a tensor has the same scale (what onebit's
    own export writes); per-block scales (llama.cpp's quantizer) are refused, never averaged."""
    g = parse_gguf(path)
    arch = g.kv.get("general.architecture")
    if arch not in ("bitnet", "bitnet-b1.58"):
        raise GGUFError(f"'{path}': architecture {arch!r} is not a ternary BitNet model "
                        f"(bitnet, bitnet-b1.58)")

    def meta(key, default=None):
        v = g.kv.get(f"{arch}.{key}", default)
        if v is None:
            raise GGUFError(f"'{path}' lacks metadata {arch}.{key}")
        return v

    def meta_int(key, default=None) -> int:  # a size: checked before any arithmetic with it
        v = meta(key, default)
        if type(v) is not int or v < 1:
            raise GGUFError(f"'{path}': metadata {arch}.{key} = {str(v)[:40]} must be an integer >= 1; "
                            f"the file is corrupt: re-create it")
        return v

    D, L = meta_int("embedding_length"), meta_int("block_count")
    H = meta_int("attention.head_count")
    # the layers present must be exactly 0..L-1 (checked before anything loops over L): a lower
    # block_count would silently run a truncated model, a huge one allocate per layer
    present = {int(n.split(".")[1]) for n in g.tensors
               if n.startswith("blk.") and n.split(".")[1].isdecimal() and len(n.split(".")[1]) < 10}
    if len(present) != L or present != set(range(L)):
        have = f"{min(present)}..{max(present)}" if present else "none"
        raise GGUFError(f"'{path}': metadata {arch}.block_count = {L} but the file holds tensors of "
                        f"{len(present)} blocks ({have}); the file is corrupt: re-create it")
    if "token_embd.weight" not in g.tensors:
        raise GGUFError(f"'{path}': tensor 'token_embd.weight' is missing")
    vocab = g.tensors["token_embd.weight"][1][0]
    act = g.kv.get("onebit.hidden_act", "relu2" if arch == "bitnet-b1.58" else "silu")
    tied = "output.weight" not in g.tensors
    rope_dim = meta_int("rope.dimension_count", D // H)
    try:
        cfg = ModelConfig(
            vocab_size=vocab, hidden_size=D, intermediate_size=meta_int("feed_forward_length"),
            num_hidden_layers=L, num_attention_heads=H,
            num_key_value_heads=meta_int("attention.head_count_kv", H),
            head_dim=rope_dim if rope_dim != D // H else None,
            hidden_act=act, max_position_embeddings=meta_int("context_length", 2048),
            rms_norm_eps=_f32_decimal(meta("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=_f32_decimal(meta("rope.freq_base", 10000.0)), tie_word_embeddings=tied,
            bos_token_id=g.kv.get("tokenizer.ggml.bos_token_id", 0),
            eos_token_id=g.kv.get("tokenizer.ggml.eos_token_id", 0), norm_placement="subln")
    except (TypeError, ValueError, OverflowError) as e:
        raise GGUFError(f"'{path}': its metadata does not describe a valid model: {e}") from None

    def tensor(name: str, shape: tuple[int, int] | tuple[int]) -> tuple[int, np.ndarray]:
        if name not in g.tensors:
            raise GGUFError(f"'{path}': tensor {name!r} is missing")
        typ, (n, k), _, _ = g.tensors[name]
        if (n, k) != ((1, shape[0]) if len(shape) == 1 else shape):
            raise GGUFError(f"'{path}': tensor {name!r} is [{n}, {k}], the metadata implies {shape}")
        return typ, g.array(name)

    def dense(name: str, shape) -> Dense:
        typ, raw = tensor(name, shape)
        if typ == F32:
            return Dense(raw.view("<f4").reshape(shape).astype(np.float32))
        if typ == F16:
            return Dense(raw.view("<f2").reshape(shape).astype(np.float16), "f16")
        raise GGUFError(f"'{path}': tensor {name!r} is {_NAMES.get(typ, typ)}; expected F32 or F16")

    def ternary(name: str, n: int, k: int):
        def load():
            typ, raw = tensor(name, (n, k))
            sname = name.rsplit(".", 1)[0] + ".scale"
            if typ == I2_S:
                codes, scale = decode_i2_s(raw, n, k, f"'{path}' {name}")
            elif typ in (F16, F32):  # rows that are not whole blocks: codes (times d) as floats
                codes, scale = _float_codes(raw.view("<f2" if typ == F16 else "<f4").reshape(n, k),
                                            sname in g.tensors, f"'{path}' {name}")
                if sname in g.tensors:
                    styp, sraw = tensor(sname, (1,))
                    if styp != F32:
                        raise GGUFError(f"'{path}': {sname} must be F32")
                    scale *= float(sraw.view("<f4")[0])
            elif typ in (TQ2_0, TQ1_0):
                codes, d = (decode_tq2_0 if typ == TQ2_0 else decode_tq1_0)(raw, n, k, f"'{path}' {name}")
                if d.size and not (d == d.flat[0]).all():
                    raise GGUFError(f"'{path}': {name} has different scales per block (llama.cpp's "
                                    f"quantizer writes per-block absmax); onebit keeps one scale per "
                                    f"tensor and will not approximate: convert from the source model")
                scale = float(d.flat[0])
                if sname in g.tensors:
                    styp, sraw = tensor(sname, (1,))
                    if styp != F32:
                        raise GGUFError(f"'{path}': {sname} must be F32")
                    scale *= float(sraw.view("<f4")[0])
            else:
                raise GGUFError(f"'{path}': {name} is {_NAMES.get(typ, typ)}, not a ternary type")
            return codes, scale
        return load

    from .model_io import projections
    ternary_map, dense_map = {}, {}
    for name, n, k in projections(cfg):
        i, role = name.split(".")[2], name.split(".", 3)[3]
        gname = f"blk.{i}.{[a for a, b in _PROJ.items() if b == role][0]}.weight"
        ternary_map[name] = ternary(gname, n, k)
    QD, F = H * cfg.resolved_head_dim, cfg.intermediate_size
    sizes = {"attn_norm": D, "ffn_norm": D, "attn_sub_norm": QD, "ffn_sub_norm": F}
    for i in range(L):
        for gn, on in _NORMS.items():
            dense_map[f"model.layers.{i}.{on}.weight"] = dense(f"blk.{i}.{gn}.weight", (sizes[gn],))
    dense_map["model.norm.weight"] = dense("output_norm.weight", (D,))
    dense_map["model.embed_tokens.weight"] = dense("token_embd.weight", (vocab, D))
    if not tied:
        dense_map["lm_head.weight"] = dense("output.weight", (vocab, D))
    used = {"output_norm.weight", "token_embd.weight", "output.weight"}
    for i in range(L):
        used.update(f"blk.{i}.{t}.weight" for t in (*_PROJ, *_NORMS))
        used.update(f"blk.{i}.{t}.scale" for t in _PROJ)  # optional per-tensor scales
    stray = sorted(set(g.tensors) - used)
    if stray:
        raise GGUFError(f"'{path}': tensors {stray[:4]} are not part of the {arch} layout onebit "
                        f"reads (block_count = {L}); refusing to drop them silently")
    from .gguf_tokenizer import GGUFTokenizerError, tokenizer_files

    try:
        files = tokenizer_files(g.kv, f"'{path}'")  # tokenizer.json + tokenizer_config.json, or {}
    except GGUFTokenizerError as e:
        raise GGUFError(str(e)) from None
    n_tok = len(g.kv.get("tokenizer.ggml.tokens") or [])
    if files and n_tok != vocab:
        raise GGUFError(f"'{path}': its tokenizer has {n_tok} tokens but token_embd has {vocab} rows")
    return TernaryModel(cfg, ternary_map, dense_map, files, f"{path} (gguf {arch})")


def write_gguf(tm: TernaryModel, out: str | os.PathLike, qtype: str, *, embedding: str | None = None,
               allow_relu2: bool = False, scales: str = "tensor") -> Path:
    """Write ``tm`` as GGUF ``qtype`` ("tq2_0", "tq1_0", "i2_s"): gguf_export.write_gguf_model,
    whose errors name ``tm.source``."""
    from .gguf_export import write_gguf_model

    emb = "auto" if embedding in (None, "auto") else embedding
    return write_gguf_model(tm, out, qtype, embedding=emb, allow_relu2=allow_relu2, scales=scales)
