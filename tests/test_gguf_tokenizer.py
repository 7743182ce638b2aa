"""GGUF keeps the tokenizer (formats/gguf_tokenizer.py) and small models export (F16 fallback).

A tokenizer written into GGUF metadata and read back encodes and decodes a corpus sample exactly
as the original tokenizer.json, for byte-level BPE (Llama-3, GPT-2) and SentencePiece-style
tokenizers (Llama-2, llama2.c's tok512); the built-in model (hidden 192: rows that are not whole
256-value blocks) exports to GGUF, reads back exactly, and generates the same text from the .gguf
as from its folder; hostile tokenizer metadata is refused naming the file."""

import json

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the gguf package (dev extra) writes the GGUF files")

from onebit.cli import main
from onebit.config import ModelConfig
from onebit.engine import default_model_path
from onebit.engine.synth import write_random_model
from onebit.formats import convert as cv
from onebit.formats.gguf_io import GGUFError, parse_gguf, read_gguf
from onebit.formats.gguf_tokenizer import GGUFTokenizerError, add_tokenizer, tokenizer_files
from onebit.formats.model_io import read_packed_folder
from onebit.tokenizer_convention import bos_convention, declare_files
from conftest import SHARED_DATA
from tokenizers import Tokenizer

TOKS = SHARED_DATA / "tokenizers"
SAMPLE = ((SHARED_DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:12_000]
          + (SHARED_DATA / "tinystories" / "tinystories_valid_head.txt").read_text(encoding="utf-8")[:8_000]
          + " naïve café ☃ 3.14159 \t\n  two  spaces <|endoftext|> <s> 日本語")


def _tokenizer_gguf(path, files, vocab):
    w = gguf.GGUFWriter(str(path), "bitnet")
    add_tokenizer(w, files, vocab, 1, 2, str(path))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return parse_gguf(path).kv


@pytest.mark.parametrize("name", ["llama3", "gpt2", "llama2", "tok512"])
def test_tokenizer_round_trip_through_gguf(name, tmp_path):
    files = {f: (TOKS / name / f).read_bytes() for f in ("tokenizer.json", "tokenizer_config.json")}
    orig = Tokenizer.from_str(files["tokenizer.json"].decode())
    # as convert hands them over: the tokenizer's own convention stated (tokenizer_config.json)
    files = declare_files(files, bos_convention(orig, json.loads(files["tokenizer_config.json"])), orig)
    kv = _tokenizer_gguf(tmp_path / "t.gguf", files, orig.get_vocab_size() + 3)  # + padding rows
    assert kv["tokenizer.ggml.model"] == ("llama" if name in ("llama2", "tok512") else "gpt2")
    back = tokenizer_files(kv, "t.gguf")
    tok = Tokenizer.from_str(back["tokenizer.json"].decode())
    for special in (False, True):
        a = orig.encode(SAMPLE, add_special_tokens=special).ids
        assert tok.encode(SAMPLE, add_special_tokens=special).ids == a
    assert tok.decode(a) == orig.decode(a)
    tc = json.loads(back["tokenizer_config.json"])
    assert tc["add_bos_token"] == (name != "gpt2") == bos_convention(orig).add_bos
    if name in ("llama2", "tok512"):  # what llama.cpp's own converter writes: no merges, its scores
        kv = {k: v for k, v in kv.items() if k != "tokenizer.ggml.merges"}
        tok = Tokenizer.from_str(tokenizer_files(kv, "t.gguf")["tokenizer.json"].decode())
        assert tok.encode(SAMPLE).ids == orig.encode(SAMPLE).ids


def test_builtin_model_to_gguf_and_back(tmp_path, capsys, monkeypatch):
    """hidden 192: q/k/v/o/gate/up rows are not whole TQ blocks and become exact F16 codes (+ F32
    scale), down_proj (512) stays TQ2_0; onebit reads the file back exactly, keeps the tokenizer,
    and `generate --model x.gguf` prints what the folder prints."""
    monkeypatch.setenv("ONEBIT_CACHE", str(tmp_path / "cache"))
    src = default_model_path()
    out = tmp_path / "m.gguf"
    rep = cv.convert(src, out, "gguf-tq2_0", allow_relu2=True)
    assert rep["parity"]["max_rel_err"] < 1e-6
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    T = gguf.GGMLQuantizationType
    assert types["blk.0.attn_q.weight"] == T.F16 and types["blk.0.attn_q.scale"] == T.F32
    assert types["blk.0.ffn_down.weight"] == T.TQ2_0
    assert bytes(gguf.GGUFReader(out).fields["tokenizer.ggml.add_bos_token"].parts[-1]) == b"\x01"
    back = cv.convert(out, tmp_path / "back", "onebit")["output"]
    a, b = read_packed_folder(src), read_packed_folder(back)
    for k in a.ternary:
        (ca, sa), (cb, sb) = a.ternary[k](), b.ternary[k]()
        assert np.array_equal(ca, cb) and np.float32(sa) == np.float32(sb)
    assert (tmp_path / "back" / "tokenizer.json").is_file()
    argv = ["generate", "Once upon a time", "--max-new-tokens", "24", "--temperature", "0", "--quiet"]
    capsys.readouterr()
    assert main(argv) == 0
    folder_text = capsys.readouterr().out
    assert main(argv + ["--model", str(out)]) == 0
    assert capsys.readouterr().out == folder_text


