"""onebit convert: every format to every other, each step checked, exact round trips, failures
that leave nothing behind, and a fuzzed GGUF reader."""

import json
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import onebit
from onebit.config import ModelConfig
from onebit.engine import default_model_path
from onebit.engine.synth import write_random_model
from onebit.formats import convert as cv
from onebit.formats import gguf_io
from onebit.formats.model_io import read_packed_folder, reference_logits

pytest.importorskip("gguf", reason="the gguf package (dev extra) writes the GGUF files")


def _model(tmp_path, name="m", **kw):
    base = dict(vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                hidden_act="silu", tie_word_embeddings=True, norm_placement="subln")
    base.update(kw)
    folder = write_random_model(tmp_path / name, ModelConfig(**base), embedding="f16", seed=3)
    shutil.copy(default_model_path() / "tokenizer.json", folder / "tokenizer.json")
    return folder


def _codes(tm):
    return {k: f() for k, f in tm.ternary.items()}


def _same_weights(a, b):
    ca, cb = _codes(a), _codes(b)
    assert ca.keys() == cb.keys()
    for k in ca:
        assert np.array_equal(ca[k][0], cb[k][0]), k
        assert np.float32(ca[k][1]) == np.float32(cb[k][1]), k


@pytest.mark.parametrize("to", ["hf", "gguf-tq2_0", "gguf-tq1_0", "gguf-i2_s", "onebit"])
def test_round_trip_is_exact_and_checked(tmp_path, to):
    src = _model(tmp_path)
    dst = tmp_path / ("out.gguf" if to.startswith("gguf") else "out")
    rep = cv.convert(src, dst, to)
    # read back by the format's own reader: the same float64 reference on the same numbers
    assert rep["parity"]["top1_agree"] == 1.0 and rep["parity"]["max_rel_err"] < 1e-6
    assert ("engine" in rep) == (to == "onebit")  # onebit output: the engine runs it too
    back = tmp_path / "back"
    rep2 = cv.convert(dst, back, "onebit")  # ... and back into the engine's format
    assert rep2["parity"]["max_rel_err"] < 1e-6 and rep2["engine"]["positions"] == 24
    _same_weights(read_packed_folder(src), read_packed_folder(back))


def test_i2_s_bytes_follow_bitnet_cpp_layout():
    """Hand-worked: 128 values, value j in byte j % 32 at bits 7-2(j//32).."""
    codes = np.zeros((1, 128), np.int8)
    codes[0, 0], codes[0, 32], codes[0, 64], codes[0, 96] = 1, -1, 1, 0   # byte 0: 10 00 10 01
    codes[0, 31] = -1                                                    # byte 31: 00 01 01 01
    raw = gguf_io.encode_i2_s(codes, 0.5)
    assert raw.size == 128 // 4 + 32
    assert raw[0] == 0b10001001 and raw[31] == 0b00010101 and raw[1] == 0b01010101
    assert struct.unpack("<f", raw[32:36].tobytes())[0] == 0.5
    back, s = gguf_io.decode_i2_s(raw, 1, 128)
    assert np.array_equal(back, codes) and s == 0.5


def test_tq_decoders_invert_the_encoders():
    from onebit.formats.gguf_export import encode_tq1_0, encode_tq2_0
    rng = np.random.default_rng(0)
    codes = rng.integers(-1, 2, size=(3, 512)).astype(np.int8)
    for enc, dec in ((encode_tq2_0, gguf_io.decode_tq2_0), (encode_tq1_0, gguf_io.decode_tq1_0)):
        got, d = dec(enc(codes, 0.25), 3, 512)
        assert np.array_equal(got, codes) and (d == 0.25).all()


