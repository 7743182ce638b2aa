"""llama2.c model and tokenizer files (karpathy/llama2.c, the "legacy" version-0 export).

Model ``.bin`` (little-endian)::

    int32 x 7   dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
                (vocab_size < 0: the classifier is not tied to the embedding; |vocab_size| is the vocab)
    float32     token_embedding [V, D], rms_att [L, D], wq [L, H*hd, D], wk [L, Hkv*hd, D],
                wv [L, Hkv*hd, D], wo [L, D, H*hd], rms_ffn [L, D], w1 [L, F, D], w2 [L, D, F],
                w3 [L, F, D], rms_final [D], freq_cis_real + freq_cis_imag [seq_len * hd / 2 each,
                unused], then wcls [V, D] when untied

Weights are ``[out, in]`` like ``nn.Linear``; w1 = gate, w3 = up, w2 = down. run.c rotates
interleaved pairs (2i, 2i+1) of each head while onebit (as transformers) rotates halves (i, i+hd/2),
so q/k rows are permuted on import exactly as transformers' ``convert_llama_weights_to_hf`` does.

Tokenizer ``.bin``: int32 max_token_length, then per token float32 score, int32 length, bytes
(spaces are ' ', not '▁'; id 1 is ``"\\n<s>\\n"``, id 2 ``"\\n</s>\\n"``, 3..258 ``<0x00>..<0xFF>``).
``Llama2cTokenizer`` is a line-by-line port of run.c's ``encode``/``decode``/``safe_printf``;
``to_hf_tokenizer`` gives the same vocabulary as a ``tokenizers`` Llama-style BPE for the trainer.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Llama2cError", "Llama2cHeader", "read_header", "read_llama2c", "load_llama2c",
           "Llama2cTokenizer", "greedy_text"]

HEADER = struct.Struct("<7i")
MAGIC_V1 = 0x616B3432  # "ak42": llama2.c's version 1/2 exports, which this reader does not take
_BYTE_PIECE = re.compile(rb"^<0x([0-9A-Fa-f]{2})>$")


class Llama2cError(ValueError):
    """A llama2.c model or tokenizer file that cannot be read; the message names the file and fix."""


@dataclass(frozen=True)
class Llama2cHeader:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int  # absolute value
    seq_len: int
    shared_classifier: bool

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    def tensor_sizes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every float32 block in file order (the freq_cis blocks included)."""
        D, F, L, V, hd = self.dim, self.hidden_dim, self.n_layers, self.vocab_size, self.head_size
        H, Hkv = self.n_heads, self.n_kv_heads
        out = [("tok_embeddings", (V, D)), ("rms_att", (L, D)), ("wq", (L, H * hd, D)),
               ("wk", (L, Hkv * hd, D)), ("wv", (L, Hkv * hd, D)), ("wo", (L, D, H * hd)),
               ("rms_ffn", (L, D)), ("w1", (L, F, D)), ("w2", (L, D, F)), ("w3", (L, F, D)),
               ("rms_final", (D,)), ("freq_cis_real", (self.seq_len * hd // 2,)),
               ("freq_cis_imag", (self.seq_len * hd // 2,))]
        if not self.shared_classifier:
            out.append(("wcls", (V, D)))
        return out

    def expected_bytes(self) -> int:
        return HEADER.size + 4 * sum(int(np.prod(s)) for _, s in self.tensor_sizes())


def read_header(path: str | os.PathLike) -> Llama2cHeader:
    """Parse and check the 7-int32 header of a llama2.c model file against the file's length."""
    p = Path(path)
    if not p.is_file():
        raise Llama2cError(f"llama2.c model '{p}' does not exist; pass the .bin written by llama2.c's "
                           f"export.py (legacy format)")
    size = p.stat().st_size
    with open(p, "rb") as f:
        raw = f.read(HEADER.size)
    if len(raw) < HEADER.size:
        raise Llama2cError(f"'{p}' is {size} bytes, shorter than the 28-byte llama2.c header: not a "
                           f"llama2.c model")
    dim, hidden, layers, heads, kv, vocab, seq = HEADER.unpack(raw)
    if dim == MAGIC_V1:
        raise Llama2cError(f"'{p}' is a llama2.c version-1/2 export (magic 'ak42'); re-export it with "
                           f"`python export.py --version 0` (the legacy layout this reader takes)")
    fields = dict(dim=dim, hidden_dim=hidden, n_layers=layers, n_heads=heads, n_kv_heads=kv, seq_len=seq)
    for name, v in fields.items():
        if not 0 < v < 1 << 20:
            raise Llama2cError(f"'{p}': header field {name}={v} is not a plausible size: the file is "
                               f"not a llama2.c legacy model or is corrupt")
    if vocab == 0 or abs(vocab) >= 1 << 24:
        raise Llama2cError(f"'{p}': header vocab_size={vocab} is not plausible: the file is corrupt")
    if dim % heads or heads % kv or (dim // heads) % 2:
        raise Llama2cError(f"'{p}': n_heads={heads} must divide dim={dim} into an even head size and "
                           f"n_kv_heads={kv} must divide n_heads: the header is corrupt")
    h = Llama2cHeader(dim, hidden, layers, heads, kv, abs(vocab), seq, shared_classifier=vocab > 0)
    want = h.expected_bytes()
    if size != want:
        raise Llama2cError(f"'{p}' is {size} bytes but its header ({h}) implies {want}: the file is "
                           f"truncated, corrupt, or not a llama2.c legacy (version 0) export")
    return h


def _permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of q/k [n_heads*hd, D]: interleaved pairs (2i, 2i+1) -> halves (i, i+hd/2) per head."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def read_llama2c(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """Read a llama2.c legacy model: (ModelConfig fields, state dict of float32 numpy arrays named
    as onebit's ``CausalLM`` with ``norm_placement="pre"``, ``linear="fp"``)."""
    h = read_header(path)
    data = np.fromfile(path, dtype="<f4", offset=HEADER.size)
    blocks: dict[str, np.ndarray] = {}
    off = 0
    for name, shape in h.tensor_sizes():
        n = int(np.prod(shape))
        blocks[name] = data[off:off + n].reshape(shape)
        off += n
    assert off == data.size
    if not np.isfinite(data).all():
        raise Llama2cError(f"'{path}' holds non-finite weights: the file is corrupt")
    cfg = dict(vocab_size=h.vocab_size, hidden_size=h.dim, intermediate_size=h.hidden_dim,
               num_hidden_layers=h.n_layers, num_attention_heads=h.n_heads,
               num_key_value_heads=h.n_kv_heads, hidden_act="silu", max_position_embeddings=h.seq_len,
               rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=h.shared_classifier,
               bos_token_id=1, eos_token_id=2, linear="fp", norm_placement="pre")
    from ..config import ModelConfig

    try:  # the sizes onebit's model takes (the header's were only checked for plausibility)
        ModelConfig(**cfg)
    except ValueError as e:
        raise Llama2cError(f"'{path}': its header does not describe a model onebit runs: {e}") from None
    sd = {"model.embed_tokens.weight": blocks["tok_embeddings"], "model.norm.weight": blocks["rms_final"]}
    for i in range(h.n_layers):
        pre = f"model.layers.{i}."
        sd[pre + "input_layernorm.weight"] = blocks["rms_att"][i]
        sd[pre + "self_attn.q_proj.weight"] = _permute_rope(blocks["wq"][i], h.n_heads)
        sd[pre + "self_attn.k_proj.weight"] = _permute_rope(blocks["wk"][i], h.n_kv_heads)
        sd[pre + "self_attn.v_proj.weight"] = blocks["wv"][i]
        sd[pre + "self_attn.o_proj.weight"] = blocks["wo"][i]
        sd[pre + "post_attention_layernorm.weight"] = blocks["rms_ffn"][i]
        sd[pre + "mlp.gate_proj.weight"] = blocks["w1"][i]
        sd[pre + "mlp.down_proj.weight"] = blocks["w2"][i]
        sd[pre + "mlp.up_proj.weight"] = blocks["w3"][i]
    if not h.shared_classifier:
        sd["lm_head.weight"] = blocks["wcls"]
    return cfg, {k: np.ascontiguousarray(v) for k, v in sd.items()}


def load_llama2c(path: str | os.PathLike):
    """A llama2.c model as an fp onebit ``CausalLM`` (plain pre-norm Llama) in eval mode."""
    import torch

    from ..config import ModelConfig
    from ..model import CausalLM

    cfg_fields, sd = read_llama2c(path)
    model = CausalLM(ModelConfig(**cfg_fields))
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Tokenizer (run.c semantics)
# ---------------------------------------------------------------------------------------------

class Llama2cTokenizer:
    """llama2.c's tokenizer: ``vocab`` (bytes per id), ``scores``; BOS = 1, EOS = 2."""

    BOS, EOS = 1, 2

    def __init__(self, vocab: list[bytes], scores: list[float], max_token_length: int):
        self.vocab, self.scores, self.max_token_length = vocab, scores, max_token_length
        self.lookup = {}
        for i, v in enumerate(vocab):  # run.c's bsearch finds one of equal strings; keep the first
            self.lookup.setdefault(v, i)

    @classmethod
    def from_file(cls, path: str | os.PathLike, vocab_size: int | None = None) -> "Llama2cTokenizer":
        p = Path(path)
        if not p.is_file():
            raise Llama2cError(f"llama2.c tokenizer '{p}' does not exist; pass the tokenizer .bin "
                               f"(e.g. tok512.bin) that came with the model")
        raw = p.read_bytes()
        if len(raw) < 4:
            raise Llama2cError(f"'{p}' is too short to be a llama2.c tokenizer")
        (max_len,) = struct.unpack_from("<i", raw, 0)
        if not 0 < max_len < 1 << 16:
            raise Llama2cError(f"'{p}': max_token_length={max_len} is not plausible; not a llama2.c "
                               f"tokenizer file")
        vocab, scores, off = [], [], 4
        while off < len(raw) and (vocab_size is None or len(vocab) < vocab_size):
            if off + 8 > len(raw):
                raise Llama2cError(f"'{p}': truncated entry for token {len(vocab)} at byte {off}")
            score, n = struct.unpack_from("<fi", raw, off)
            off += 8
            if not 0 <= n <= max_len or off + n > len(raw):
                raise Llama2cError(f"'{p}': token {len(vocab)} has length {n} (max {max_len}, "
                                   f"{len(raw) - off} bytes left): the file is corrupt")
            vocab.append(raw[off:off + n])
            scores.append(score)
            off += n
        if vocab_size is not None and len(vocab) != vocab_size:
            raise Llama2cError(f"'{p}' holds {len(vocab)} tokens but the model's vocab is {vocab_size}: "
                               f"use the tokenizer the model was trained with")
        if off != len(raw):
            raise Llama2cError(f"'{p}' has {len(raw) - off} trailing bytes after {len(vocab)} tokens: "
                               f"pass the model's vocab size or check the file")
        if len(vocab) < 259 or vocab[1] != b"\n<s>\n" or vocab[2] != b"\n</s>\n":
            raise Llama2cError(f"'{p}' is not a llama2.c sentencepiece tokenizer (expected BOS/EOS at "
                               f"ids 1/2 and 256 byte tokens at 3..258)")
        return cls(vocab, scores, max_len)

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """run.c ``encode``: dummy-prefix space, one token per UTF-8 code point (byte fallback
        +3), then repeatedly merge the adjacent pair whose concatenation has the best score."""
        tokens = [self.BOS] if bos else []
        data = text.encode("utf-8")
        if data:
            tokens.append(self.lookup[b" "])
        i = 0
        while i < len(data):
            j = i + 1
            while j < len(data) and (data[j] & 0xC0) == 0x80 and j - i < 4:
                j += 1
            cp = data[i:j]
            if cp in self.lookup:
                tokens.append(self.lookup[cp])
            else:
                tokens.extend(b + 3 for b in cp)
            i = j
        while True:
            best, best_id, best_idx = -1e10, -1, -1
            for k in range(len(tokens) - 1):
                tid = self.lookup.get(self.vocab[tokens[k]] + self.vocab[tokens[k + 1]])
                if tid is not None and self.scores[tid] > best:
                    best, best_id, best_idx = self.scores[tid], tid, k
            if best_idx == -1:
                break
            tokens[best_idx:best_idx + 2] = [best_id]
        if eos:
            tokens.append(self.EOS)
        return tokens

    def decode_piece(self, prev: int, token: int) -> bytes:
        """run.c ``decode``: strip the leading space after BOS; ``<0xXX>`` is the raw byte."""
        piece = self.vocab[token]
        if prev == self.BOS and piece[:1] == b" ":
            piece = piece[1:]
        m = _BYTE_PIECE.match(piece)
        return bytes([int(m.group(1), 16)]) if m else piece

    @staticmethod
    def printable(piece: bytes) -> bytes:
        """run.c ``safe_printf``: a lone byte that is neither printable nor whitespace is dropped."""
        if len(piece) == 1 and not (0x20 <= piece[0] <= 0x7E or piece[0] in b" \t\n\v\f\r"):
            return b""
        return piece

    def to_hf_tokenizer(self):
        """The same vocabulary as a ``tokenizers.Tokenizer`` (Llama-style: '▁' for spaces, byte
        fallback, merges ranked by the merged piece's score, BOS before every text as run.c), for
        the data pipeline and the engine."""
        from tokenizers import Tokenizer, decoders, models, normalizers

        pieces = []
        for i, v in enumerate(self.vocab):
            if i == 0:
                pieces.append("<unk>")
            elif i in (self.BOS, self.EOS):
                pieces.append("<s>" if i == self.BOS else "</s>")
            else:
                pieces.append(v.decode("utf-8", errors="strict").replace(" ", "▁"))
        vocab = {p: i for i, p in reversed(list(enumerate(pieces)))}
        merges = []
        for i, p in enumerate(pieces):
            if i < 259 or len(p) < 2:
                continue
            for k in range(1, len(p)):
                a, b = p[:k], p[k:]
                if a in vocab and b in vocab and vocab[a] >= 3 and vocab[b] >= 3:
                    merges.append((-self.scores[i], k, (a, b)))
        merges.sort(key=lambda t: (t[0], t[1]))
        bpe = models.BPE(vocab=vocab, merges=[m[2] for m in merges], unk_token="<unk>",
                         byte_fallback=True, fuse_unk=True)
        tok = Tokenizer(bpe)
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        from tokenizers import AddedToken
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in ("<unk>", "<s>", "</s>")])
        from ..tokenizer_convention import declare_bos
        return declare_bos(tok, (self.BOS,))  # run.c starts every prompt with BOS


def greedy_text(model, tokenizer: Llama2cTokenizer, steps: int = 200, prompt: str = "") -> bytes:
    """What llama2.c's ``run <model> -z <tok> -t 0 -n steps [-i prompt]`` prints, without run.c's
    final newline: greedy decoding from BOS (+ prompt), stopping early if the model emits BOS."""
    import torch

    prompt_tokens = tokenizer.encode(prompt, bos=True)
    steps = min(steps, model.config.max_position_embeddings)
    model.setup_cache(1, steps)
    out = []
    try:
        token, pos = prompt_tokens[0], 0
        with torch.no_grad():
            while pos < steps:
                logits, _ = model(torch.tensor([[token]]), pos=pos)
                nxt = prompt_tokens[pos + 1] if pos < len(prompt_tokens) - 1 else int(logits[0, -1].argmax())
                pos += 1
                if nxt == Llama2cTokenizer.BOS:
                    break
                out.append(tokenizer.printable(tokenizer.decode_piece(token, nxt)))
                token = nxt
    finally:
        model.clear_cache()
    return b"".join(out)
