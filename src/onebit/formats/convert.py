"""``onebit convert``: any supported format to any other, checked after every conversion.

read (hf.read_hf | model_io.read_packed_folder | gguf_io.read_gguf) -> TernaryModel -> write ->
read the written output back with the reader of its own format -> logits on a few fixed token
sequences compared with the slow reference forward of the *source* (model_io.reference_logits).
The output is written to a temp path and moved into place only after the check passes, so a
failed conversion leaves nothing behind; the destination is checked before anything is read
(onebit.destination.check_destination: never the source, never files onebit did not write, an
earlier onebit output only with ``force``). Torch-free.
"""

from __future__ import annotations

import hashlib
import os
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


def _engine_logits(folder: Path):
    """ids -> logits of the engine on ``folder``, loaded once (a 128k-token tokenizer takes
    seconds to parse)."""
    from ..engine.api import load

    m = load(folder)

    def run(ids: np.ndarray) -> np.ndarray:
        m.runtime.reset(len(ids))
        return np.asarray(m.runtime.forward(ids, 0, last_only=False), np.float64)
    return run


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


# --embedding f16 / i8 / i4 changes the embedding (and tied LM head) values on purpose. The file is
# then checked exactly (EXACT) against the source with its embeddings stored that way, and the
# stored values against the source's within what the storage allows per element:
#   f16: round to nearest, |d| <= 2^-11 |e| (normal range) or 2^-25 (subnormal spacing / 2);
#   i8 / i4 rows (packed_model.quantize_rows_*): q = rint(e / s), s = max|row| / 127 or / 7,
#   so |d| <= s / 2 (times 1 + 2^-20 for the float32 arithmetic of e / s and q * s).
# What that costs in logits depends on the weights; it is measured and reported, not bounded.
def _stored_embeddings(tm: TernaryModel, to: str, embedding: str | None) -> dict:
    """name -> Dense as the writer of ``to`` will store it, for each embedding it changes."""
    from .model_io import Dense
    from .packed_model import quantize_rows_i4, quantize_rows_i8

    out = {}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        d = tm.dense.get(name)
        if d is None or embedding in (None, "auto", d.kind) or to == "hf":
            continue
        w = d.f32()
        if embedding == "f16":
            out[name] = Dense(w.astype(np.float16), "f16")
        elif embedding in ("i8", "i4") and to == "onebit":
            q, sc = (quantize_rows_i8 if embedding == "i8" else quantize_rows_i4)(w)
            out[name] = Dense(q, embedding, sc, w.shape[1])
        elif embedding == "f32" and to != "onebit":
            continue  # GGUF f32 from f16/i8/i4 holds the same values (write_packed_folder refuses)
    return out


def _storage_bound(src: np.ndarray, kind: str) -> np.ndarray:
    """Per-element bound on |stored - src| for storage ``kind`` (see the comment above)."""
    a = np.abs(src.astype(np.float64))
    if kind == "f16":
        return np.maximum(a * 2.0 ** -11, 2.0 ** -25)
    steps = {"i8": 127.0, "i4": 7.0}[kind]
    row = np.maximum(a.max(axis=1, keepdims=True), 1e-8) / steps
    return np.broadcast_to(row / 2 * (1 + 2.0 ** -20), a.shape)


def _check_storage(tm: TernaryModel, stored: dict, what: str) -> dict:
    worst_err, worst_ratio = 0.0, 0.0
    for name, d in stored.items():
        src = tm.dense[name].f32()
        got = d.f32()
        if not np.isfinite(got).all():
            raise ValueError(f"{what}: {name} does not fit {d.kind} (values up to "
                             f"{np.abs(src).max():.3g}); keep a wider --embedding")
        err = np.abs(got.astype(np.float64) - src)
        ratio = float((err / _storage_bound(src, d.kind)).max())
        if ratio > 1.0:
            raise ValueError(f"{what}: {name} stored as {d.kind} is off by up to {err.max():.3g}, "
                             f"{ratio:.2f}x what {d.kind} storage allows: the quantizer is wrong, "
                             f"nothing was written")
        worst_err, worst_ratio = max(worst_err, float(err.max())), max(worst_ratio, ratio)
    return {"max_abs_err": worst_err, "of_bound": worst_ratio}


def _measure(src: TernaryModel, stored_tm: TernaryModel) -> dict:
    """The logits cost of the embedding storage: reference of the stored vs the source."""
    cfg = src.config
    seqs = np.stack(probe_ids(cfg.vocab_size, cfg.bos_token_id))
    ref, got = reference_logits(src, seqs), reference_logits(stored_tm, seqs)
    span = max(np.abs(ref).max(), 1e-12)
    return {"max_rel_err": float(np.abs(ref - got).max() / span),
            "top1_agree": float((ref.argmax(-1) == got.argmax(-1)).mean())}


