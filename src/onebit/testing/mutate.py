"""Mutations of model files for the loader fuzz harness (``onebit.testing.fuzz``).

Each mutator takes the case's RNG and a path, edits the file in place and returns a short
description. They run in the harness's own (unsandboxed) process, so each one bounds what it
builds: arithmetic only on plain ints, loops bounded by the file's size (a mutated count must not
make the *harness* allocate; ``math.prod(["7", 2**40])`` once did).
"""

from __future__ import annotations

import json
import math
import random
import struct
from pathlib import Path

__all__ = ["DEEP", "HUGE", "VALUES", "dump", "json_edit", "mutate_json_file", "config_consistent", "flip", "truncate",
           "st_mutate", "gguf_mutate", "llama2c_mutate"]

_BIG_INTS = [0, -1, 1, 2, 3, 7, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**53 + 1, 2**63 - 1, 2**63,
             2**64, -(2**63), 10**30, 192000]
HUGE = "\x00HUGE"   # placeholders replaced in the JSON text (json.dumps cannot write them)
DEEP = "\x00DEEP"
VALUES = _BIG_INTS + [1e308, -1e308, 1e-320, 0.5, 1.5, -0.0, float("nan"), float("inf"), float("-inf"),
                       "", "0", "7", "i2", "t1_6", "relu2", "bitnet", "x" * 1000, None, True, False,
                       [], [1], [1, 2], {}, {"a": 1}, [[[]]], HUGE, DEEP]


def dump(obj) -> str:
    text = json.dumps(obj)
    return (text.replace(json.dumps(HUGE), "9" * 5000)
                .replace(json.dumps(DEEP), "[" * 100_000 + "]" * 100_000))


def _walk(rng: random.Random, obj):
    """A random (container, key) inside obj: each step stops with p = 0.4 (not at the root)."""
    parent, key, node = None, None, obj
    while isinstance(node, (dict, list)) and node and (parent is None or rng.random() > 0.4):
        k = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        parent, key, node = node, k, node[k]
    return parent, key


def json_edit(rng: random.Random, obj) -> tuple[object, str]:
    """One JSON mutation of ``obj`` (edited in place where possible); returns (new obj, what)."""
    op = rng.choice(["set", "set", "set", "delete", "add", "retype", "deep-root", "root-type"])
    if op == "deep-root":
        return DEEP, "whole document nested 100,000 deep"
    if op == "root-type":
        v = rng.choice([[], 7, "x", None, [obj]])
        return v, f"document replaced by {str(v)[:20]}"
    parent, key = _walk(rng, obj)
    if parent is None:
        return obj, "no-op (empty document)"
    if op == "delete":
        if isinstance(parent, dict):
            del parent[key]
        else:
            parent.pop(key)
        return obj, f"deleted {key!r}"
    if op == "add":
        target = parent[key] if isinstance(parent[key], dict) else parent
        name = rng.choice(["extra_key", "num_hidden_layers", "layout", "hidden_size", "model", "vocab"])
        if isinstance(target, dict):
            target[name] = rng.choice(VALUES)
        else:
            target.append(rng.choice(VALUES))
        return obj, f"added {name!r}"
    if op == "retype":
        v = parent[key]
        parent[key] = (str(v) if not isinstance(v, str) else
                       (int(v) if v.isdecimal() and len(v) < 10 else [v]))
        return obj, f"{key!r} retyped to {type(parent[key]).__name__}"
    parent[key] = v = rng.choice(VALUES)
    return obj, f"{key!r} = {('<huge int>' if v == HUGE else '<deep>' if v == DEEP else repr(v))[:30]}"


def mutate_json_file(rng: random.Random, path: Path) -> str:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return f"{path.name}: unreadable, left as is"
    obj, what = json_edit(rng, obj)
    path.write_text(dump(obj), encoding="utf-8")
    return f"{path.name}: {what}"


def _int(v, default: int) -> int:
    """v if it is a plain int of a sane size, else default: arithmetic on what an earlier mutation
    left (a string, a list) must not build something huge in the harness itself."""
    return v if type(v) is int and abs(v) < 1 << 64 else default


