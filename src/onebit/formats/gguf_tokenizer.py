"""A tokenizer.json into GGUF metadata and back (llama.cpp's ``tokenizer.ggml.*`` keys).

Two llama.cpp tokenizer models cover the tokenizers onebit meets:

``gpt2``  byte-level BPE (GPT-2, Llama-3, Qwen2, onebit's own ``bpe:N``): ``tokens`` (the BPE
          strings, byte-level alphabet), ``merges`` ("a b"), ``pre`` naming the pre-tokenizer regex
          (``gpt-2`` = ByteLevel's own regex, ``llama-bpe``, ``qwen2``), ``token_type``.
``llama`` SentencePiece-style BPE with byte fallback (Llama-2, llama2.c's tok512): ``tokens``
          (pieces with '▁' for spaces, ``<0xXX>`` byte pieces), ``scores`` (llama.cpp merges the
          adjacent pair whose concatenation scores highest: here -rank of the first merge that
          makes the piece, so its order is the BPE's), ``token_type`` (2 unknown, 3 control,
          6 byte), ``add_space_prefix``; onebit also writes ``merges`` so its reader rebuilds the
          exact merge list (llama.cpp ignores them for this model).

Both write ``bos/eos/unk_token_id``, ``add_bos_token`` (tokenizer_convention.py: as llama.cpp's
converter derives it from the post-processor and tokenizer_config.json) and ``chat_template``.
Rows of the embedding beyond the tokenizer (padding) are ``[PAD{i}]`` of type 5 (unused).

The reader (``tokenizer_files``) turns those keys back into ``tokenizer.json`` +
``tokenizer_config.json``: for onebit's own GGUFs the same ids and text as the original, and for
llama.cpp's the defaults llama.cpp applies (SPM adds BOS; BPE adds it for llama-bpe only).
"""

from __future__ import annotations

import json
import re

__all__ = ["GGUFTokenizerError", "add_tokenizer", "tokenizer_files"]

# the Split regexes of the byte-level pre-tokenizers llama.cpp names (tokenizer.ggml.pre)
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
               r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_REGEX = {"llama-bpe": LLAMA3_REGEX, "qwen2": QWEN2_REGEX}
_LLAMA3_PRES = ("llama-bpe", "llama3", "llama-v3")  # llama.cpp: add_bos defaults to true for these
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class GGUFTokenizerError(ValueError):
    """A tokenizer that cannot be written to, or read from, GGUF metadata."""


# ---------------------------------------------------------------------------------------------
# tokenizer.json -> GGUF
# ---------------------------------------------------------------------------------------------

def _pretokenizers(tok: dict) -> list[dict]:
    pre = tok.get("pre_tokenizer") or {}
    return pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else ([pre] if pre else [])


def _normalizers(tok: dict) -> list[dict]:
    n = tok.get("normalizer") or {}
    return n.get("normalizers", [n]) if n.get("type") == "Sequence" else ([n] if n else [])


def _kind(tok: dict, where: str) -> str:
    """"gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE), else GGUFTokenizerError."""
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFTokenizerError(f"{where}: tokenizer model {model.get('type')!r} has no llama.cpp "
                                 f"counterpart onebit writes (BPE only); keep the onebit format")
    if model.get("byte_fallback"):
        return "llama"
    if any(p.get("type") == "ByteLevel" for p in _pretokenizers(tok)) or \
            (tok.get("decoder") or {}).get("type") == "ByteLevel":
        return "gpt2"
    raise GGUFTokenizerError(f"{where}: a BPE tokenizer that is neither byte-level nor byte-fallback "
                             f"(SentencePiece-style); llama.cpp has no tokenizer for it")


def _pre_name(tok: dict, where: str) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level tokenizer's pre-tokenizer."""
    pres = _pretokenizers(tok)
    splits = [p for p in pres if p.get("type") == "Split"]
    levels = [p for p in pres if p.get("type") == "ByteLevel"]
    if not splits and len(levels) == 1 and levels[0].get("use_regex", True) \
            and not levels[0].get("add_prefix_space"):
        return "gpt-2"
    if len(splits) == 1 and len(levels) == 1 and not levels[0].get("use_regex", True):
        regex = (splits[0].get("pattern") or {}).get("Regex")
        for name, known in _PRE_REGEX.items():
            if regex == known:
                return name
    raise GGUFTokenizerError(f"{where}: its pre-tokenizer is none llama.cpp names that onebit knows "
                             f"(gpt-2, llama-bpe, qwen2), so llama.cpp would split text differently; "
                             f"keep the onebit format")


def _merge_strings(model: dict, where: str) -> list[str]:
    out = []
    for m in model.get("merges") or []:
        a, b = (m.split(" ", 1) if isinstance(m, str) else m)
        if " " in a or " " in b:
            raise GGUFTokenizerError(f"{where}: merge {[a, b]!r} holds a space, which GGUF's "
                                     f"'a b' merge strings cannot carry")
        out.append(f"{a} {b}")
    return out


