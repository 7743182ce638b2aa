"""Data pipeline: plain-text corpus -> documents -> train/val split -> tokenizer -> token caches.

Cache layout (``cache_dir/<key>/``, ``key`` = sha256 of everything that determines the tokens):

    train.bin, val.bin   raw little-endian token ids, dtype ``meta["dtype"]`` (uint16 / uint32);
                         every document is ``[bos] + ids + [eos]`` (a missing special is skipped)
    meta.json            format version, key, dtype, token and document counts, special ids
    tokenizer.json       the tokenizer the ids belong to

A cache folder is written under a temporary name and ``os.replace``-d into place, so a folder named
``<key>`` is always complete.
"""

from __future__ import annotations

import bisect
import fnmatch
import hashlib
import json
import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

if TYPE_CHECKING:  # torch only for the batch helpers: reading and tokenizing text stay torch-free
    import torch

CACHE_FORMAT_VERSION = 2  # 2: a document's BOS follows the tokenizer's convention (document_bos)
BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
DOC_SEPARATOR = "<|endoftext|>"  # TinyStories convention: one file, many stories
MIN_BPE_VOCAB = 258  # 256 byte symbols + BOS + EOS
SINGLE_DOC_PIECES = 20  # a lone document is cut into this many pieces before splitting

_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK.*$",
                              re.IGNORECASE | re.MULTILINE)
_GUTENBERG_END = re.compile(r"^\*\*\*\s*END OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK",
                            re.IGNORECASE | re.MULTILINE)


class DataError(ValueError):
    """A corpus, tokenizer or data setting that cannot be used; the message names the input and fix."""


@dataclass(frozen=True)
class DataConfig:
    paths: tuple[str, ...] = ()  # files or folders of plain text
    tokenizer: str = "bpe:8192"  # "bpe:<vocab>" (train on the train split) or a tokenizer.json path
    val_fraction: float = 0.05
    seq_len: int = 256
    cache_dir: str = ".cache/onebit"
    exclude: tuple[str, ...] = ("SOURCE.txt", "README*", "LICENSE*")  # file names skipped in folders

    def __post_init__(self) -> None:
        # Accept a single path or a list (TOML arrays) and store tuples so the config stays hashable.
        for name in ("paths", "exclude"):
            v = getattr(self, name)
            if isinstance(v, (str, os.PathLike)):
                v = (v,)
            if not isinstance(v, (list, tuple)):
                raise DataError(f"DataConfig.{name} must be a list of strings, got {v!r}")
            object.__setattr__(self, name, tuple(os.fspath(p) for p in v))
        if not isinstance(self.val_fraction, (int, float)) or not 0.0 < self.val_fraction < 1.0:
            raise DataError(f"DataConfig.val_fraction={self.val_fraction!r} must be in (0, 1), "
                            f"e.g. 0.05 for 5% of the documents held out for validation")
        if not isinstance(self.seq_len, int) or isinstance(self.seq_len, bool) or self.seq_len < 2:
            raise DataError(f"DataConfig.seq_len={self.seq_len!r} must be an integer >= 2")
        if not isinstance(self.cache_dir, (str, os.PathLike)) or not os.fspath(self.cache_dir):
            raise DataError(f"DataConfig.cache_dir={self.cache_dir!r} must be a folder path")
        bpe_vocab_size(self.tokenizer)  # raises DataError naming the field when malformed

    def to_dict(self) -> dict[str, Any]:
        from onebit.config import to_dict
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], allow_unknown: bool = False) -> "DataConfig":
        from onebit.config import from_dict
        return from_dict(cls, d, allow_unknown=allow_unknown)


def bpe_vocab_size(spec: str) -> int | None:
    """The vocab size of a ``"bpe:<vocab>"`` spec, or None when ``spec`` names a tokenizer file.

    Raises DataError for an empty spec, a non-integer vocab or one below MIN_BPE_VOCAB."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"DataConfig.tokenizer={spec!r} is empty: use 'bpe:<vocab>' (e.g. 'bpe:8192') "
                        f"or a path to a tokenizer.json / a folder containing one")
    if not spec.startswith("bpe:"):
        return None
    try:
        vocab = int(spec[4:].replace("_", ""))
    except ValueError:
        raise DataError(f"DataConfig.tokenizer={spec!r}: the vocab size after 'bpe:' must be an "
                        f"integer, e.g. 'bpe:8192'") from None
    if vocab < MIN_BPE_VOCAB:
        raise DataError(f"DataConfig.tokenizer={spec!r}: a byte-level BPE needs vocab >= {MIN_BPE_VOCAB} "
                        f"(256 bytes + BOS + EOS); use e.g. 'bpe:8192'")
    return vocab


# ---------------------------------------------------------------------------------------------------
# Reading and splitting documents


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def strip_gutenberg(text: str) -> str:
    """Drop the Project Gutenberg header (through the ``*** START OF ...`` line) and footer (from the
    ``*** END OF ...`` line on); text without the markers is returned unchanged."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    return text