def test_small_silu_model_to_i2_s_falls_back_exactly(tmp_path):
    """The demo config's width with SiLU (bitnet.cpp's 'bitnet' graph, which applies .scale):
    rows of 192 values are not whole 128-value I2_S blocks: F16 codes, exact round trip."""
    cfg = ModelConfig(vocab_size=4096, hidden_size=192, intermediate_size=512, num_hidden_layers=1,
                      num_attention_heads=6, num_key_value_heads=2, hidden_act="silu",
                      max_position_embeddings=64, norm_placement="subln")
    src = write_random_model(tmp_path / "m", cfg, embedding="f16", seed=5)
    (src / "tokenizer.json").write_bytes((default_model_path() / "tokenizer.json").read_bytes())
    rep = cv.convert(src, tmp_path / "m.gguf", "gguf-i2_s")
    assert rep["parity"]["max_rel_err"] < 1e-6
    tensors = parse_gguf(tmp_path / "m.gguf").tensors  # (type, ...); gguf-py has no I2_S
    assert tensors["blk.0.attn_q.weight"][0] == 1 and tensors["blk.0.ffn_down.weight"][0] == 36


def _kv(tmp_path):
    files = {f: (TOKS / "tok512" / f).read_bytes() for f in ("tokenizer.json", "tokenizer_config.json")}
    return _tokenizer_gguf(tmp_path / "t.gguf", files, 512)


@pytest.mark.parametrize("edit, needle", [
    (lambda kv: kv.update({"tokenizer.ggml.model": "bert"}), "'bert' is not one onebit reads"),
    (lambda kv: kv.update({"tokenizer.ggml.bos_token_id": 512}), "outside the 512-token"),
    (lambda kv: kv.update({"tokenizer.ggml.merges": ["▁t nonexistent"]}), "not two tokens"),
    (lambda kv: kv.update({"tokenizer.ggml.token_type": [1] * 3}), "token_type must be a list of 512"),
    (lambda kv: kv["tokenizer.ggml.tokens"].__setitem__(5, kv["tokenizer.ggml.tokens"][6]), "appears twice"),
    (lambda kv: kv.update({"tokenizer.ggml.tokens": []}), "missing or empty"),
    (lambda kv: kv.update({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "jais"}), "'jais'"),
])
def test_hostile_tokenizer_metadata_is_refused(tmp_path, edit, needle):
    kv = _kv(tmp_path)
    kv = {k: (list(v) if isinstance(v, list) else v) for k, v in kv.items()}
    edit(kv)
    with pytest.raises(GGUFTokenizerError, match=needle) as e:
        tokenizer_files(kv, "'x.gguf'")
    assert "'x.gguf'" in str(e.value)


def test_unknown_pre_tokenizer_is_not_written(tmp_path):
    """A byte-level BPE whose pre-tokenizer llama.cpp would not reproduce: refused, not 'default'."""
    j = json.loads((TOKS / "gpt2" / "tokenizer.json").read_text(encoding="utf-8"))
    j["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Whitespace"},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    with pytest.raises(GGUFTokenizerError, match="pre-tokenizer"):
        _tokenizer_gguf(tmp_path / "t.gguf", {"tokenizer.json": json.dumps(j).encode()}, 50257)


def test_gguf_with_a_broken_tokenizer_is_a_gguf_error(tmp_path):
    src = default_model_path()
    out = tmp_path / "m.gguf"
    cv.convert(src, out, "gguf-tq1_0", allow_relu2=True, verify=False)
    raw = bytearray(out.read_bytes())
    i = raw.find(b"gpt-2")
    raw[i:i + 5] = b"gpt-9"  # tokenizer.ggml.pre
    out.write_bytes(bytes(raw))
    with pytest.raises(GGUFError, match="'gpt-9'"):
        read_gguf(out)
