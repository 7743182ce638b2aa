"""llama2.c importer: the real stories260K reproduces llama2.c's known-good greedy output byte for
byte; a run.c-style numpy forward is the oracle on random files (untied classifier, GQA); the
tokenizer matches run.c's encode; bad files are refused with the reason."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from onebit.formats.llama2c import (Llama2cError, Llama2cTokenizer, greedy_text, load_llama2c,
                                    read_header)
from conftest import SHARED_DATA

DATA = SHARED_DATA
STORIES = DATA / "models" / "stories260K"
TINYSTORIES = DATA / "tinystories" / "tinystories_sample.txt"


def test_stories260k_greedy_200_is_byte_exact():
    model = load_llama2c(STORIES / "stories260K.bin")
    tok = Llama2cTokenizer.from_file(STORIES / "tok512.bin", model.config.vocab_size)
    expected = (STORIES / "expected_greedy_200.txt").read_bytes()
    assert greedy_text(model, tok, 200) == expected


def test_stories260k_config():
    h = read_header(STORIES / "stories260K.bin")
    assert (h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads, h.vocab_size, h.seq_len) == \
        (64, 172, 5, 8, 4, 512, 512)
    assert h.shared_classifier


# ---------------------------------------------------------------------------------------------
# Oracle: run.c's forward in numpy (interleaved RoPE, GQA, SwiGLU), on random weights
# ---------------------------------------------------------------------------------------------

def write_llama2c(path: Path, dim, hidden, layers, heads, kv, vocab, seq, shared, rng) -> dict:
    hd = dim // heads
    shapes = [("emb", (vocab, dim)), ("rms_att", (layers, dim)), ("wq", (layers, heads * hd, dim)),
              ("wk", (layers, kv * hd, dim)), ("wv", (layers, kv * hd, dim)), ("wo", (layers, dim, heads * hd)),
              ("rms_ffn", (layers, dim)), ("w1", (layers, hidden, dim)), ("w2", (layers, dim, hidden)),
              ("w3", (layers, hidden, dim)), ("rms_final", (dim,)), ("fr", (seq * hd // 2,)),
              ("fi", (seq * hd // 2,))] + ([] if shared else [("wcls", (vocab, dim))])
    w = {n: rng.standard_normal(s).astype(np.float32) * (0.3 if not n.startswith("rms") else 0.1) +
         (1.0 if n.startswith("rms") else 0.0) for n, s in shapes}
    with open(path, "wb") as f:
        f.write(struct.pack("<7i", dim, hidden, layers, heads, kv, vocab if shared else -vocab, seq))
        for n, _ in shapes:
            f.write(w[n].astype("<f4").tobytes())
    w["wcls"] = w["emb"] if shared else w["wcls"]
    return w


def runc_forward(w: dict, tokens: list[int], heads: int, kv: int) -> np.ndarray:
    """Logits [T, V] of run.c's forward, token by token with a KV cache (float64)."""
    def rms(x, g):
        return g * x / np.sqrt(np.mean(x * x) + 1e-5)

    dim = w["emb"].shape[1]
    hd, L = dim // heads, w["wq"].shape[0]
    kc = [[] for _ in range(L)]
    vc = [[] for _ in range(L)]
    out = []
    for pos, t in enumerate(tokens):
        x = w["emb"][t].astype(np.float64)
        for i in range(L):
            xb = rms(x, w["rms_att"][i])
            q, k, v = w["wq"][i] @ xb, w["wk"][i] @ xb, w["wv"][i] @ xb
            for vec in (q, k):
                for j in range(0, len(vec), 2):
                    freq = 1.0 / 10000.0 ** ((j % hd) / hd)
                    c, s = np.cos(pos * freq), np.sin(pos * freq)
                    vec[j], vec[j + 1] = vec[j] * c - vec[j + 1] * s, vec[j] * s + vec[j + 1] * c
            kc[i].append(k)
            vc[i].append(v)
            att_out = np.zeros(heads * hd)
            for h in range(heads):
                g = h // (heads // kv)
                qh = q[h * hd:(h + 1) * hd]
                sc = np.array([qh @ kk[g * hd:(g + 1) * hd] for kk in kc[i]]) / np.sqrt(hd)
                p = np.exp(sc - sc.max())
                p /= p.sum()
                att_out[h * hd:(h + 1) * hd] = sum(pi * vv[g * hd:(g + 1) * hd] for pi, vv in zip(p, vc[i]))
            x = x + w["wo"][i] @ att_out
            xb = rms(x, w["rms_ffn"][i])
            a = w["w1"][i] @ xb
            x = x + w["w2"][i] @ ((a / (1 + np.exp(-a))) * (w["w3"][i] @ xb))
        out.append(w["wcls"] @ rms(x, w["rms_final"]))
    return np.stack(out)