def _read_text(path: pathlib.Path, strict: bool = False) -> str:
    # utf-8-sig: UTF-8 that also drops a leading byte-order mark (common in Gutenberg files).
    data = path.read_bytes()
    if not strict:
        return data.decode("utf-8-sig", errors="replace").replace("\r\n", "\n")
    nul = data.find(b"\0")
    if nul >= 0:
        raise DataError(f"'{path}' is a binary file (a NUL byte at offset {nul}), not text: pass "
                        f"plain UTF-8 text files")
    try:
        return data.decode("utf-8-sig").replace("\r\n", "\n")
    except UnicodeDecodeError as e:
        at = e.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)  # offsets after the BOM
        raise DataError(f"'{path}' is not UTF-8 text (byte 0x{data[at]:02x} at offset {at} "
                        f"is invalid): convert it (iconv -t UTF-8) or pass a plain-text file") from None


def _file_documents(path: pathlib.Path, name: str, strict: bool = False) -> list[Document]:
    text = strip_gutenberg(_read_text(path, strict))
    if DOC_SEPARATOR not in text:
        text = text.strip()
        return [Document(name, text)] if text else []
    pieces = [p.strip() for p in text.split(DOC_SEPARATOR)]
    return [Document(f"{name}#{i}", p) for i, p in enumerate(p for p in pieces if p)]


def _list_folder(folder: pathlib.Path, exclude: Sequence[str]) -> list[tuple[pathlib.Path, str]]:
    found = []
    for p in folder.rglob("*.txt"):
        if p.is_file() and not any(fnmatch.fnmatch(p.name, pat) for pat in exclude):
            found.append((p, p.relative_to(folder).as_posix()))
    return sorted(found, key=lambda t: t[1])


def read_documents(paths: str | os.PathLike | Iterable[str | os.PathLike],
                   exclude: Sequence[str] = DataConfig.exclude, strict: bool = False) -> list[Document]:
    """Documents of ``paths`` in order: a file is one document (or one per ``<|endoftext|>`` piece,
    named ``file.txt#i``); a folder gives every ``*.txt`` under it, recursively, sorted by relative
    path (the document name), skipping file names matching an ``exclude`` pattern.

    Gutenberg headers/footers and surrounding whitespace are stripped; empty documents are skipped.
    Bytes that are not UTF-8 become U+FFFD, unless ``strict``: then a file with NUL bytes or
    invalid UTF-8 raises DataError naming it.
    Raises DataError for a missing path, a folder without text files, or no text at all."""
    paths = _as_paths(paths)
    docs = list(iter_documents(paths, exclude, strict))
    if not docs:
        raise DataError(f"corpus paths {[str(p) for p in paths]} contain no text: expected "
                        f"UTF-8 plain text (Gutenberg header/footer and whitespace-only files are "
                        f"dropped)")
    return docs


