"""``onebit convert``: any supported format to any other, checked after every conversion.

read (hf.read_hf | model_io.read_packed_folder | gguf_io.read_gguf) -> TernaryModel -> write ->
read the written output back with the reader of its own format -> logits on a few fixed token
sequences compared with the slow reference forward of the *source* (model_io.reference_logits).
The output is written to a temp path and moved into place only after the check passes, so a
failed conversion leaves nothing behind. Torch-free.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from .model_io import TernaryModel, compare_logits, read_packed_folder, reference_logits

__all__ = ["TARGETS", "cached_import", "convert", "detect_format", "read_model"]

TARGETS = ("onebit", "hf", "gguf-tq2_0", "gguf-tq1_0", "gguf-i2_s")


def detect_format(path: str | Path) -> str:
    """"onebit" (packed folder), "hf" (transformers folder), "gguf" (file), or ValueError."""
    from .hf import is_hf_folder

    p = Path(path)
    if p.is_file():
        with open(p, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        raise ValueError(f"'{p}' is a file but not GGUF; pass a model folder or a .gguf file")
    if not p.is_dir():
        raise ValueError(f"'{p}' does not exist")
    cfg = p / "config.json"
    if cfg.is_file():
        from ..jsonio import read_json

        raw = read_json(cfg)
        if isinstance(raw, dict) and "packed" in raw:
            return "onebit"
        if is_hf_folder(p):
            return "hf"
        if isinstance(raw, dict) and "model" in raw:
            raise ValueError(f"'{p}' is an onebit training folder; pack it first with "
                             f"`onebit export {p} OUT`")
    raise ValueError(f"'{p}' is not a model onebit knows: expected an onebit packed folder, a "
                     f"Hugging Face checkpoint folder (config.json + safetensors) or a GGUF file")


def read_model(path: str | Path) -> TernaryModel:
    fmt = detect_format(path)
    if fmt == "onebit":
        return read_packed_folder(path)
    if fmt == "hf":
        from .hf import read_hf
        return read_hf(path)
    from .gguf_io import read_gguf
    return read_gguf(path)


def probe_ids(vocab: int, bos: int, n_seq: int = 3, length: int = 8) -> list[np.ndarray]:
    """Fixed token sequences for the parity check (BOS + pseudo-random ids, seeded)."""
    rng = np.random.default_rng(1234)
    return [np.concatenate([[bos], rng.integers(0, vocab, length - 1)]).astype(np.int64)
            for _ in range(n_seq)]


def _engine_logits(folder: Path, ids: np.ndarray) -> np.ndarray:
    from ..engine.api import load

    m = load(folder)
    m.runtime.reset(len(ids))
    return np.asarray(m.runtime.forward(ids, 0, last_only=False), np.float64)


def _batched(tm: TernaryModel):
    """out_logits for _check from a reference forward of ``tm``, computed once for all probes."""
    cfg = tm.config
    seqs = probe_ids(cfg.vocab_size, cfg.bos_token_id, length=min(8, cfg.max_position_embeddings))
    refs = reference_logits(tm, np.stack(seqs))
    table = {s.tobytes(): r for s, r in zip(seqs, refs)}
    return lambda ids: table[np.asarray(ids, np.int64).tobytes()]


# Written file read back by its own reader, same float64 reference: the same numbers give the
# same logits, so anything above float noise is a conversion error.
EXACT = 1e-6
# The float32 engine vs the float64 reference: int8 rounding flips between the two grow with depth
# (measured on random models: ~3% of the logit range at 2 layers, ~5% at 30), so this only checks
# that the engine runs the file (a wrong layout gives O(1) errors and wrong top-1 tokens).
ENGINE = 0.25


def _check(src: TernaryModel, out_logits, what: str, rtol: float, cache: dict) -> dict:
    cfg = src.config
    if "refs" not in cache:  # one pass over the source's weights for all probes and checks
        cache["seqs"] = probe_ids(cfg.vocab_size, cfg.bos_token_id,
                                  length=min(8, cfg.max_position_embeddings))  # fits the context
        cache["refs"] = reference_logits(src, np.stack(cache["seqs"]))
    worst = {"max_rel_err": 0.0, "top1_agree": 1.0, "positions": 0, "decisive": 0}
    for ids, ref in zip(cache["seqs"], cache["refs"]):
        r = compare_logits(ref, out_logits(ids), what, rtol=rtol)
        worst = {"max_rel_err": max(worst["max_rel_err"], r["max_rel_err"]),
                 "top1_agree": min(worst["top1_agree"], r["top1_agree"]),
                 "positions": worst["positions"] + r["positions"],
                 "decisive": worst["decisive"] + r["decisive"]}
    return worst


def convert(src: str | Path, dst: str | Path, to: str, *, layout: str = "i2",
            embedding: str | None = None, verify: bool = True, allow_relu2: bool = False,
            scales: str = "tensor") -> dict:
    """Convert model ``src`` (any readable format) to ``dst`` in format ``to`` (one of TARGETS).
    Returns a report {format, bytes, seconds, parity}. Raises ValueError on unsupported input
    or a failed parity check (then nothing is written)."""
    if to not in TARGETS:
        raise ValueError(f"--to {to!r} is unknown; use one of {list(TARGETS)}")
    t0 = time.perf_counter()
    tm = read_model(src)
    report: dict = {"source": str(src), "format": to, "parity": None}
    cache: dict = {}

    if to == "onebit":
        def verify_fn(d: Path) -> None:
            if verify:
                report["parity"] = _check(tm, _batched(read_packed_folder(d)), f"{src} -> onebit",
                                          EXACT, cache)
                report["engine"] = _check(tm, lambda ids: _engine_logits(d, ids),
                                          f"{src} -> onebit, on the engine", ENGINE, cache)
        from .model_io import write_packed_folder
        out = write_packed_folder(tm, dst, layout=layout, embedding=embedding, verify=verify_fn)
    elif to == "hf":
        from .hf import read_hf, write_hf

        def verify_fn(d: Path) -> None:
            if verify:
                back = read_hf(d)  # our reader of the written bytes; tests check transformers too
                report["parity"] = _check(tm, _batched(back), f"{src} -> hf", EXACT, cache)
        out = write_hf(tm, dst, verify=verify_fn)
    else:
        out = _convert_gguf(tm, src, Path(dst), to.split("-", 1)[1], embedding, verify, allow_relu2,
                            scales, report)
    out = Path(out)
    report["bytes"] = sum(f.stat().st_size for f in out.iterdir()) if out.is_dir() else out.stat().st_size
    report["seconds"] = time.perf_counter() - t0
    report["output"] = str(out)
    return report


def _convert_gguf(tm: TernaryModel, src, dst: Path, qtype: str, embedding, verify, allow_relu2,
                  scales, report) -> Path:
    from .gguf_io import read_gguf, write_gguf

    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        write_gguf(tm, tmp, qtype, embedding=embedding, allow_relu2=allow_relu2, scales=scales)
        if verify:
            back = read_gguf(tmp)
            report["parity"] = _check(tm, _batched(back), f"{src} -> gguf-{qtype}", EXACT, {})
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dst


def cached_import(path: str | Path) -> Path:
    """An onebit packed folder for ``path``: itself if it is one, else (HF folder / GGUF file)
    converted once (verified) into ``$ONEBIT_CACHE`` (default ~/.cache/onebit/converted) and
    reused while the source files are unchanged (key: paths, sizes, mtimes)."""
    p = Path(path)
    fmt = detect_format(p)
    if fmt == "onebit":
        return p
    files = sorted(p.iterdir()) if p.is_dir() else [p]
    h = hashlib.sha256(str(p.resolve()).encode())
    for f in files:
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    root = Path(os.environ.get("ONEBIT_CACHE", Path.home() / ".cache" / "onebit")) / "converted"
    out = root / f"{p.name}-{h.hexdigest()[:16]}"
    if (out / "config.json").is_file():
        return out
    convert(p, out, "onebit")
    return out