def config_consistent(rng: random.Random, folder: Path) -> str:
    """Config edits that keep config.json valid but no longer true of the weights."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    table = cfg["model"] if isinstance(cfg.get("model"), dict) else cfg  # onebit or HF layout
    choices = ["layers-1", "layers+1", "hidden*2", "vocab-1", "vocab=2^31", "hidden=192000",
               "layers=2^40", "heads", "kv_heads", "head_dim", "tie", "act", "placement", "max_pos",
               "ffn", "bos"]
    if "packed" in cfg:
        choices += ["layout-swap"] * 4 + ["embedding"] * 2
    if "quantization_config" in cfg:
        choices += ["quant-class", "model_type"]
    what = rng.choice(choices)
    L = table.get("num_hidden_layers", 2)
    L = L if isinstance(L, int) else 2
    edits = {
        "layers-1": ("num_hidden_layers", max(L - 1, 1)), "layers+1": ("num_hidden_layers", L + 1),
        "hidden*2": ("hidden_size", 2 * _int(table.get("hidden_size"), 64)), "vocab-1": ("vocab_size", 319),
        "vocab=2^31": ("vocab_size", 2**31), "hidden=192000": ("hidden_size", 192000),
        "layers=2^40": ("num_hidden_layers", 2**40), "heads": ("num_attention_heads", 8),
        "kv_heads": ("num_key_value_heads", 1), "head_dim": ("head_dim", rng.choice([32, 80, 10**308])),
        "tie": ("tie_word_embeddings", not table.get("tie_word_embeddings", True)),
        "act": ("hidden_act", rng.choice(["silu", "relu2"])),
        "placement": ("norm_placement", rng.choice(["subln", "inner", "pre"])),
        "max_pos": ("max_position_embeddings", rng.choice([1, 1 << 20, 2**31])),
        "ffn": ("intermediate_size", rng.choice([1, 96, 512])), "bos": ("bos_token_id", 319),
    }
    if what == "layout-swap":
        cfg["packed"]["layout"] = "i2" if cfg["packed"]["layout"] == "t1_6" else "t1_6"
    elif what == "embedding":
        cfg["packed"]["embedding"] = rng.choice(["f32", "f16", "i8", "i4"])
    elif what == "quant-class":
        cfg["quantization_config"]["linear_class"] = rng.choice(["bitlinear", "autobitlinear"])
    elif what == "model_type":
        cfg["model_type"] = rng.choice(["llama", "bitnet", "mistral"])
    else:
        key, value = edits[what]
        table[key] = value
    path.write_text(json.dumps(cfg), encoding="utf-8")
    return f"config.json: {what}"


# ---- raw bytes --------------------------------------------------------------------------------

def flip(rng: random.Random, path: Path) -> str:
    data = bytearray(path.read_bytes())
    if not data:
        return f"{path.name}: empty, not flipped"
    n = rng.randint(1, 8)
    for _ in range(n):
        hi = min(len(data), 4096) if rng.random() < 0.6 else len(data)  # headers live up front
        pos = rng.randrange(hi)
        data[pos] = rng.randrange(256) if rng.random() < 0.5 else data[pos] ^ (1 << rng.randrange(8))
    path.write_bytes(bytes(data))
    return f"{path.name}: {n} bytes flipped"


def truncate(rng: random.Random, path: Path) -> str:
    data = path.read_bytes()
    cut = rng.choice([0, 1, 7, 8, 24, rng.randrange(len(data) + 1), len(data) - 1])
    cut = max(0, min(cut, len(data)))
    path.write_bytes(data[:cut])
    return f"{path.name}: truncated to {cut} of {len(data)} bytes"


# ---- safetensors headers ---------------------------------------------------------------------

def _st_read(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def _st_write(path: Path, header, body: bytes) -> None:
    raw = dump(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + body)


_ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


def st_mutate(rng: random.Random, path: Path) -> str:
    try:
        header, body = _st_read(path)
        names = sorted(k for k in header if k != "__metadata__")
    except (ValueError, RecursionError, AttributeError, TypeError):
        return flip(rng, path)
    if not names or not isinstance(header[names[0]], dict):
        return flip(rng, path)
    name = rng.choice(names)
    t = header[name]
    op = rng.choice(["dim", "dim", "reshape", "reshape", "dtype", "dtype", "offsets", "rename",
                     "rename", "drop", "meta", "meta", "deep"])
    what = op
    if op == "dim" and isinstance(t.get("shape"), list) and t["shape"]:
        i = rng.randrange(len(t["shape"]))
        t["shape"][i] = rng.choice(_BIG_INTS + [1e308, "7", None, []])
        what = f"{name} shape[{i}] = {str(t['shape'][i])[:24]}"
    elif op == "reshape" and all(type(v) is int and 0 <= v < 1 << 40 for v in t["shape"]):
        # the same bytes, another shape: passes the container's own checks. (Only on int dims: an
        # earlier edit may have left "7" there, and math.prod(["7", 2**40]) is a 1 TB string.)
        s = t["shape"]
        count = math.prod(s)
        new = rng.choice([s[::-1], [count], [1, count], [count, 1], s + [1]])
        t["shape"] = new
        what = f"{name} reshaped {s} -> {new}"
    elif op == "dtype":
        same = [d for d, sz in _ST_SIZES.items() if sz == _ST_SIZES.get(t["dtype"])]
        t["dtype"] = rng.choice(same if rng.random() < 0.7 else list(_ST_SIZES) + ["F8", 7, ["F32"], None])
        what = f"{name} dtype -> {t['dtype']}"
    elif op == "offsets":
        i = rng.randrange(2)
        t["data_offsets"][i] = rng.choice(_BIG_INTS)
        what = f"{name} data_offsets[{i}] = {t['data_offsets'][i]}"
    elif op == "rename":
        new = name.replace("layers.1.", "layers.5.").replace("layers.0.", "layers.1.") \
            if "layers." in name else name + ".extra"
        if new in header:
            new = new + ".dup"
        header[new] = header.pop(name)
        what = f"{name} renamed {new}"
    elif op == "drop":
        del header[name]
        what = f"{name} dropped from the header"
    elif op == "meta":
        meta = header.get("__metadata__") or {}
        header["__metadata__"] = meta
        if "onebit.tensors" in meta and rng.random() < 0.8:
            try:
                decl = json.loads(meta["onebit.tensors"])
                decl, what = json_edit(rng, decl) if rng.random() < 0.5 else _declared_edit(rng, decl)
                meta["onebit.tensors"] = dump(decl)
            except (ValueError, RecursionError):
                meta["onebit.tensors"] = "["
            what = f"metadata onebit.tensors: {what}"
        else:
            key = rng.choice(sorted(meta) + ["onebit.format_version", "format"]) if meta else "format"
            meta[key] = rng.choice(["", "2", "0", "onebit-packed", "[" * 100_000, "pt"])
            what = f"metadata {key} edited"
    else:
        header = DEEP
        what = "header nested 100,000 deep"
    _st_write(path, header, body)
    return f"{path.name}: {what}"


def _declared_edit(rng: random.Random, decl: dict) -> tuple[dict, str]:
    """onebit.tensors edits that stay well-formed: a layout or shape that is not the tensor's."""
    name = rng.choice(sorted(decl))
    d = decl[name]
    if rng.random() < 0.5:
        d["layout"] = "i2" if d.get("layout") == "t1_6" else "t1_6"
        return decl, f"{name} layout -> {d['layout']}"
    i = rng.randrange(2)
    v = _int(d["shape"][i], 7)
    d["shape"][i] = rng.choice([v + 1, v * 2, 2**31, 2**63 - 1, 1])
    return decl, f"{name} shape[{i}] = {d['shape'][i]}"