@pytest.mark.parametrize("shared", [True, False])
def test_forward_matches_runc_oracle(tmp_path, shared):
    rng = np.random.default_rng(3)
    f = tmp_path / "m.bin"
    w = write_llama2c(f, dim=32, hidden=48, layers=2, heads=4, kv=2, vocab=40, seq=16, shared=shared, rng=rng)
    model = load_llama2c(f)
    assert model.config.tie_word_embeddings == shared and (model.lm_head is None) == shared
    tokens = [1, 5, 7, 3, 39, 0, 12]
    with torch.no_grad():
        logits, _ = model(torch.tensor([tokens]))
    ref = runc_forward(w, tokens, heads=4, kv=2)
    np.testing.assert_allclose(logits[0].double().numpy(), ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return Llama2cTokenizer.from_file(STORIES / "tok512.bin", 512)


def test_encode_decode_round_trip_and_hf_agrees(tok):
    hf = tok.to_hf_tokenizer()
    text = TINYSTORIES.read_text(encoding="utf-8").replace("<|endoftext|>", "")
    for para in [p for p in text.split("\n") if p.strip()][:20] + ["naïve café ☃ \t x", "a  b"]:
        ids = tok.encode(para)
        assert hf.encode(para, add_special_tokens=False).ids == ids
        # run.c decode after BOS strips the dummy-prefix space: the text comes back exactly
        pieces = [tok.decode_piece(p, t) for p, t in zip([1] + ids, ids)]
        assert b"".join(pieces).decode("utf-8") == para
        assert hf.decode(ids) == para


def test_encode_known_ids(tok):
    # ids run.c gives (BOS, then merged pieces); " Once" is one piece of tok512
    ids = tok.encode("Once upon", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert [tok.vocab[i] for i in ids[1:-1]] == [b" Once", b" upon"]


def test_safe_printf_drops_control_bytes(tok):
    assert tok.printable(b"\x01") == b"" and tok.printable(b"\n") == b"\n" and tok.printable(b"ab") == b"ab"


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

def test_truncated_file_is_refused(tmp_path):
    raw = (STORIES / "stories260K.bin").read_bytes()
    f = tmp_path / "cut.bin"
    f.write_bytes(raw[:-4])
    with pytest.raises(Llama2cError, match="truncated"):
        read_header(f)
    f.write_bytes(raw[:20])
    with pytest.raises(Llama2cError, match="header"):
        read_header(f)


def test_version1_magic_is_refused(tmp_path):
    f = tmp_path / "v1.bin"
    f.write_bytes(struct.pack("<ii", 0x616B3432, 1) + bytes(256))
    with pytest.raises(Llama2cError, match="version 0"):
        read_header(f)


@pytest.mark.parametrize("hdr, what", [((64, 172, 5, 7, 4, 512, 512), "n_heads"),
                                       ((64, 172, 5, 8, 4, 0, 512), "vocab_size"),
                                       ((64, -1, 5, 8, 4, 512, 512), "hidden_dim")])
def test_bad_header_fields(tmp_path, hdr, what):
    f = tmp_path / "bad.bin"
    f.write_bytes(struct.pack("<7i", *hdr) + bytes(64))
    with pytest.raises(Llama2cError, match=what):
        read_header(f)


def test_tokenizer_with_wrong_vocab_is_refused(tmp_path):
    with pytest.raises(Llama2cError, match="vocab"):
        Llama2cTokenizer.from_file(STORIES / "tok512.bin", 1000)
    f = tmp_path / "t.bin"
    f.write_bytes((STORIES / "tok512.bin").read_bytes()[:-3])
    with pytest.raises(Llama2cError, match="tok"):
        Llama2cTokenizer.from_file(f)
    with pytest.raises(Llama2cError, match="does not exist"):
        Llama2cTokenizer.from_file(tmp_path / "missing.bin")
