"""Which token ids start a prompt: the tokenizer's own BOS convention, read as transformers and
llama.cpp read it, and written down explicitly whenever onebit writes a tokenizer. Torch-free.

The rule (``bos_convention``), first match wins:

1. ``tokenizer_config.json`` ``add_bos_token`` (bool): Llama-2 style, what llama.cpp's converter
   (gguf-py ``SpecialVocab``) copies into ``tokenizer.ggml.add_bos_token``. onebit writes it
   wherever it writes a tokenizer (train, export, convert).
2. an onebit model folder without it (packed, run or checkpoint written before onebit stated the
   convention, e.g. the built-in model): onebit's training convention. ``data.py`` wrote
   ``[bos] + ids + [eos]`` for every document with the tokenizer's BOS, whatever the tokenizer.
3. the ``tokenizer.json`` post-processor: the special tokens it puts before the text (Llama-3's
   ``TemplateProcessing`` adds ``<|begin_of_text|>``; GPT-2's and Qwen2's add nothing). This is
   what ``transformers``' ``tok(text)`` does.
4. otherwise nothing is added.

``encode_prompt`` adds that prefix to ``tokenizer.encode(text, add_special_tokens=False)`` unless
the text already starts with it (a chat template that renders ``{{ bos_token }}``): never a double
BOS. Suffixes a post-processor may add (EOS) are not added to prompts.

``declare_bos`` / ``declare_files`` write the convention into a tokenizer (post-processor) and
``tokenizer_config.json`` (``add_bos_token``) so transformers, llama.cpp and onebit agree on the
files alone.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BosConvention", "bos_convention", "declare_bos", "declare_files", "encode_prompt",
           "folder_convention", "post_processor_prefix", "read_tokenizer_config"]

_PROBE = "a"  # any text: the post-processor's prefix is what encode(add_special_tokens=True) adds


@dataclass(frozen=True)
class BosConvention:
    """``prefix``: ids put before every prompt (() or (bos_id,)); ``source``: why, for messages."""
    prefix: tuple[int, ...]
    source: str

    @property
    def add_bos(self) -> bool:
        return bool(self.prefix)

    @property
    def bos_id(self) -> int | None:
        return self.prefix[0] if self.prefix else None


def read_tokenizer_config(folder: str | Path) -> dict:
    """``folder/tokenizer_config.json`` as a dict ({} when absent); ValueError naming the file."""
    p = Path(folder) / "tokenizer_config.json"
    if not p.is_file():
        return {}
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"'{p}' is not valid JSON ({e}); fix or remove it") from None
    return cfg if isinstance(cfg, dict) else {}


def post_processor_prefix(tokenizer) -> tuple[int, ...] | None:
    """The ids the tokenizer's post-processor puts before the text; None without a post-processor."""
    if tokenizer.post_processor is None:
        return None
    bare = tokenizer.encode(_PROBE, add_special_tokens=False).ids
    full = tokenizer.encode(_PROBE, add_special_tokens=True).ids
    for k in range(len(full) - len(bare) + 1):
        if full[k:k + len(bare)] == bare:
            return tuple(full[:k])
    return ()  # a post-processor that rewrites the text itself: add nothing of our own


def _token_id(tokenizer, token) -> int | None:
    if isinstance(token, dict):  # {"content": "<s>", ...} (AddedToken serialized)
        token = token.get("content")
    return tokenizer.token_to_id(token) if isinstance(token, str) else None


def bos_convention(tokenizer, tokenizer_config: Mapping | None = None, *, onebit_folder: bool = False,
                   bos_id: int | None = None) -> BosConvention:
    """The BOS convention of ``tokenizer`` (a ``tokenizers.Tokenizer``) with its
    ``tokenizer_config`` (see the module doc for the order). ``bos_id``: the model config's BOS,
    used when the tokenizer files name none; ``onebit_folder``: the folder is an onebit model
    (packed, run or checkpoint), whose trainer put BOS before every document unless its
    tokenizer_config.json says otherwise."""
    tc = tokenizer_config or {}
    pp = post_processor_prefix(tokenizer)
    add = tc.get("add_bos_token")
    if isinstance(add, bool):
        if not add:
            return BosConvention((), "tokenizer_config.json add_bos_token=false")
        tid = _token_id(tokenizer, tc.get("bos_token"))
        tid = tid if tid is not None else (pp[0] if pp else bos_id)
        if tid is None:
            raise ValueError("tokenizer_config.json sets add_bos_token=true but names no bos_token "
                             "the tokenizer knows: set bos_token")
        return BosConvention((tid,), "tokenizer_config.json add_bos_token=true")
    if onebit_folder and bos_id is not None:
        return BosConvention((bos_id,), "onebit's training convention (BOS before every document)")
    if pp is not None:
        return BosConvention(pp, "the tokenizer.json post-processor")
    return BosConvention((), "the tokenizer adds no special tokens")