def _declared(tm: TernaryModel, fmt: str) -> dict[str, bytes]:
    """tm.files stating the source's BOS convention (tokenizer_convention.declare_files), so the
    written folder or file does not depend on where it came from."""
    if "tokenizer.json" not in tm.files:
        return tm.files
    from tokenizers import Tokenizer

    from ..jsonio import is_panic, loads_checked
    from ..tokenizer_convention import bos_convention, declare_files

    try:
        tok = Tokenizer.from_str(tm.files["tokenizer.json"].decode("utf-8"))
    except BaseException as e:  # a bare Exception, or a Rust panic (PanicException)
        if not (isinstance(e, Exception) or is_panic(e)):
            raise
        raise ValueError(f"{tm.source}: its tokenizer.json cannot be read ({str(e)[:200]})") from None
    tc = loads_checked(tm.files.get("tokenizer_config.json", b"{}"),
                       f"{tm.source}: tokenizer_config.json")
    conv = bos_convention(tok, tc if isinstance(tc, dict) else {}, onebit_folder=fmt == "onebit",
                          bos_id=tm.config.bos_token_id)
    return declare_files(tm.files, conv, tok)


def convert(src: str | Path, dst: str | Path, to: str, *, layout: str = "i2",
            embedding: str | None = None, verify: bool = True, allow_relu2: bool = False,
            scales: str = "tensor", force: bool = False) -> dict:
    """Convert model ``src`` (any readable format) to ``dst`` in format ``to`` (one of TARGETS).
    Returns a report {format, bytes, seconds, parity[, embedding], replaced}. Raises ValueError on
    unsupported input, a failed parity check (then nothing is written) or a destination that may
    not be written (DestinationError; ``force`` replaces an earlier onebit output, nothing else)."""
    from ..destination import check_destination
    from ..resolve import require_engine

    if to not in TARGETS:
        raise ValueError(f"--to {to!r} is unknown; use one of {list(TARGETS)}")
    t0 = time.perf_counter()
    fmt = {"packed": "onebit", "hf-ternary": "hf", "gguf": "gguf"}[require_engine(src, "convert").kind]
    replaced = check_destination(dst, "gguf" if to.startswith("gguf") else "model", [src],
                                 force=force)
    tm = read_model(src)
    tm.files = _declared(tm, fmt)
    report: dict = {"source": str(src), "format": to, "parity": None, "replaced": replaced}
    cache: dict = {}
    stored = _stored_embeddings(tm, to, embedding)
    ref_tm = tm  # what the written file must compute exactly: the source, embeddings as stored
    if stored:
        from dataclasses import replace
        ref_tm = replace(tm, dense={**tm.dense, **stored})
        if verify:
            what = f"{src} -> {to} --embedding {embedding}"
            report["embedding"] = {"type": embedding, "source_type": tm.dense[next(iter(stored))].kind,
                                   **_check_storage(tm, stored, what), "logits": _measure(tm, ref_tm)}

    if to == "onebit":
        def verify_fn(d: Path) -> None:
            if verify:
                report["parity"] = _check(ref_tm, _batched(read_packed_folder(d)), f"{src} -> onebit",
                                          EXACT, cache)
                report["engine"] = _check(ref_tm, _engine_logits(d),
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
                            scales, report, ref_tm)
    out = Path(out)
    report["bytes"] = sum(f.stat().st_size for f in out.iterdir()) if out.is_dir() else out.stat().st_size
    report["seconds"] = time.perf_counter() - t0
    report["output"] = str(out)
    return report


def _convert_gguf(tm: TernaryModel, src, dst: Path, qtype: str, embedding, verify, allow_relu2,
                  scales, report, ref_tm: TernaryModel | None = None) -> Path:
    from ..atomic import atomic_file
    from .gguf_io import read_gguf, write_gguf

    with atomic_file(dst) as tmp:
        write_gguf(tm, tmp, qtype, embedding=embedding, allow_relu2=allow_relu2, scales=scales)
        if verify:
            back = read_gguf(tmp)
            report["parity"] = _check(ref_tm or tm, _batched(back), f"{src} -> gguf-{qtype}", EXACT, {})
    return dst


# Bump when an import changes what it writes for the same source, so cached folders are redone
# (2: RoPE theta from transformers 5's rope_parameters; GGUF tokenizers; declared BOS).
IMPORT_VERSION = 2


def cached_import(path: str | Path) -> Path:
    """An onebit packed folder for ``path``: itself if it is one, else (HF folder / GGUF file)
    converted once (verified) into ``$ONEBIT_CACHE`` (default ~/.cache/onebit/converted) and
    reused while the source files are unchanged (key: paths, sizes, mtimes). The cache is onebit's
    own: an entry it wrote may be replaced (force), anything else there is refused."""
    p = Path(path)
    fmt = detect_format(p)
    if fmt == "onebit":
        return p
    files = sorted(p.iterdir()) if p.is_dir() else [p]
    h = hashlib.sha256(str(p.resolve()).encode())
    h.update(f"import-{IMPORT_VERSION}".encode())  # an import fixed since: converted again
    for f in files:
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    root = Path(os.environ.get("ONEBIT_CACHE", Path.home() / ".cache" / "onebit")) / "converted"
    out = root / f"{p.name}-{h.hexdigest()[:16]}"
    if (out / "config.json").is_file():
        return out
    convert(p, out, "onebit", force=True)
    return out
