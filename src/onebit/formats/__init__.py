"""On-disk formats of onebit: packed ternary weights (spec: docs/formats.md)."""

from .packing import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LAYOUTS,
    Layout,
    PackedFormatError,
    PackedTensor,
    load_packed,
    pack,
    packed_row_bytes,
    padded_k,
    save_packed,
    unpack,
    validate_packed,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LAYOUTS",
    "Layout",
    "PackedFormatError",
    "PackedTensor",
    "load_packed",
    "pack",
    "packed_row_bytes",
    "padded_k",
    "save_packed",
    "unpack",
    "validate_packed",
]
