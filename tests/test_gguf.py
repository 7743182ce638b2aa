"""GGUF export (formats/gguf_export.py): TQ2_0 / TQ1_0 bytes, the file, refusals, llama.cpp.

The byte tests need the ``gguf`` package (``pip install 'onebit[gguf]'``) and skip without it;
the llama.cpp round trip needs ``llama_cpp`` (llama-cpp-python) and skips without it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the 'gguf' package is not installed "
                                          "(pip install 'onebit[gguf]')")

from onebit.config import ModelConfig
from onebit.formats.gguf_export import (
    GGUFExportError,
    encode_tq1_0,
    encode_tq2_0,
    export_gguf,
    write_gguf_model,
)
from onebit.formats.model_io import Dense, projections, read_packed_folder
from onebit.formats.packed_model import PACKED_VERSION
from onebit.formats.packing import pack, save_packed

T = gguf.GGMLQuantizationType
TOKENIZER = Path(__file__).resolve().parents[1] / "src/onebit/models/default/tokenizer.json"


def _codes(rng, n, k):
    return rng.integers(-1, 2, size=(n, k)).astype(np.int8)


def _dequant(blocks, qtype):
    return gguf.quants.dequantize(blocks, qtype)


# ---------------------------------------------------------------------------------------------
# block layout
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype,encode", [(T.TQ2_0, encode_tq2_0), (T.TQ1_0, encode_tq1_0)])
@pytest.mark.parametrize("d", [1.0, 0.0302734375, 1 / 3])
def test_blocks_dequantize_to_codes_times_d(qtype, encode, d):
    rng = np.random.default_rng(0)
    codes = _codes(rng, 7, 768)
    codes[0] = 0                                           # an all-zero row
    codes[1] = 1
    codes[2] = -1
    blocks = encode(codes, d)
    assert blocks.dtype == np.uint8
    assert blocks.shape == (7, 3 * gguf.GGML_QUANT_SIZES[qtype][1])
    got = _dequant(blocks, qtype)
    want = codes.astype(np.float32) * np.float32(np.float16(d))  # d is stored as fp16
    assert np.array_equal(got, want)


@pytest.mark.parametrize("qtype,encode", [(T.TQ2_0, encode_tq2_0), (T.TQ1_0, encode_tq1_0)])
def test_blocks_equal_ggml_reference_quantizer(qtype, encode):
    # gguf-py's quantizer ports ggml's quantize_row_tq*_0_ref: d = block absmax = 1 for codes
    rng = np.random.default_rng(1)
    codes = _codes(rng, 5, 512)
    ref = gguf.quants.quantize(codes.astype(np.float32), qtype)
    assert np.array_equal(encode(codes, 1.0), ref)


def test_tq2_0_is_i2_reblocked():
    rng = np.random.default_rng(2)
    codes = _codes(rng, 4, 1024)
    i2 = pack(codes, "i2").reshape(4, 4, 64)               # two 32-byte i2 blocks per 256 values
    tq = encode_tq2_0(codes, 1.0).reshape(4, 4, 66)
    assert np.array_equal(tq[:, :, :64], i2)


def test_tq1_0_first_160_values_are_t1_6():
    rng = np.random.default_rng(3)
    codes = _codes(rng, 3, 512)
    tq = encode_tq1_0(codes, 1.0).reshape(3, 2, 54)
    for b in range(2):
        t16 = pack(np.ascontiguousarray(codes[:, 256 * b:256 * b + 160]), "t1_6")
        assert np.array_equal(tq[:, b, :32], t16)


def test_rows_not_multiple_of_256_refused():
    with pytest.raises(GGUFExportError, match="multiple of 256"):
        encode_tq2_0(np.zeros((2, 192), np.int8))


# ---------------------------------------------------------------------------------------------
# whole files
# ---------------------------------------------------------------------------------------------

def write_model(folder: Path, *, hidden=256, ffn=512, act="silu", layout="i2", seed=0,
                scale=None, tokenizer=True) -> Path:
    cfg = ModelConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, hidden_act=act,
                      max_position_embeddings=128)
    rng = np.random.default_rng(seed)
    D, F, V, hd = hidden, ffn, cfg.vocab_size, cfg.resolved_head_dim
    packed, extra = {}, {}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for role, n, k in (("self_attn.q_proj", 4 * hd, D), ("self_attn.k_proj", 2 * hd, D),
                           ("self_attn.v_proj", 2 * hd, D), ("self_attn.o_proj", D, 4 * hd),
                           ("mlp.gate_proj", F, D), ("mlp.up_proj", F, D), ("mlp.down_proj", D, F)):
            s = float(rng.uniform(0.5, 2.0) / np.sqrt(k)) if scale is None else scale
            packed[p + role] = (_codes(rng, n, k), s)
        for name, n in (("input_layernorm", D), ("post_attention_layernorm", D),
                        ("self_attn.attn_sub_norm", D), ("mlp.ffn_sub_norm", F)):
            extra[p + name + ".weight"] = rng.uniform(0.5, 1.5, n).astype(np.float32)
    extra["model.norm.weight"] = rng.uniform(0.5, 1.5, D).astype(np.float32)
    extra["model.embed_tokens.weight"] = rng.standard_normal((V, D)).astype(np.float32)
    folder.mkdir(parents=True)
    save_packed(folder / "model.safetensors", packed, layout, extra_tensors=extra)
    (folder / "config.json").write_text(json.dumps(
        {"model": cfg.to_dict(),
         "packed": {"layout": layout, "embedding": "f32", "format_version": PACKED_VERSION}}))
    if tokenizer:
        shutil.copy(TOKENIZER, folder / "tokenizer.json")
    return folder, packed, extra


@pytest.mark.parametrize("qtype", ["tq2_0", "tq1_0"])
@pytest.mark.parametrize("layout", ["i2", "t1_6"])
def test_export_file(tmp_path, qtype, layout):
    folder, packed, extra = write_model(tmp_path / "m", layout=layout)
    out = export_gguf(folder, tmp_path / "m.gguf", qtype)
    r = gguf.GGUFReader(out)
    f = {k: v for k, v in r.fields.items()}
    arch = bytes(f["general.architecture"].parts[-1]).decode()
    assert arch == "bitnet"
    assert int(f["bitnet.block_count"].parts[-1][0]) == 2
    assert int(f["bitnet.attention.head_count_kv"].parts[-1][0]) == 2
    assert len(f["tokenizer.ggml.tokens"].data) == 4096
    tensors = {t.name: t for t in r.tensors}
    want_t = T.TQ2_0 if qtype == "tq2_0" else T.TQ1_0
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    for hf, (codes, s) in packed.items():
        i, role = hf.split(".")[2], hf.rsplit(".", 1)[1]
        t = tensors[f"blk.{i}.{names[role]}.weight"]
        assert t.tensor_type == want_t
        w = _dequant(t.data, t.tensor_type)
        assert np.array_equal(w, codes.astype(np.float32))          # d = 1 in every block
        sc = tensors[f"blk.{i}.{names[role]}.scale"]
        assert sc.tensor_type == T.F32 and float(sc.data[0]) == np.float32(s)
    norms = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.attn_sub_norm": "attn_sub_norm", "mlp.ffn_sub_norm": "ffn_sub_norm"}
    for i in range(2):
        for hf, ll in norms.items():
            assert np.array_equal(tensors[f"blk.{i}.{ll}.weight"].data,
                                  extra[f"model.layers.{i}.{hf}.weight"])
    assert np.array_equal(tensors["output_norm.weight"].data, extra["model.norm.weight"])
    emb = tensors["token_embd.weight"]
    assert emb.tensor_type == T.F32
    assert np.array_equal(emb.data.reshape(4096, 256), extra["model.embed_tokens.weight"])
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert out.stat().st_mode & 0o044  # readable by others (umask permitting), not mkstemp's 0600


def test_export_block_scales(tmp_path):
    folder, packed, _ = write_model(tmp_path / "m", scale=0.0302734375)   # exact in fp16
    r = gguf.GGUFReader(export_gguf(folder, tmp_path / "m.gguf", "tq1_0", scales="block"))
    tensors = {t.name: t for t in r.tensors}
    assert not any(n.endswith(".scale") for n in tensors)
    w = _dequant(tensors["blk.1.ffn_down.weight"].data, T.TQ1_0)
    assert np.array_equal(w, packed["model.layers.1.mlp.down_proj"][0] * np.float32(0.0302734375))


def test_export_refusals(tmp_path):
    folder, _, _ = write_model(tmp_path / "a", scale=0.1)
    with pytest.raises(GGUFExportError, match="not exactly representable in fp16"):
        export_gguf(folder, tmp_path / "a.gguf", "tq2_0", scales="block")
    folder, _, _ = write_model(tmp_path / "b", act="relu2")
    with pytest.raises(GGUFExportError, match="relu2"):
        export_gguf(folder, tmp_path / "b.gguf", "tq2_0")
    export_gguf(folder, tmp_path / "b.gguf", "tq2_0", allow_relu2=True)       # on request
    folder, _, _ = write_model(tmp_path / "c", ffn=320, act="relu2")  # I2_S, ReLU²: no F16 fallback
    with pytest.raises(GGUFExportError, match=r"'.*/c'.*model.layers.0.mlp.down_proj.*rows of 320 "
                                              r"values, not a multiple of 128"):
        export_gguf(folder, tmp_path / "c.gguf", "i2_s")
    folder, _, _ = write_model(tmp_path / "e")  # q/k/v biases (a fine-tuned Qwen2): not written
    raw = json.loads((folder / "config.json").read_text())
    raw["model"]["qkv_bias"] = True
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="k_proj.bias': found missing"):  # config without tensors
        export_gguf(folder, tmp_path / "e.gguf", "tq2_0")
    tm = read_packed_folder(write_model(tmp_path / "e2")[0])
    tm.config = tm.config.replace(qkv_bias=True)
    for name, n, _ in projections(tm.config):
        if name.rsplit(".", 1)[1] in ("q_proj", "k_proj", "v_proj"):
            tm.dense[name + ".bias"] = Dense(np.zeros(n, np.float32))
    with pytest.raises(GGUFExportError, match="qkv_bias"):  # a real Qwen2-style model: refused
        write_gguf_model(tm, tmp_path / "e.gguf", "tq2_0")
    folder, _, _ = write_model(tmp_path / "d", tokenizer=False)
    with pytest.raises(GGUFExportError, match="tokenizer.json"):
        export_gguf(folder, tmp_path / "d.gguf", "tq2_0")
    with pytest.raises(ValueError, match="qtype"):
        export_gguf(folder, tmp_path / "d.gguf", "q4_0")
    assert not (tmp_path / "a.gguf").exists() and not (tmp_path / "c.gguf").exists()
    assert not (tmp_path / "d.gguf").exists() and not (tmp_path / "e.gguf").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_cli_convert(tmp_path, capsys):
    from onebit.cli import main

    folder, _, _ = write_model(tmp_path / "m")
    assert main(["convert", str(folder), str(tmp_path / "m.gguf"), "--to", "gguf-tq1_0"]) == 0
    assert "gguf-tq1_0" in capsys.readouterr().out
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    assert {t.tensor_type for t in r.tensors} == {T.TQ1_0, T.F32}
    folder, _, _ = write_model(tmp_path / "r", act="relu2")
    assert main(["convert", str(folder), str(tmp_path / "r.gguf"), "--to", "gguf-tq2_0"]) == 2
    assert "allow-relu2" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# llama.cpp round trip
# ---------------------------------------------------------------------------------------------

def _llama_logits(path, ids):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    # F32 KV cache (llama.cpp's default is F16; the engine keeps float32)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_batch=128, n_threads=2,
                          logits_all=True, type_k=0, type_v=0, verbose=False)
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], np.float32)


IDS = [0, 17, 912, 3301, 5, 77, 2048, 1000, 4095, 12]


@pytest.mark.parametrize("qtype", ["tq2_0", "tq1_0"])
def test_llama_cpp_equals_engine_when_rows_are_one_q8k_block(tmp_path, qtype):
    # every projection input is 256 values: llama.cpp's Q8_K activation blocks = the engine's
    # per-token INT8, so the logits agree to float rounding (an int8 rounding flip aside)
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    import onebit

    folder, _, _ = write_model(tmp_path / "m", ffn=256)
    theirs = _llama_logits(export_gguf(folder, tmp_path / "m.gguf", qtype), IDS)
    ours = onebit.load(folder).logits(IDS)
    assert np.abs(ours[0] - theirs[0]).max() < 1e-4            # first token: exact up to rounding
    assert (np.abs(ours - theirs).max(1) < 1e-3).mean() >= 0.7
    assert (ours.argmax(1) == theirs.argmax(1)).all()


def test_llama_cpp_block_scales_equal_tensor_scales(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    folder, _, _ = write_model(tmp_path / "m", ffn=256, scale=0.0302734375)
    a = _llama_logits(export_gguf(folder, tmp_path / "t.gguf", "tq2_0", scales="tensor"), IDS)
    b = _llama_logits(export_gguf(folder, tmp_path / "b.gguf", "tq2_0", scales="block"), IDS)
    assert np.abs(a - b).max() < 1e-3


@pytest.mark.parametrize("qtype", ["tq2_0", "tq1_0"])
def test_llama_cpp_close_to_engine(tmp_path, qtype):
    # ffn 768: down_proj's input is 3 Q8_K blocks in llama.cpp, one INT8 scale in the engine
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    import onebit

    folder, _, _ = write_model(tmp_path / "m", ffn=768)
    theirs = _llama_logits(export_gguf(folder, tmp_path / "m.gguf", qtype), IDS)
    ours = onebit.load(folder).logits(IDS)
    for a, b in zip(ours, theirs):
        assert np.corrcoef(a, b)[0, 1] > 0.995
    assert (ours.argmax(1) == theirs.argmax(1)).mean() >= 0.8
