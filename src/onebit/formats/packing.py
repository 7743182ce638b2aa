"""onebit's packed ternary weight layouts and their safetensors container (spec: docs/formats.md).

This is the numpy reference: C kernels are byte-checked against ``pack``/``unpack``. The on-disk
layout never depends on the build target; a kernel may repack at load time.

A ternary matrix is int8 codes [N, K] in {-1, 0, 1} (N output rows, K inputs) and one float32
per-tensor scale, ``value = code * scale``. Each row is zero-padded to a multiple of the block and
every block of ``block`` values is stored in 32 bytes; byte m of a block holds the elements
m, m+32, m+64, ... ("lane" j = element m + 32j) as stored codes c = value + 1 in {0, 1, 2}:

- ``i2``   (2 bits/weight):   128-value blocks, lane j in bits [2j+1:2j]    (= a TQ2_0 32-byte chunk)
- ``t1_6`` (1.6 bits/weight): 160-value blocks, q = sum_j c_j * 3^(4-j), byte = ceil(q*256/243);
  digit j = ((byte * 3^j) mod 256) * 3 >> 8                                 (TQ1_0's 5-trit encoding)
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..atomic import atomic_file
from ..config import short

FORMAT_NAME = "onebit-packed"
FORMAT_VERSION = "1"
META_FORMAT = "onebit.format"
META_VERSION = "onebit.format_version"
META_TENSORS = "onebit.tensors"
QWEIGHT_SUFFIX = ".qweight"
SCALE_SUFFIX = ".scale"
LANE = 32  # bytes per block; byte m holds the elements m + 32*j of its block

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LAYOUTS",
    "Layout",
    "PackedFormatError",
    "PackedTensor",
    "padded_k",
    "packed_row_bytes",
    "pack",
    "unpack",
    "validate_packed",
    "save_packed",
    "load_packed",
    "read_declared",
]


class PackedFormatError(ValueError):
    """Packed ternary data or a packed container is invalid (bad code, padding, shape, header)."""


@dataclass(frozen=True)
class Layout:
    name: str
    block: int        # values per block (a row is zero-padded to a multiple of it)
    block_bytes: int  # bytes per block
    lanes: int        # values per byte: byte m of a block holds elements m + 32*j, j < lanes

    @property
    def bits_per_weight(self) -> float:
        """Bits per weight without padding (padding adds to it when K is not a block multiple)."""
        return 8 * self.block_bytes / self.block


LAYOUTS: dict[str, Layout] = {
    "i2": Layout("i2", block=128, block_bytes=32, lanes=4),      # 2.0 bpw
    "t1_6": Layout("t1_6", block=160, block_bytes=32, lanes=5),  # 1.6 bpw
}
for _l in LAYOUTS.values():
    assert _l.block == _l.block_bytes * _l.lanes and _l.block_bytes == LANE

_POW3 = np.array([81, 27, 9, 3, 1], dtype=np.uint16)  # weight of lane j in q (most significant first)


def _layout(layout: str) -> Layout:
    try:
        return LAYOUTS[layout]
    except (KeyError, TypeError):
        raise ValueError(f"unknown packed layout {layout!r}; known layouts: "
                         f"{', '.join(sorted(LAYOUTS))}") from None


def padded_k(k: int, layout: str) -> int:
    """K rounded up to a multiple of the layout's block (the stored row length in values)."""
    lay = _layout(layout)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k={k!r} must be a positive integer (the number of inputs of the matrix)")
    return -(-int(k) // lay.block) * lay.block


def packed_row_bytes(k: int, layout: str) -> int:
    """Bytes of one packed row of ``k`` weights: padded_k / block * 32."""
    lay = _layout(layout)
    return padded_k(k, layout) // lay.block * lay.block_bytes


# ---------------------------------------------------------------------------------------------
# Byte tables, _TABLES[layout] = (decode, valid): decode[b] = uint8 [lanes], the stored codes c
# (0..3) of lanes 0..lanes-1 of byte b; valid[b] says whether pack can write byte b.
# ---------------------------------------------------------------------------------------------

def _i2_tables() -> tuple[np.ndarray, np.ndarray]:
    b = np.arange(256, dtype=np.uint8)
    dec = np.stack([(b >> (2 * j)) & 3 for j in range(4)], axis=1).astype(np.uint8)  # [256, 4]
    return dec, (dec != 3).all(axis=1)


def _t1_6_encode_q(q: np.ndarray) -> np.ndarray:
    # byte = ceil(q * 256 / 243): fixed-point q/243 so that a digit is a multiply and a shift
    q = q.astype(np.uint32)
    return ((q * 256 + 242) // 243).astype(np.uint8)


def _t1_6_tables() -> tuple[np.ndarray, np.ndarray]:
    b = np.arange(256, dtype=np.uint16)
    # digit j = ((b * 3^j) mod 256) * 3 >> 8, exactly what a 16-bit SIMD multiply does
    dec = np.stack([(((b * 3 ** j) & 0xFF) * 3) >> 8 for j in range(5)], axis=1).astype(np.uint8)
    q = dec.astype(np.uint16) @ _POW3
    valid = _t1_6_encode_q(q) == b  # the 13 bytes that are not ceil(q*256/243) of any q are invalid
    return dec, valid


_TABLES = {"i2": _i2_tables(), "t1_6": _t1_6_tables()}


# ---------------------------------------------------------------------------------------------
# pack / unpack
# ---------------------------------------------------------------------------------------------

def _check_codes(codes: np.ndarray) -> None:
    if not isinstance(codes, np.ndarray):
        raise TypeError(f"codes must be a numpy int8 array, got {type(codes).__name__} "
                        f"(convert a torch tensor with .numpy())")
    if codes.dtype != np.int8:
        raise TypeError(f"codes must have dtype int8 (values -1, 0, 1), got {codes.dtype}; "
                        f"use quant.ternary_absmean codes or .astype(np.int8)")
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D [N, K] (N outputs, K inputs), got shape {codes.shape}")
    if codes.shape[0] < 1 or codes.shape[1] < 1:
        raise ValueError(f"codes must be non-empty, got shape {codes.shape}")
    if codes.min() < -1 or codes.max() > 1:
        r, c = np.argwhere((codes < -1) | (codes > 1))[0]
        raise ValueError(f"codes must be ternary (-1, 0, 1): codes[{r}, {c}] = {codes[r, c]}; "
                         f"quantize with quant.ternary_absmean first")


def pack(codes: np.ndarray, layout: str) -> np.ndarray:
    """Pack ternary codes int8 [N, K] in {-1, 0, 1} into uint8 [N, packed_row_bytes(K, layout)].

    Raises TypeError (not an int8 ndarray) or ValueError (not 2-D, empty, non-ternary value,
    unknown layout).
    """
    lay = _layout(layout)
    _check_codes(codes)
    n, k = codes.shape
    kp = padded_k(k, layout)
    c = np.ones((n, kp), dtype=np.uint8)                         # padding: value 0 -> code 1
    c[:, :k] = codes.view(np.uint8) + np.uint8(1)                # c = value + 1 (wraps -1 -> 0)
    c = c.reshape(n, kp // lay.block, lay.lanes, LANE)           # [N, blocks, lane j, byte m]
    if lay.name == "i2":
        out = c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)
    else:
        c16 = c.astype(np.uint16)
        q = 81 * c16[:, :, 0] + 27 * c16[:, :, 1] + 9 * c16[:, :, 2] + 3 * c16[:, :, 3] + c16[:, :, 4]
        out = _t1_6_encode_q(q)                                  # q in 0..242 -> byte
    return np.ascontiguousarray(out.reshape(n, -1))              # [N, Kp/block*32]


def _check_packed(packed: np.ndarray, k: int, lay: Layout) -> None:
    if not isinstance(packed, np.ndarray):
        raise TypeError(f"packed must be a numpy uint8 array, got {type(packed).__name__}")
    if packed.dtype != np.uint8:
        raise TypeError(f"packed must have dtype uint8, got {packed.dtype}")
    if packed.ndim != 2:
        raise ValueError(f"packed must be 2-D [N, row_bytes], got shape {packed.shape}")
    rb = packed_row_bytes(k, lay.name)
    if packed.shape[0] < 1 or packed.shape[1] != rb:
        raise PackedFormatError(
            f"packed shape {packed.shape} does not fit k={k} with layout {lay.name!r}: a row of {k} "
            f"weights is {rb} bytes; pass the K the matrix was packed with (and N >= 1)")


def _decode(packed: np.ndarray, lay: Layout) -> np.ndarray:
    # [N, row_bytes] bytes -> [N, Kp] stored codes c (0..3), via the 256-entry table
    dec, _ = _TABLES[lay.name]
    n = packed.shape[0]
    c = dec[packed.reshape(n, -1, LANE)]                         # [N, blocks, byte m, lane j]
    return c.transpose(0, 1, 3, 2).reshape(n, -1)                # element m + 32j of each block


def validate_packed(packed: np.ndarray, k: int, layout: str) -> None:
    """Check packed uint8 [N, row_bytes] holds only valid codes and zero padding past column k.

    Raises PackedFormatError naming the row and column (``i2``) or byte (``t1_6``) at fault;
    TypeError / ValueError for a wrong dtype, rank or layout name.
    """
    lay = _layout(layout)
    _check_packed(packed, k, lay)
    _, valid = _TABLES[lay.name]
    ok = valid[packed]
    if not ok.all():
        r, byte = (int(x) for x in np.argwhere(~ok)[0])
        b = int(packed[r, byte])
        if lay.name == "i2":
            blk, m = divmod(byte, LANE)
            j = int(np.argmax(_TABLES["i2"][0][b] == 3))
            col = blk * lay.block + j * LANE + m
            raise PackedFormatError(f"invalid i2 code 3 at row {r}, column {col} (byte {byte} = "
                                    f"0x{b:02x}, bits {2 * j + 1}:{2 * j}); codes are value+1 in 0..2")
        raise PackedFormatError(f"invalid t1_6 byte 0x{b:02x} at row {r}, byte {byte}: it is not "
                                f"ceil(q*256/243) for any q in 0..242 (5 trits)")
    kp = padded_k(k, layout)
    if kp > k:
        first = k // lay.block                                   # first block holding padding
        tail = _decode(packed[:, first * lay.block_bytes:], lay)[:, k - first * lay.block:]
        bad = tail != 1                                          # padding columns k..Kp-1
        if bad.any():
            r, c = (int(x) for x in np.argwhere(bad)[0])
            raise PackedFormatError(f"nonzero padding in {lay.name} data at row {r}, column {k + c} "
                                    f"(k={k}, padded to {kp}): padding must decode to 0")


def unpack(packed: np.ndarray, k: int, layout: str) -> np.ndarray:
    """Unpack uint8 [N, packed_row_bytes(k, layout)] into int8 codes [N, k] in {-1, 0, 1}.

    Raises PackedFormatError for an invalid code or byte, nonzero padding, or a row length that
    does not match ``k``; TypeError / ValueError for a wrong dtype, rank or layout name.
    """
    validate_packed(packed, k, layout)
    c = _decode(packed, _layout(layout))[:, :k]
    return c.astype(np.int8) - np.int8(1)                        # value = c - 1


# ---------------------------------------------------------------------------------------------
# safetensors container
# ---------------------------------------------------------------------------------------------

class PackedTensor(NamedTuple):
    packed: np.ndarray          # uint8 [N, packed_row_bytes(K, layout)]
    scale: float                # value = code * scale
    layout: str
    shape: tuple[int, int]      # (N, K) of the unpacked matrix


def _check_scale(scale, name: str) -> float:
    try:
        arr = np.asarray(scale, dtype=np.float64)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.size != 1:
        raise ValueError(f"tensor {name!r}: scale must be one number, got {scale!r}")
    s = float(arr.reshape(()))
    if not math.isfinite(s) or s < 0:
        raise ValueError(f"tensor {name!r}: scale must be finite and >= 0, got {s}")
    return s


def save_packed(path: str | os.PathLike, tensors: dict[str, tuple[np.ndarray, float]], layout: str,
                extra_tensors: dict[str, np.ndarray] | None = None,
                metadata: dict[str, str] | None = None, packer=None,
                prepacked: dict[str, tuple[np.ndarray, float, int]] | None = None) -> Path:
    """Pack ``{name: (codes int8 [N, K], scale)}`` with ``layout`` and write a safetensors file.

    Writes ``{name}.qweight`` (uint8 [N, row_bytes]) and ``{name}.scale`` (float32 [1]) per
    tensor, the ``extra_tensors`` unchanged, and metadata ``onebit.format``,
    ``onebit.format_version`` and ``onebit.tensors`` (JSON {name: {"layout", "shape": [N, K]}})
    plus ``metadata``. Atomic: temp file in the same folder, fsync, os.replace. ``packer`` (default
    ``pack``) may be the byte-identical C twin ``onebit.kernels.pack`` for big models.
    ``prepacked`` adds ``{name: (qweight uint8 [N, packed_row_bytes(K)], scale, K)}`` already packed
    with ``layout`` (a writer that packs as it goes never holds a big model's int8 codes at once;
    ``tensors`` may then be empty). Raises TypeError / ValueError naming the offending tensor or key.
    """
    from safetensors.numpy import save_file

    _layout(layout)
    path = Path(path)
    out: dict[str, np.ndarray] = {}
    declared: dict[str, dict] = {}
    if not isinstance(tensors, dict) or not (tensors or prepacked):
        raise ValueError("tensors must be a non-empty dict {name: (codes int8 [N, K], scale)}")
    for name, item in (prepacked or {}).items():
        q, scale, k = item
        if not isinstance(q, np.ndarray) or q.dtype != np.uint8 or q.ndim != 2 \
                or q.shape[1] != packed_row_bytes(int(k), layout):
            raise ValueError(f"prepacked tensor {name!r}: expected uint8 [N, {packed_row_bytes(int(k), layout)}] "
                             f"({layout} rows of {k} weights)")
        out[name + QWEIGHT_SUFFIX] = np.ascontiguousarray(q)
        out[name + SCALE_SUFFIX] = np.array([_check_scale(scale, name)], dtype=np.float32)
        declared[name] = {"layout": layout, "shape": [int(q.shape[0]), int(k)]}
    for name, item in tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
        if not isinstance(item, tuple) or len(item) != 2:
            raise ValueError(f"tensor {name!r}: expected a (codes, scale) tuple")
        codes, scale = item
        try:
            _check_codes(codes)
        except (TypeError, ValueError) as e:
            raise type(e)(f"tensor {name!r}: {e}") from None
        out[name + QWEIGHT_SUFFIX] = (packer or pack)(codes, layout)
        out[name + SCALE_SUFFIX] = np.array([_check_scale(scale, name)], dtype=np.float32)
        declared[name] = {"layout": layout, "shape": [int(codes.shape[0]), int(codes.shape[1])]}
    for name, arr in (extra_tensors or {}).items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"extra tensor names must be non-empty strings, got {name!r}")
        if name.endswith((QWEIGHT_SUFFIX, SCALE_SUFFIX)):
            raise ValueError(f"extra tensor {name!r}: names ending in {QWEIGHT_SUFFIX!r} or "
                             f"{SCALE_SUFFIX!r} are reserved for packed tensors; rename it")
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"extra tensor {name!r} must be a numpy array, got {type(arr).__name__}")
        out[name] = np.ascontiguousarray(arr)
    meta = {META_FORMAT: FORMAT_NAME, META_VERSION: FORMAT_VERSION,
            META_TENSORS: json.dumps(declared, separators=(",", ":"))}
    for key, val in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(val, str):
            raise TypeError(f"metadata must map str to str, got {key!r}: {type(val).__name__}")
        if key.startswith("onebit."):
            raise ValueError(f"metadata key {key!r}: the 'onebit.' prefix is reserved; rename it")
        meta[key] = val

    with atomic_file(path) as tmp:
        save_file(out, str(tmp), metadata=meta)
    return path


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise FileNotFoundError(f"packed file '{path}' does not exist")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata()
            arrays = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise PackedFormatError(f"'{path}' is not a readable safetensors file ({e}); it is truncated "
                                f"or corrupt: re-create it with save_packed") from None
    return arrays, dict(meta or {})