def test_failed_parity_check_writes_nothing(tmp_path, monkeypatch):
    src = _model(tmp_path)
    from onebit.formats import hf
    real = hf.pack_hf_rows
    monkeypatch.setattr(hf, "pack_hf_rows", lambda c: real(-c))  # a converter bug: signs flipped
    with pytest.raises(ValueError, match="parity check failed"):
        cv.convert(src, tmp_path / "out", "hf")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_refusals_name_the_problem(tmp_path):
    # rows that are not whole blocks: TQ types fall back to F16 codes (test_gguf_tokenizer.py);
    # bitnet.cpp's ReLU² graph has no per-tensor scale for that, so I2_S refuses, naming the source
    odd = _model(tmp_path, "odd", hidden_size=192, num_attention_heads=3, num_key_value_heads=1,
                 intermediate_size=320, hidden_act="relu2")
    with pytest.raises(ValueError, match=rf"'{odd}': tensor 'model.layers.0.self_attn.q_proj' has rows "
                                         rf"of 192 values, not a multiple of 128"):
        cv.convert(odd, tmp_path / "x.gguf", "gguf-i2_s")
    assert not (tmp_path / "x.gguf").exists()
    relu = _model(tmp_path, "relu", hidden_act="relu2")
    with pytest.raises(ValueError, match="relu2"):
        cv.convert(relu, tmp_path / "y.gguf", "gguf-tq2_0")
    cv.convert(relu, tmp_path / "y.gguf", "gguf-i2_s")  # bitnet.cpp's bitnet-b1.58 graph is ReLU²
    assert gguf_io.parse_gguf(tmp_path / "y.gguf").kv["general.architecture"] == "bitnet-b1.58"
    with pytest.raises(ValueError, match="--to"):
        cv.convert(relu, tmp_path / "z", "safetensors")
    (tmp_path / "junk.bin").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not GGUF"):
        cv.convert(tmp_path / "junk.bin", tmp_path / "z", "onebit")


def test_load_imports_hf_and_gguf_once(tmp_path, monkeypatch):
    monkeypatch.setenv("ONEBIT_CACHE", str(tmp_path / "cache"))
    src = _model(tmp_path)
    cv.convert(src, tmp_path / "hf", "hf")
    cv.convert(src, tmp_path / "m.gguf", "gguf-tq2_0")
    ids = np.array([1, 7, 300, 4000, 12])
    ref = reference_logits(read_packed_folder(src), ids)
    for path in (tmp_path / "hf", tmp_path / "m.gguf"):
        m = onebit.load(path)
        m.runtime.reset(8)
        got = m.runtime.forward(ids, 0, last_only=False)
        assert np.abs(got - ref).max() < 1e-3 * np.abs(ref).max()
        assert cv.cached_import(path) == m.runtime.folder  # second time: the cached folder
    assert len(list((tmp_path / "cache" / "converted").iterdir())) == 2