def _space_prefix(tok: dict) -> bool:
    for p in _pretokenizers(tok):
        if p.get("type") == "Metaspace":
            return p.get("prepend_scheme", "always" if p.get("add_prefix_space", True) else
                         "never") != "never"
    return any(n.get("type") == "Prepend" for n in _normalizers(tok))


def add_tokenizer(w, files: dict[str, bytes], vocab_size: int, bos: int, eos: int, where: str) -> None:
    """Write the tokenizer in ``files`` (tokenizer.json, tokenizer_config.json) to GGUF writer ``w``
    for a model of ``vocab_size`` rows. ``where`` names the source in errors."""
    from tokenizers import Tokenizer

    from ..tokenizer_convention import bos_convention

    raw = files.get("tokenizer.json")
    if raw is None:
        raise GGUFTokenizerError(f"{where} has no tokenizer.json; llama.cpp needs a vocabulary in the "
                                 f"GGUF: copy the model's tokenizer.json into the folder")
    try:
        parsed = Tokenizer.from_str(raw.decode("utf-8"))
        tok = json.loads(raw)
        tc = json.loads(files["tokenizer_config.json"]) if "tokenizer_config.json" in files else {}
    except Exception as e:  # the tokenizers library raises a bare Exception
        raise GGUFTokenizerError(f"{where}: its tokenizer files cannot be read ({e})") from None
    tc = tc if isinstance(tc, dict) else {}
    kind = _kind(tok, where)
    pre = _pre_name(tok, where) if kind == "gpt2" else None
    model = tok["model"]
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    special, added = set(), set()
    for t in tok.get("added_tokens") or []:
        vocab[t["content"]] = t["id"]
        (special if t.get("special") else added).add(t["id"])
    n_real = max(vocab.values()) + 1 if vocab else 0
    if n_real > vocab_size:
        raise GGUFTokenizerError(f"{where}: tokenizer.json has {n_real} tokens but the model's "
                                 f"vocab_size is {vocab_size}; the tokenizer does not belong to it")
    tokens: list[str | None] = [None] * vocab_size
    for s, i in vocab.items():
        tokens[i] = s
    merges = _merge_strings(model, where)
    unk = vocab.get(model.get("unk_token")) if model.get("unk_token") else None
    types = []
    for i, s in enumerate(tokens):
        if s is None:
            tokens[i] = f"[PAD{i}]"
            types.append(UNUSED)
        elif i in special:
            types.append(CONTROL)
        elif i in added:
            types.append(USER_DEFINED)
        elif i == unk:
            types.append(UNKNOWN)
        elif kind == "llama" and _BYTE_PIECE.fullmatch(s):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    conv = bos_convention(parsed, tc, onebit_folder=True, bos_id=bos)
    w.add_tokenizer_model(kind)
    if kind == "gpt2":
        w.add_tokenizer_pre(pre)
    else:
        # llama.cpp's SPM merges the pair whose concatenation scores highest: -rank of the first
        # merge that makes a piece keeps the BPE's order; other pieces (chars, bytes, specials) 0
        rank: dict[str, int] = {}
        for r, m in enumerate(merges):
            a, b = m.split(" ")
            rank.setdefault(a + b, r)
        w.add_token_scores([-float(rank[s]) if s in rank else 0.0 for s in tokens])
        w.add_add_space_prefix(_space_prefix(tok))
        if unk is not None:
            w.add_unk_token_id(unk)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(conv.bos_id if conv.add_bos else bos)
    w.add_eos_token_id(eos)
    w.add_add_bos_token(conv.add_bos)
    w.add_add_eos_token(False)
    if isinstance(tc.get("chat_template"), str):
        w.add_chat_template(tc["chat_template"])


# ---------------------------------------------------------------------------------------------
# GGUF -> tokenizer.json
# ---------------------------------------------------------------------------------------------