def read_declared(path: Path, meta: dict[str, str]) -> dict[str, tuple[str, tuple[int, int]]]:
    """``{name: (layout, (N, K))}`` from a packed file's metadata (its ``onebit.tensors``): each
    tensor's layout as declared, the one the readers trust. Raises PackedFormatError naming
    ``path``."""
    if meta.get(META_FORMAT) != FORMAT_NAME:
        raise PackedFormatError(f"'{path}' is not an onebit packed file (metadata {META_FORMAT!r} is "
                                f"{short(meta.get(META_FORMAT))}, expected {FORMAT_NAME!r}); write it with "
                                f"save_packed")
    if meta.get(META_VERSION) != FORMAT_VERSION:
        raise PackedFormatError(f"'{path}' has packed format version {short(meta.get(META_VERSION))}; this "
                                f"onebit reads version {FORMAT_VERSION!r}: use a matching onebit or "
                                f"re-export the file")
    from ..jsonio import loads_checked

    raw = loads_checked(meta.get(META_TENSORS, ""), f"'{path}': metadata {META_TENSORS!r}",
                        PackedFormatError, "the file is corrupt: re-create it with save_packed")
    if not isinstance(raw, dict) or not raw:
        raise PackedFormatError(f"'{path}': metadata {META_TENSORS!r} must be a non-empty JSON object "
                                f"{{name: {{layout, shape}}}}; re-create the file with save_packed")
    declared = {}
    for name, d in raw.items():
        ok = (isinstance(d, dict) and set(d) == {"layout", "shape"} and isinstance(d["layout"], str)
              and d["layout"] in LAYOUTS
              and isinstance(d["shape"], list) and len(d["shape"]) == 2
              and all(type(v) is int and v >= 1 for v in d["shape"]))
        if not ok:
            raise PackedFormatError(f"'{path}': tensor {short(name)} has an invalid declaration {short(d)} in "
                                    f"{META_TENSORS!r}: expected {{\"layout\": one of "
                                    f"{sorted(LAYOUTS)}, \"shape\": [N, K]}}; re-create the file")
        declared[name] = (d["layout"], (d["shape"][0], d["shape"][1]))
    return declared