# ---- GGUF headers ----------------------------------------------------------------------------

_G_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_G_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q",
          12: "<d"}


def _gguf_fields(data: bytes) -> dict[str, list]:
    """Byte positions in a GGUF v3 header: counts, key/value entries, tensor infos."""
    f: dict[str, list] = {"kv": [], "str": [], "tensor": []}
    pos = 24
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)

    def string(p):
        n = struct.unpack_from("<Q", data, p)[0]
        f["str"].append(p)
        return p + 8 + n, data[p + 8:p + 8 + n].decode("utf-8", "replace")

    for _ in range(min(n_kv, len(data))):  # every entry takes bytes: the file bounds the loops
        pos, key = string(pos)
        typ = struct.unpack_from("<I", data, pos)[0]
        f["kv"].append((key, typ, pos, pos + 4))
        pos += 4
        if typ in _G_SIZE:
            pos += _G_SIZE[typ]
        elif typ == 8:
            pos, _ = string(pos)
        elif typ == 9:
            sub, n = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if sub == 8:
                for _ in range(min(n, len(data))):
                    pos, _ = string(pos)
            else:
                pos += n * _G_SIZE[sub]
    for _ in range(min(n_tensors, len(data))):
        pos, name = string(pos)
        nd = struct.unpack_from("<I", data, pos)[0]
        if nd > 8:  # a mutated count: never build a list of 2^32 positions here
            raise ValueError(f"tensor {name!r} has {nd} dims")
        dims = [pos + 4 + 8 * i for i in range(nd)]
        f["tensor"].append((name, pos, dims, pos + 4 + 8 * nd, pos + 8 + 8 * nd))
        pos += 4 + 8 * nd + 12
    return f


_GGUF_KEYS = ("block_count", "head_count", "embedding_length", "feed_forward_length",
              "context_length", "head_count_kv", "dimension_count", "alignment", "token_id")


