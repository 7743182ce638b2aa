"""Zero-copy, defensive safetensors reader (numpy views of a read-only memory map).

The inference engine maps its weights instead of reading them: start-up touches only the header
and pages are read on first use, shared between processes. Every header field is checked against
the file before any view is made — header length, JSON, dtype, shape, offsets inside the data
area, sizes equal to shape x itemsize, no overlaps — so a truncated or hostile file raises
``SafetensorsError`` naming the file, the tensor and what is wrong, never a crash or a giant
allocation. No pickle, no torch.

bf16 tensors come back as uint16 views (numpy has no bfloat16); ``bf16_to_f32`` widens them.
"""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path

import numpy as np

__all__ = ["SafetensorsError", "read_safetensors", "bf16_to_f32"]

MAX_HEADER = 100 << 20  # the safetensors library's own limit on the JSON header

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsError(ValueError):
    """A safetensors file is truncated, corrupt or not a safetensors file at all."""


def _fail(path: Path, what: str) -> SafetensorsError:
    return SafetensorsError(f"'{path}' is not a valid safetensors file: {what}; the file is "
                            f"truncated or corrupt: re-create or re-download it")


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file, each tensor a read-only view of a mmap.

    The views keep the map alive; it closes when the last one is gone. Raises SafetensorsError
    for anything malformed, FileNotFoundError for a missing file.
    """
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise _fail(path, f"it is {size} bytes, shorter than the 8-byte header length")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > MAX_HEADER or 8 + n > size:
            raise _fail(path, f"the header claims {n} bytes but the file has {size - 8} after "
                              f"the length field (limit {MAX_HEADER})")
        raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:  # deep nesting recurses
            what = "nested too deeply" if isinstance(e, RecursionError) else e
            raise _fail(path, f"the header is not UTF-8 JSON ({what})") from None
        if not isinstance(header, dict):
            raise _fail(path, "the header is not a JSON object")
        meta = header.pop("__metadata__", {}) or {}
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in meta.items()):
            raise _fail(path, "__metadata__ must map strings to strings")
        data_start, data_size = 8 + n, size - 8 - n
        spans = []
        for name, d in header.items():
            if not isinstance(d, dict) or set(d) != {"dtype", "shape", "data_offsets"}:
                raise _fail(path, f"tensor {name!r} entry {str(d)[:80]} needs exactly dtype, shape "
                                  f"and data_offsets")
            dt, shape, offs = d["dtype"], d["shape"], d["data_offsets"]
            if not isinstance(dt, str) or dt not in _DTYPES:
                raise _fail(path, f"tensor {name!r} has unknown dtype {dt!r}")
            if not (isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)):
                raise _fail(path, f"tensor {name!r} has an invalid shape {shape!r}")
            if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)
                    and 0 <= offs[0] <= offs[1] <= data_size):
                raise _fail(path, f"tensor {name!r} has data_offsets {offs!r} outside the "
                                  f"{data_size}-byte data area")
            count = 1
            for s in shape:
                count *= s
            itemsize = np.dtype(_DTYPES[dt]).itemsize
            if count * itemsize != offs[1] - offs[0]:
                raise _fail(path, f"tensor {name!r}: shape {shape} of {dt} is {count * itemsize} "
                                  f"bytes but its data_offsets span {offs[1] - offs[0]}")
            spans.append((offs[0], offs[1], name))
        spans.sort()
        for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise _fail(path, f"tensors {n0!r} and {n1!r} overlap")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else None
    tensors = {}
    for begin, end, name in spans:
        d = header[name]
        dtype = np.dtype(_DTYPES[d["dtype"]]).newbyteorder("<")
        count = (end - begin) // dtype.itemsize
        arr = np.frombuffer(mm, dtype=dtype, count=count, offset=data_start + begin)
        tensors[name] = arr.reshape(d["shape"])
    return tensors, dict(meta)


def bf16_to_f32(a: np.ndarray) -> np.ndarray:
    """Widen bf16 stored as uint16 to float32 (exact)."""
    return (a.astype(np.uint32) << 16).view(np.float32)