def load_packed(path: str | os.PathLike, *, check_codes: bool = True
                ) -> tuple[dict[str, PackedTensor], dict[str, np.ndarray], dict[str, str]]:
    """Read a file written by ``save_packed``: ``(packed, extra_tensors, metadata)``.

    ``packed`` maps name -> PackedTensor(packed uint8 [N, row_bytes], scale, layout, (N, K));
    ``metadata`` is the user metadata (without the ``onebit.*`` keys). Every declared tensor,
    dtype, shape and scale is checked, and with ``check_codes`` every byte (valid codes, zero
    padding; one cheap pass). Raises PackedFormatError naming the file, the tensor and the fix;
    FileNotFoundError for a missing file. Never unpickles anything.
    """
    path = Path(path)
    arrays, meta = _read_safetensors(path)
    declared = read_declared(path, meta)
    result: dict[str, PackedTensor] = {}
    for name, (layout, (n, k)) in declared.items():
        qn, sn = name + QWEIGHT_SUFFIX, name + SCALE_SUFFIX
        for t in (qn, sn):
            if t not in arrays:
                raise PackedFormatError(f"'{path}': tensor {t!r} is missing (declared in "
                                        f"{META_TENSORS!r}); the file is incomplete: re-create it")
        q, s = arrays.pop(qn), arrays.pop(sn)
        want = (n, packed_row_bytes(k, layout))
        if q.dtype != np.uint8 or q.shape != want:
            raise PackedFormatError(f"'{path}': tensor {qn!r} is {q.dtype} {q.shape}, but a {layout} "
                                    f"matrix of shape [{n}, {k}] is uint8 {want}; re-create the file")
        if s.dtype != np.float32 or s.shape != (1,) or not (np.isfinite(s[0]) and s[0] >= 0):
            raise PackedFormatError(f"'{path}': tensor {sn!r} must be one finite float32 >= 0, got "
                                    f"{s.dtype} {s.shape} {s.ravel()[:2]}; re-create the file")
        if check_codes:
            try:
                validate_packed(q, k, layout)
            except PackedFormatError as e:
                raise PackedFormatError(f"'{path}': tensor {qn!r}: {e}; the file is corrupt: "
                                        f"re-create it") from None
        result[name] = PackedTensor(q, float(s[0]), layout, (n, k))
    stray = sorted(t for t in arrays if t.endswith((QWEIGHT_SUFFIX, SCALE_SUFFIX)))
    if stray:
        raise PackedFormatError(f"'{path}': tensors {stray[:5]} are not declared in {META_TENSORS!r}; "
                                f"the file is inconsistent: re-create it with save_packed")
    user_meta = {key: v for key, v in meta.items() if not key.startswith("onebit.")}
    return result, arrays, user_meta