def gguf_mutate(rng: random.Random, path: Path) -> str:
    data = bytearray(path.read_bytes())
    try:  # an earlier mutation may have broken the header: then flip bytes instead
        f = _gguf_fields(bytes(data))
        if not f["kv"] or not f["tensor"]:
            raise ValueError("no fields")
    except (struct.error, KeyError, ValueError, OverflowError, IndexError):
        return flip(rng, path)
    op = rng.choice(["kv-int"] * 5 + ["kv-float", "kv-type", "str-len", "dim", "dim", "ttype",
                                      "toffset", "counts"])
    what = op
    if op in ("kv-int", "kv-float"):
        ints = [kv for kv in f["kv"] if kv[1] in (0, 1, 2, 3, 4, 5, 7, 10, 11)]
        floats = [kv for kv in f["kv"] if kv[1] in (6, 12)]
        if op == "kv-int":
            hot = [kv for kv in ints if kv[0].endswith(_GGUF_KEYS)]
            key, typ, _, vpos = rng.choice(hot if hot and rng.random() < 0.8 else ints)
            bits = 8 * _G_SIZE[typ]
            v = rng.choice([0, 1, 2**(bits - 1) - 1, 2**(bits - 1), 2**bits - 1, 3, 255]) % 2**bits
            struct.pack_into(_G_FMT[typ].upper() if typ not in (7,) else "<B", data, vpos, v)
            what = f"{key} = {v} (as {bits}-bit)"
        elif floats:
            key, typ, _, vpos = rng.choice(floats)
            v = rng.choice([float("nan"), float("inf"), -1.0, 0.0, 1e38, -1e-45])
            struct.pack_into(_G_FMT[typ], data, vpos, v)
            what = f"{key} = {v}"
    elif op == "kv-type":
        key, _, tpos, _ = rng.choice(f["kv"])
        v = rng.choice([0, 4, 6, 8, 9, 10, 12, 13, 255, 2**32 - 1])
        struct.pack_into("<I", data, tpos, v)
        what = f"{key} type -> {v}"
    elif op == "str-len":
        p = rng.choice(f["str"])
        n = struct.unpack_from("<Q", data, p)[0]
        v = rng.choice([0, n + 1, n - 1 if n else 1, 2**32, 2**63 - 1, 2**64 - 1])
        struct.pack_into("<Q", data, p, v)
        what = f"a string length {n} -> {v}"
    elif op == "dim":
        name, _, dims, _, _ = rng.choice(f["tensor"])
        p = rng.choice(dims)
        d = struct.unpack_from("<Q", data, p)[0]
        v = rng.choice([0, 1, d * 2, d // 2 or 1, 2**31, 2**32, 2**40, 2**63 - 1, 2**64 - 1])
        struct.pack_into("<Q", data, p, v)
        what = f"{name} dim {d} -> {v}"
    elif op == "ttype":
        name, _, _, tp, _ = rng.choice(f["tensor"])
        v = rng.choice([0, 1, 2, 34, 35, 36, 99, 2**32 - 1])
        struct.pack_into("<I", data, tp, v)
        what = f"{name} type -> {v}"
    elif op == "toffset":
        name, _, _, _, op_ = rng.choice(f["tensor"])
        o = struct.unpack_from("<Q", data, op_)[0]
        v = rng.choice([0, o + 1, o + 32, o - 32 if o >= 32 else 32, 2**40, 2**63 - 1, 2**64 - 1])
        struct.pack_into("<Q", data, op_, v)
        what = f"{name} offset {o} -> {v}"
    else:
        i = rng.choice([8, 16])
        n = struct.unpack_from("<Q", data, i)[0]
        v = rng.choice([0, n - 1, n + 1, 2**24, 2**32 - 1, 2**63 - 1])
        struct.pack_into("<Q", data, i, v)
        what = f"{'tensor' if i == 8 else 'kv'} count {n} -> {v}"
    path.write_bytes(bytes(data))
    return f"{path.name}: {what}"


# ---- llama2.c ----------------------------------------------------------------------------------

def llama2c_mutate(rng: random.Random, path: Path) -> str:
    data = bytearray(path.read_bytes())
    if len(data) < 28:
        return flip(rng, path)
    i = rng.randrange(7)
    names = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
    old = struct.unpack_from("<i", data, 4 * i)[0]
    v = rng.choice([0, -1, 1, old - 1, old + 1, old * 2, 2**31 - 1, -(2**31), 0x616B3432, -old])
    struct.pack_into("<i", data, 4 * i, v)
    path.write_bytes(bytes(data))
    return f"{path.name}: header {names[i]} {old} -> {v}"