def folder_convention(folder: str | Path, tokenizer, bos_id: int | None) -> BosConvention:
    """``bos_convention`` for a model folder: its tokenizer_config.json, and whether its
    config.json is onebit's (a ``model`` table: packed, run and checkpoint folders)."""
    folder = Path(folder)
    onebit = False
    cfg = folder / "config.json"
    if cfg.is_file():
        try:
            raw = json.loads(cfg.read_text(encoding="utf-8"))
            onebit = isinstance(raw, dict) and isinstance(raw.get("model"), dict)
        except (UnicodeDecodeError, json.JSONDecodeError):
            onebit = False  # the loader of the weights reports a broken config.json
    try:
        return bos_convention(tokenizer, read_tokenizer_config(folder), onebit_folder=onebit,
                              bos_id=bos_id)
    except ValueError as e:
        raise ValueError(f"'{folder}': {e}") from None


def encode_prompt(tokenizer, text: str, convention: BosConvention) -> list[int]:
    """``text``'s ids with the convention's prefix, unless the text already starts with it."""
    ids = list(tokenizer.encode(text, add_special_tokens=False).ids)
    pre = list(convention.prefix)
    if pre and ids[:len(pre)] != pre:
        ids = pre + ids
    return ids


def declare_bos(tokenizer, prefix: tuple[int, ...] | list[int]):
    """Make ``tokenizer``'s post-processor put exactly ``prefix`` (() or (bos_id,)) before the
    text, as a ``TemplateProcessing``; returns the tokenizer (changed in place only if needed)."""
    from tokenizers import processors

    prefix = tuple(int(t) for t in prefix)
    if post_processor_prefix(tokenizer) == prefix:
        return tokenizer
    if len(prefix) > 1:
        raise ValueError(f"a BOS prefix is one token, got {list(prefix)}")
    if prefix:
        bos = tokenizer.id_to_token(prefix[0])
        if bos is None:
            raise ValueError(f"BOS id {prefix[0]} is not in the tokenizer's vocabulary")
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, prefix[0])])
    else:
        tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1")
    return tokenizer


def declare_files(files: dict[str, bytes], convention: BosConvention, tokenizer=None) -> dict[str, bytes]:
    """Tokenizer files (name -> bytes, as TernaryModel.files) that state ``convention`` on their
    own: tokenizer.json's post-processor and tokenizer_config.json's ``add_bos_token`` (+
    ``bos_token``). Files already stating it are returned unchanged (no rewrite). ``tokenizer``:
    tokenizer.json already parsed (it is not modified)."""
    if "tokenizer.json" not in files:
        return files
    from tokenizers import Tokenizer

    out = dict(files)
    tok = tokenizer if tokenizer is not None else Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
    if post_processor_prefix(tok) != convention.prefix:
        if tokenizer is not None:  # declare_bos changes its argument: work on a copy
            tok = Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
        out["tokenizer.json"] = declare_bos(tok, convention.prefix).to_str().encode("utf-8")
    tc = json.loads(files["tokenizer_config.json"]) if "tokenizer_config.json" in files else {}
    if not isinstance(tc, dict):
        tc = {}
    want = dict(tc, add_bos_token=convention.add_bos)
    if convention.add_bos and _token_id(tok, tc.get("bos_token")) != convention.bos_id:
        want["bos_token"] = tok.id_to_token(convention.bos_id)
    if want != tc or "tokenizer_config.json" not in files:
        want.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        out["tokenizer_config.json"] = json.dumps(want, indent=2, ensure_ascii=False).encode("utf-8")
    return out