def _list(kv: dict, key: str, typ, n: int | None, where: str) -> list:
    v = kv.get(key)
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(x, typ) for x in v) or (n is not None and len(v) != n):
        raise GGUFTokenizerError(f"{where}: {key} must be a list of {n if n is not None else 'any'} "
                                 f"{typ.__name__ if isinstance(typ, type) else 'numbers'}")
    return v


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Merges for a SentencePiece vocabulary without a merge list (llama.cpp's own GGUFs): every
    split of a piece into two normal pieces, ranked by the piece's score (as transformers'
    SentencePieceExtractor and llama2c.to_hf_tokenizer)."""
    normal = {s: i for i, s in enumerate(tokens) if types[i] in (NORMAL, USER_DEFINED)}
    out = []
    for s, i in normal.items():
        for k in range(1, len(s)):
            if s[:k] in normal and s[k:] in normal:
                out.append((-scores[i], k, i, (s[:k], s[k:])))
    out.sort(key=lambda t: t[:3])
    return [m[3] for m in out]


def tokenizer_files(kv: dict, where: str) -> dict[str, bytes]:
    """tokenizer.json + tokenizer_config.json rebuilt from GGUF metadata ``kv``; {} when the file
    holds no tokenizer. Raises GGUFTokenizerError naming ``where`` for unknown or broken ones."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from ..tokenizer_convention import declare_bos

    kind = kv.get("tokenizer.ggml.model")
    if kind is None:
        return {}
    if kind not in ("gpt2", "llama"):
        raise GGUFTokenizerError(f"{where}: tokenizer.ggml.model {kind!r} is not one onebit reads "
                                 f"(gpt2, llama); run the model from token ids or its original folder")
    tokens = _list(kv, "tokenizer.ggml.tokens", str, None, where)
    if not tokens:
        raise GGUFTokenizerError(f"{where}: tokenizer.ggml.tokens is missing or empty")
    n = len(tokens)
    types = _list(kv, "tokenizer.ggml.token_type", int, n, where) or [NORMAL] * n
    scores = _list(kv, "tokenizer.ggml.scores", (int, float), n, where) or [0.0] * n
    merge_strs = _list(kv, "tokenizer.ggml.merges", str, None, where)
    ids = {}
    for k in ("bos", "eos", "unk"):
        v = kv.get(f"tokenizer.ggml.{k}_token_id")
        if v is not None and not (isinstance(v, int) and 0 <= v < n):
            raise GGUFTokenizerError(f"{where}: tokenizer.ggml.{k}_token_id={v!r} is outside the "
                                     f"{n}-token vocabulary")
        ids[k] = v
    pre = kv.get("tokenizer.ggml.pre", "default")
    add_bos = kv.get("tokenizer.ggml.add_bos_token")
    if not isinstance(add_bos, bool):  # llama.cpp's defaults (llama-vocab.cpp)
        add_bos = kind == "llama" or pre in _LLAMA3_PRES
    if add_bos and ids["bos"] is None:
        raise GGUFTokenizerError(f"{where}: add_bos_token is set but tokenizer.ggml.bos_token_id is missing")

    vocab, specials = {}, []
    for i, (s, t) in enumerate(zip(tokens, types)):
        if t == UNUSED:
            continue
        if s in vocab:
            raise GGUFTokenizerError(f"{where}: token {s!r} appears twice (ids {vocab[s]} and {i})")
        vocab[s] = i
        if t in (CONTROL, USER_DEFINED):
            specials.append(AddedToken(s, special=t == CONTROL, normalized=False))
    merges = []
    for m in merge_strs:
        parts = m.split(" ")
        if len(parts) != 2 or parts[0] not in vocab or parts[1] not in vocab:
            raise GGUFTokenizerError(f"{where}: merge {m!r} is not two tokens of the vocabulary")
        merges.append((parts[0], parts[1]))
    try:
        if kind == "gpt2":
            if pre not in ("gpt-2", *_LLAMA3_PRES, "qwen2"):
                raise GGUFTokenizerError(f"{where}: tokenizer.ggml.pre {pre!r} is not one onebit "
                                         f"rebuilds (gpt-2, llama-bpe, qwen2)")
            llama3 = pre in _LLAMA3_PRES
            tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=llama3))
            if pre == "gpt-2":
                tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
            else:
                tok.pre_tokenizer = pre_tokenizers.Sequence([
                    pre_tokenizers.Split(_regex(LLAMA3_REGEX if llama3 else QWEN2_REGEX), "isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
            tok.decoder = decoders.ByteLevel()
        else:
            unk = tokens[ids["unk"]] if ids["unk"] is not None else None
            if not merges:
                merges = _spm_merges(tokens, scores, types)
            tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True,
                                       fuse_unk=True))
            prefix = kv.get("tokenizer.ggml.add_space_prefix", True) is not False
            tok.pre_tokenizer = pre_tokenizers.Metaspace(
                replacement="▁", prepend_scheme="first" if prefix else "never", split=False)
            steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
            tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
        tok.add_special_tokens(specials)
    except GGUFTokenizerError:
        raise
    except Exception as e:  # the tokenizers library raises a bare Exception
        raise GGUFTokenizerError(f"{where}: its tokenizer cannot be rebuilt ({e})") from None
    declare_bos(tok, (ids["bos"],) if add_bos else ())
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos,
          "clean_up_tokenization_spaces": False}
    for k in ("bos", "eos", "unk"):
        if ids[k] is not None:
            tc[f"{k}_token"] = tokens[ids[k]]
    tmpl = kv.get("tokenizer.chat_template")
    if isinstance(tmpl, str):
        tc["chat_template"] = tmpl
    return {"tokenizer.json": tok.to_str().encode("utf-8"),
            "tokenizer_config.json": json.dumps(tc, indent=2, ensure_ascii=False).encode("utf-8")}


def _regex(pattern: str):
    from tokenizers import Regex
    return Regex(pattern)