def _as_paths(paths) -> list[pathlib.Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    return [pathlib.Path(p) for p in paths]


def iter_documents(paths: str | os.PathLike | Iterable[str | os.PathLike],
                   exclude: Sequence[str] = DataConfig.exclude, strict: bool = False
                   ) -> Iterator[Document]:
    """``read_documents`` one file at a time (a consumer that stops early reads no further file);
    yields nothing for paths without text. Every path is checked to exist before the first read."""
    paths = _as_paths(paths)
    if not paths:
        raise DataError("no corpus paths given: set DataConfig.paths to files or folders of plain text")
    for path in paths:
        if not path.exists():
            raise DataError(f"corpus path '{path}' does not exist; fix DataConfig.paths (files or "
                            f"folders of plain-text .txt files)")
    for path in paths:
        if path.is_dir():
            files = _list_folder(path, exclude)
            if not files:
                raise DataError(f"corpus folder '{path}' holds no *.txt files (searched recursively, "
                                f"skipping {list(exclude)}); put plain-text .txt files in it or "
                                f"point DataConfig.paths at the files")
        else:
            files = [(path, path.name)]
        for file, name in files:
            yield from _file_documents(file, name, strict)


ENCODE_MARGIN = 1024  # characters before a cut whose tokens may still change with the text after it


def _encode_start(tok: Tokenizer, text: str, need: int) -> list[int]:
    """The first ``need`` (or more) token ids of ``tok.encode(text)`` without encoding all of a long
    ``text``: encode a prefix, keep the tokens that end ``ENCODE_MARGIN`` characters before its cut
    (the pre-tokenizers split text into words and runs far shorter than that, so those tokens are
    the whole text's), and double the prefix until enough are kept."""
    n_chars = 8 * need + 4 * ENCODE_MARGIN
    while n_chars < len(text):
        enc = tok.encode(text[:n_chars], add_special_tokens=False)
        ends = [b for _, b in enc.offsets]
        keep = bisect.bisect_right(ends, n_chars - ENCODE_MARGIN)
        while keep and ends[keep - 1] > n_chars - ENCODE_MARGIN:  # offsets may repeat (byte tokens)
            keep -= 1
        if keep >= need:
            return enc.ids[:keep]
        n_chars *= 2
    return tok.encode(text, add_special_tokens=False).ids


def corpus_tokens(paths: str | os.PathLike | Iterable[str | os.PathLike], tok: Tokenizer,
                  bos_id: int | None, eos_id: int | None, max_tokens: int | None = None,
                  strict: bool = True, exclude: Sequence[str] = DataConfig.exclude) -> np.ndarray:
    """int64 ids of the documents of ``paths`` (``iter_documents``), each ``[bos] + ids + [eos]``
    (a None special is skipped), for evaluation. With ``max_tokens`` it stops reading files and
    tokenizing text once it has that many: the result is the first ``max_tokens`` ids of the
    whole corpus's. ``strict`` (default) refuses binary / non-UTF-8 files naming them.
    Raises DataError for missing paths or no text."""
    if max_tokens is not None and max_tokens < 1:
        raise DataError(f"max_tokens={max_tokens} must be >= 1 (or None for the whole corpus)")
    head = [] if bos_id is None else [bos_id]
    tail = [] if eos_id is None else [eos_id]
    paths = _as_paths(paths)
    ids: list[int] = []
    found = False
    for doc in iter_documents(paths, exclude, strict):
        found = True
        if max_tokens is None:
            ids += head + tok.encode(doc.text, add_special_tokens=False).ids + tail
            continue
        need = max_tokens - len(ids) - len(head)
        ids += head + _encode_start(tok, doc.text, max(need, 1)) + tail
        if len(ids) >= max_tokens:
            ids = ids[:max_tokens]
            break
    if not found:
        raise DataError(f"{[str(p) for p in paths]} contain no text: expected UTF-8 plain "
                        f"text (Gutenberg header/footer and whitespace-only files are dropped)")
    return np.asarray(ids, dtype=np.int64)


def _sha256(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8", errors="surrogatepass")).hexdigest()


def _cut_document(doc: Document, pieces: int) -> list[Document]:
    """``doc`` cut at line boundaries into at most ``pieces`` contiguous parts of similar length."""
    lines = doc.text.splitlines(keepends=True)
    ends = np.cumsum([len(line) for line in lines]).tolist()  # char offset after each line
    total = ends[-1]
    cuts = sorted({ends[min(bisect.bisect_left(ends, k * total / pieces), len(ends) - 1)]
                   for k in range(1, pieces)} | {0, total})
    parts = [doc.text[a:b] for a, b in zip(cuts, cuts[1:])]
    return [Document(f"{doc.name}@{k}", p) for k, p in enumerate(parts) if p.strip()]


def split_documents(docs: Sequence[Document], val_fraction: float
                    ) -> tuple[list[Document], list[Document]]:
    """(train, val) by whole documents: rank by sha256(name) (ties by content), the first
    ``max(1, round(val_fraction * n))`` are validation. Independent of input order. A single
    document is first cut into SINGLE_DOC_PIECES pieces at line boundaries (named ``name@k``).

    Raises DataError when no training document would be left."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction!r} must be in (0, 1)")
    docs = list(docs)
    if not docs:
        raise DataError("no documents to split: the corpus is empty")
    if len(docs) == 1:
        docs = _cut_document(docs[0], SINGLE_DOC_PIECES)
    ranked = sorted(docs, key=lambda d: (_sha256(d.name), d.name, _sha256(d.text)))
    n_val = max(1, round(val_fraction * len(ranked)))
    if n_val >= len(ranked):
        raise DataError(f"val_fraction={val_fraction} puts all {len(ranked)} document(s) in validation "
                        f"and leaves none for training: add documents (or lines, for a single one) "
                        f"or lower val_fraction")
    return ranked[n_val:], ranked[:n_val]


# ---------------------------------------------------------------------------------------------------
# Tokenizers


def train_tokenizer(texts: Iterable[str], vocab_size: int, show_progress: bool = False) -> Tokenizer:
    """A byte-level BPE of (at most) ``vocab_size`` tokens trained on ``texts``; BOS_TOKEN is id 0 and
    EOS_TOKEN id 1. Deterministic for the same texts; ``decode(encode(s).ids) == s``.
    ``show_progress``: the tokenizers library's progress bars on stderr."""
    if vocab_size < MIN_BPE_VOCAB:
        raise DataError(f"BPE vocab_size={vocab_size} must be >= {MIN_BPE_VOCAB} (256 bytes + BOS + EOS)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS_TOKEN, EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=show_progress)
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.token_to_id(BOS_TOKEN) == 0 and tok.token_to_id(EOS_TOKEN) == 1
    return tok


def _tokenizer_file(path: str | os.PathLike) -> pathlib.Path:
    p = pathlib.Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise DataError(f"tokenizer '{path}' not found: give a tokenizer.json file, a folder holding "
                        f"one, or 'bpe:<vocab>' to train a byte-level BPE on the corpus")
    return p


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` from a tokenizer.json file or a folder containing one.

    Raises DataError when the file is missing or cannot be parsed."""
    p = _tokenizer_file(path)
    try:
        return Tokenizer.from_str(p.read_text(encoding="utf-8"))
    except Exception as e:  # tokenizers raises a bare Exception for any unparsable file
        raise DataError(f"tokenizer file '{p}' is not a valid tokenizer.json ({e}); re-download it or "
                        f"use 'bpe:<vocab>' to train one") from None


def special_ids(tok: Tokenizer) -> tuple[int | None, int | None]:
    """(bos_id, eos_id): BOS_TOKEN/EOS_TOKEN, else ``<s>``/``</s>``, else ``<|endoftext|>`` (GPT-2 uses
    it for both); None when the tokenizer has none."""
    def first(*names: str) -> int | None:
        for n in names:
            i = tok.token_to_id(n)
            if i is not None:
                return i
        return None
    return first(BOS_TOKEN, "<s>", DOC_SEPARATOR), first(EOS_TOKEN, "</s>", DOC_SEPARATOR)


def _tokenizer_config_of(spec: str) -> dict:
    """tokenizer_config.json beside a tokenizer.json spec (the Hugging Face layout), or {}."""
    if bpe_vocab_size(spec) is not None:
        return {}
    from .tokenizer_convention import read_tokenizer_config
    try:
        return read_tokenizer_config(_tokenizer_file(spec).parent)
    except ValueError as e:
        raise DataError(str(e)) from None


def document_bos(tok: Tokenizer, tokenizer_config: dict | None = None) -> int | None:
    """The BOS put before every document: the tokenizer's own convention when it states one
    (tokenizer_config.json add_bos_token, or its post-processor: Llama-3 and Llama-2 add BOS,
    GPT-2 and Qwen2 add nothing; tokenizer_convention.py), else ``special_ids``' BOS (onebit's
    ``bpe:N`` tokenizers and others that state nothing)."""
    from .tokenizer_convention import bos_convention, post_processor_prefix

    tc = tokenizer_config or {}
    if isinstance(tc.get("add_bos_token"), bool) or post_processor_prefix(tok) is not None:
        try:
            return bos_convention(tok, tc, bos_id=special_ids(tok)[0]).bos_id
        except ValueError as e:
            raise DataError(f"tokenizer_config.json: {e}") from None
    return special_ids(tok)[0]


# ---------------------------------------------------------------------------------------------------
# Token caches


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train: np.ndarray  # [n_train] read-only memmap, uint16 (vocab <= 65536) or uint32
    val: np.ndarray  # [n_val]
    bos_id: int | None
    eos_id: int | None
    cache_path: pathlib.Path  # folder with train.bin, val.bin, meta.json, tokenizer.json
    vocab_size: int  # tokenizer.get_vocab_size()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def cache_key(cfg: DataConfig, docs: Sequence[Document]) -> str:
    """sha256 over everything that determines the cached tokens (not seq_len: caches are shared)."""
    tok_sha = None
    if bpe_vocab_size(cfg.tokenizer) is None:
        tok_sha = hashlib.sha256(_tokenizer_file(cfg.tokenizer).read_bytes()).hexdigest()
        tok_sha += json.dumps(_tokenizer_config_of(cfg.tokenizer).get("add_bos_token"))
    blob = {"format_version": CACHE_FORMAT_VERSION, "tokenizers_version": tokenizers.__version__,
            "tokenizer": cfg.tokenizer, "tokenizer_sha256": tok_sha, "val_fraction": cfg.val_fraction,
            "exclude": list(cfg.exclude), "documents": [[d.name, _sha256(d.text)] for d in docs]}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def encode_documents(tok: Tokenizer, docs: Sequence[Document], bos_id: int | None, eos_id: int | None,
                     dtype: np.dtype, out, batch_chars: int = 1 << 23,
                     progress: Callable[[int, int], None] | None = None) -> int:
    """Write ``[bos] + ids + [eos]`` for every document to the binary file ``out``; returns the token
    count. Documents are encoded in batches of about ``batch_chars`` characters to bound memory;
    ``progress(documents done, documents)`` is called after each batch."""
    head = np.array([] if bos_id is None else [bos_id], dtype=dtype)
    tail = np.array([] if eos_id is None else [eos_id], dtype=dtype)
    n = 0
    i = 0
    while i < len(docs):
        j, chars = i, 0
        while j < len(docs) and (j == i or chars + len(docs[j].text) <= batch_chars):
            chars += len(docs[j].text)
            j += 1
        encs = tok.encode_batch([d.text for d in docs[i:j]], add_special_tokens=False)
        for enc in encs:
            arr = np.concatenate([head, np.asarray(enc.ids, dtype=dtype), tail])
            out.write(arr.tobytes())
            n += len(arr)
        i = j
        if progress is not None:
            progress(i, len(docs))
    return n


def _write_cache(folder: pathlib.Path, key: str, cfg: DataConfig, docs: Sequence[Document],
                 log: Callable[[str], None] | None = None) -> None:
    """Split, get the tokenizer, encode and write the full cache into ``folder`` (a fresh temp dir)."""
    import sys
    import time

    say = log or (lambda msg: None)
    train_docs, val_docs = split_documents(docs, cfg.val_fraction)
    vocab = bpe_vocab_size(cfg.tokenizer)
    t0 = time.perf_counter()
    if vocab is not None:
        mb = sum(len(d.text) for d in train_docs) / 1e6
        say(f"training a byte-level BPE tokenizer ({vocab:,} tokens) on the {len(train_docs)} "
            f"training documents ({mb:,.1f}M characters); once, then cached")
        tok = train_tokenizer((d.text for d in train_docs), vocab,
                              show_progress=log is not None and sys.stderr.isatty())
        say(f"tokenizer trained in {time.perf_counter() - t0:.1f} s")
    else:
        tok = load_tokenizer(cfg.tokenizer)
    say(f"tokenizing {len(train_docs)} training and {len(val_docs)} validation documents")
    bos_id, eos_id = document_bos(tok, _tokenizer_config_of(cfg.tokenizer)), special_ids(tok)[1]
    dtype = token_dtype(tok.get_vocab_size())
    counts = {}
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        with open(folder / f"{split}.bin", "wb") as f:
            counts[split] = encode_documents(
                tok, split_docs, bos_id, eos_id, dtype, f,
                progress=lambda i, n, split=split: say(f"tokenized {i}/{n} {split} documents"))
    tok.save(str(folder / "tokenizer.json"))
    meta = {"format_version": CACHE_FORMAT_VERSION, "key": key, "tokenizer": cfg.tokenizer,
            "vocab_size": tok.get_vocab_size(), "dtype": dtype.name, "bos_id": bos_id,
            "eos_id": eos_id, "train_tokens": counts["train"], "val_tokens": counts["val"],
            "train_documents": len(train_docs), "val_documents": len(val_docs),
            "val_names": [d.name for d in val_docs]}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    say(f"token cache written: {counts['train']:,} training and {counts['val']:,} validation tokens "
        f"({time.perf_counter() - t0:.1f} s)")


def _read_meta(folder: pathlib.Path, key: str) -> dict[str, Any] | None:
    """The cache's meta.json when it is complete and matches ``key``, else None."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("format_version") != CACHE_FORMAT_VERSION or meta.get("key") != key:
        return None
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val"):
        f = folder / f"{split}.bin"
        if not f.is_file() or f.stat().st_size != meta[f"{split}_tokens"] * itemsize:
            return None
    return meta if (folder / "tokenizer.json").is_file() else None


def _install(tmp: pathlib.Path, final: pathlib.Path, key: str) -> None:
    """Move the finished ``tmp`` folder to ``final``, replacing a stale cache there; if another process
    installed a valid cache first, keep theirs."""
    if final.exists() and _read_meta(final, key) is None:
        stale = final.with_name(f".stale-{final.name}-{os.getpid()}")
        os.replace(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(tmp, final)
    except OSError:
        if _read_meta(final, key) is None:
            raise


def prepare_data(cfg: DataConfig, log: Callable[[str], None] | None = None) -> PreparedData:
    """Read, split, tokenize and cache the corpus of ``cfg`` (see the module docstring for the layout);
    a cache with the same key is reused without re-tokenizing. ``log(message)`` hears what it is
    doing (reading, training the tokenizer, tokenizing, or reusing the cache).

    Raises DataError for unusable corpora/tokenizers and when a split has fewer than seq_len + 1
    tokens."""
    say = log or (lambda msg: None)
    say(f"reading the corpus {list(cfg.paths)}")
    docs = read_documents(cfg.paths, cfg.exclude)
    key = cache_key(cfg, docs)
    root = pathlib.Path(cfg.cache_dir)
    final = root / key
    meta = _read_meta(final, key)
    if meta is not None:
        say(f"{len(docs)} documents; reusing the token cache {final}")
    if meta is None:
        say(f"{len(docs)} documents; no token cache for them yet in {root}")
        root.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp-{key[:12]}-", dir=root))
        try:
            _write_cache(tmp, key, cfg, docs, log)
            _install(tmp, final, key)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful install
        meta = _read_meta(final, key)
        assert meta is not None, f"cache {final} unreadable right after writing it"
    tok = Tokenizer.from_file(str(final / "tokenizer.json"))
    dtype = np.dtype(meta["dtype"])
    arrays = {}
    for split in ("val", "train"):
        n = meta[f"{split}_tokens"]
        if n < cfg.seq_len + 1:
            fix = ("raise val_fraction or lower seq_len" if split == "val"
                   else "add more text or lower seq_len")
            raise DataError(f"the {split} split of {list(cfg.paths)} has {n} tokens, fewer than "
                            f"seq_len + 1 = {cfg.seq_len + 1}: {fix}")
        arrays[split] = np.memmap(final / f"{split}.bin", dtype=dtype, mode="r", shape=(n,))
    return PreparedData(tokenizer=tok, train=arrays["train"], val=arrays["val"], bos_id=meta["bos_id"],
                        eos_id=meta["eos_id"], cache_path=final, vocab_size=meta["vocab_size"])


# ---------------------------------------------------------------------------------------------------
# Batches


def _check_length(tokens: np.ndarray, seq_len: int) -> None:
    if len(tokens) < seq_len + 1:
        raise DataError(f"{len(tokens)} tokens are too few for seq_len={seq_len} (need seq_len + 1): "
                        f"add text or lower seq_len")


def sample_batch(tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, step: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows, a pure function of (seed, step): x, y int64 [batch_size, seq_len], y = x shifted
    by one token. Offsets are uniform in [0, len(tokens) - seq_len - 1]."""
    import torch

    _check_length(tokens, seq_len)
    rng = np.random.default_rng([seed, step])
    offsets = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size, endpoint=True)
    idx = offsets[:, None] + np.arange(seq_len + 1)  # [B, T+1]
    win = np.asarray(tokens[idx], dtype=np.int64)  # [B, T+1]
    return torch.from_numpy(win[:, :-1].copy()), torch.from_numpy(win[:, 1:].copy())


def eval_windows(tokens: np.ndarray, seq_len: int, max_tokens: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """All non-overlapping windows from the start, at most ``max(1, max_tokens // seq_len)`` of them:
    x, y int64 [n, seq_len], y = x shifted by one token."""
    import torch

    _check_length(tokens, seq_len)
    n = (len(tokens) - 1) // seq_len
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // seq_len))
    x = np.asarray(tokens[:n * seq_len], dtype=np.int64).reshape(n, seq_len)
    y = np.asarray(tokens[1:n * seq_len + 1], dtype=np.int64).reshape(n, seq_len)
    return torch.from_numpy(x), torch.from_numpy(y)