def test_cli_convert_and_generate_from_hf(tmp_path, monkeypatch):
    monkeypatch.setenv("ONEBIT_CACHE", str(tmp_path / "cache"))
    src = _model(tmp_path)
    r = subprocess.run([sys.executable, "-m", "onebit", "convert", str(src), str(tmp_path / "hf"),
                        "--to", "hf"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "parity ok" in r.stdout
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["quantization_config"]["linear_class"] == "autobitlinear"
    r = subprocess.run([sys.executable, "-m", "onebit", "generate", "Once", "--model",
                        str(tmp_path / "hf"), "--max-new-tokens", "4", "--temperature", "0",
                        "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (tmp_path / "t.txt").write_text("Once upon a time there was a little model. " * 40)
    for model in (src, tmp_path / "hf"):  # eval ppl on a packed folder and on a HF folder: engine
        r = subprocess.run([sys.executable, "-m", "onebit", "eval", "ppl", str(tmp_path / "t.txt"),
                            "--model", str(model), "--seq-len", "32", "--json"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        ppl = json.loads(r.stdout)["ppl"]
        assert np.isfinite(ppl) and ppl > 1
    r = subprocess.run([sys.executable, "-m", "onebit", "convert", str(src), str(tmp_path / "o"),
                        "--to", "gguf-tq9"], capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice" in r.stderr


# --------------------------------------------------------------------------------------------
# fuzz: every failure on a mutated GGUF is our own GGUFError, never a crash or a huge allocation
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    src = _model(tmp, vocab_size=8192)
    out = tmp / "m.gguf"
    cv.convert(src, out, "gguf-i2_s", verify=False)
    return out.read_bytes()


def _try(data: bytes, path):
    path.write_bytes(data)
    try:
        tm = gguf_io.read_gguf(path)
        for f in list(tm.ternary.values())[:2]:
            f()
    except gguf_io.GGUFError:
        pass


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_gguf_header_mutations(small_gguf, tmp_path, data):
    header_end = 64 * 1024  # mutate where the counts, lengths, offsets and types live
    buf = bytearray(small_gguf)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, min(header_end, len(buf)) - 1))
        kind = data.draw(st.sampled_from(["byte", "u64", "truncate"]))
        if kind == "byte":
            buf[pos] = data.draw(st.integers(0, 255))
        elif kind == "u64":
            val = data.draw(st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1, 255, 4096]))
            buf[pos:pos + 8] = val.to_bytes(8, "little")
        else:
            del buf[pos:]
            break
    _try(bytes(buf), tmp_path / "f.gguf")


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=0, max_size=512))
def test_fuzz_gguf_random_bytes_after_magic(tmp_path, tail):
    _try(b"GGUF" + struct.pack("<I", 3) + tail, tmp_path / "r.gguf")


@pytest.fixture(scope="module")
def small_hf(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzzhf")
    src = _model(tmp, vocab_size=8192)
    cv.convert(src, tmp / "hf", "hf", verify=False)
    return tmp / "hf"


_VALUES = st.one_of(st.integers(-2, 3), st.sampled_from([0, 10**12, 2**63, -(2**40), 1.5, float("nan")]),
                    st.text(max_size=4), st.none(), st.booleans(), st.lists(st.integers(0, 3), max_size=2))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_hf_config(small_hf, tmp_path, data):
    """Mutated config.json values: every failure is our own ValueError (HFFormatError, a config
    error), never a crash, hang or giant allocation."""
    import shutil as sh
    folder = tmp_path / "hf"
    if folder.exists():
        sh.rmtree(folder)
    sh.copytree(small_hf, folder)
    cfg = json.loads((folder / "config.json").read_text())
    keys = sorted(cfg)
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(keys + ["quantization_config"]))
        cfg[key] = data.draw(_VALUES)
    (folder / "config.json").write_text(json.dumps(cfg))
    from onebit.formats import hf as hfmt
    try:
        tm = hfmt.read_hf(folder)
        next(iter(tm.ternary.values()))()
    except ValueError:
        pass


def test_huge_layer_count_is_refused_without_allocating(small_hf, tmp_path):
    """Regression (found by the fuzz test): num_hidden_layers = 10**12 built a 10**12-element set."""
    import shutil as sh
    from onebit.formats import hf as hfmt
    folder = tmp_path / "hf"
    sh.copytree(small_hf, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] = 10**12
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(hfmt.HFFormatError, match="num_hidden_layers"):
        hfmt.read_hf(folder)


def test_sharded_hf_checkpoint_reads_like_one_file(small_hf, tmp_path):
    """model.safetensors.index.json + shards (how big checkpoints ship) = the single-file read."""
    import shutil as sh

    from safetensors.numpy import load_file, save_file

    from onebit.formats import hf as hfmt
    folder = tmp_path / "sharded"
    sh.copytree(small_hf, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(folder / fname))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: f for f, part in shards.items() for n in part}}))
    _same_weights(hfmt.read_hf(small_hf), hfmt.read_hf(folder))
    bad = json.loads((folder / "model.safetensors.index.json").read_text())
    bad["weight_map"][names[0]] = "../evil.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(bad))
    with pytest.raises(hfmt.HFFormatError, match="plain file"):
        hfmt.read_hf(folder)
