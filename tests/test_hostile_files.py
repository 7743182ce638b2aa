"""Hostile model files (issue 15): every loader refuses them with one error that names the file,
never a crash, a hang, a giant allocation or a silently truncated model. Each input is rebuilt
here from a tiny model written by onebit's own writers; what could crash or hang runs in a child
process under a timeout and an address-space limit, so a regression fails the test instead of
taking pytest (or the machine) down."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import onebit
from onebit.checkpoint import CheckpointError, load_model, save_model
from onebit.config import ConfigError, ModelConfig, _divisor_hint
from onebit.engine import EngineError
from onebit.engine.synth import write_random_model
from onebit.formats.model_io import read_packed_folder
from onebit.formats.packing import PackedFormatError
from onebit.formats.safetensors_mmap import SafetensorsError, read_safetensors

SMALL = dict(vocab_size=320, hidden_size=160, intermediate_size=320, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)


def _isolated(code: str, timeout: float = 120, mem_gib: float = 3.0) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with RLIMIT_AS = mem_gib and a timeout: a crash is a
    negative return code, a giant allocation a MemoryError, a hang a TimeoutExpired."""
    pre = ("import resource; resource.setrlimit(resource.RLIMIT_AS, "
           f"({int(mem_gib * 2**30)}, {int(mem_gib * 2**30)}))\n")
    return subprocess.run([sys.executable, "-c", pre + textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env={"ONEBIT_NUM_THREADS": "1",
                                                           **__import__("os").environ})


def _edit_json(path, fn) -> None:
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj))


def _tokenizer(vocab: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the fox and the bear by the river"] * 5, trainers.BpeTrainer(
        vocab_size=vocab, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok.to_str()


def _packed(tmp_path, name="m", layout="i2", **kw):
    return write_random_model(tmp_path / name, ModelConfig(**{**SMALL, **kw}), layout=layout,
                              embedding="f16", seed=0)


# ---------------------------------------------------------------------------------------------
# SIGSEGV: a t1_6 folder whose config says i2
# ---------------------------------------------------------------------------------------------

def test_layout_swap_is_refused_not_a_segfault(tmp_path):
    """hidden/intermediate 1280: i2 rows are 320 bytes, t1_6 rows 256. The per-tensor checks used
    the tensor's declared layout and the C layer the config's, so the kernel read rows past the
    mapped file (SIGSEGV in `onebit generate`)."""
    folder = _packed(tmp_path, layout="t1_6", hidden_size=1280, intermediate_size=1280,
                     num_hidden_layers=1, num_attention_heads=10, num_key_value_heads=5)
    (folder / "tokenizer.json").write_text(_tokenizer(300))  # so that generate reaches the kernels
    _edit_json(folder / "config.json", lambda c: c["packed"].update(layout="i2"))
    r = subprocess.run([sys.executable, "-m", "onebit", "generate", "--model", str(folder), "Hi",
                        "--max-new-tokens", "4"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "onebit generate: error:" in r.stderr and f"{folder}/config.json" in r.stderr
    assert "t1_6" in r.stderr and "Traceback" not in r.stderr


def test_c_layer_refuses_a_weight_buffer_of_another_layout(tmp_path):
    """Even if the Python checks were bypassed, the C layer gets each weight buffer's byte length
    and returns OB_ERR_BUFFER (-8) instead of reading past it."""
    folder = _packed(tmp_path, layout="t1_6", hidden_size=1280, intermediate_size=1280,
                     num_hidden_layers=1, num_attention_heads=10, num_key_value_heads=5)
    r = _isolated(f"""
        from onebit.engine import EngineError, Runtime
        rt = Runtime({str(folder)!r})
        for st in rt._structs:
            st.layout = 0          # the old bug: the config's i2 over t1_6 buffers
        try:
            rt.forward([1, 2, 3])
        except EngineError as e:
            print("refused:", e)
    """)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert "refused:" in r.stdout and "kernel status -8" in r.stdout


# ---------------------------------------------------------------------------------------------
# Hangs and absurd sizes: ModelConfig bounds, O(sqrt n) divisor hint
# ---------------------------------------------------------------------------------------------

def test_divisor_hint_matches_the_scan_and_is_fast():
    for n in range(1, 600):
        for near in (1, 3, 8, 20):
            scan = [k for k in range(1, n + 1) if n % k == 0 and (n // k) % 2 == 0]
            assert _divisor_hint(n, near) == (min(scan, key=lambda k: abs(k - near)) if scan else 1)
    t0 = time.perf_counter()
    assert _divisor_hint(200_000_001, 6) in (1, 3, 7, 11)  # an odd n: no even quotient exists
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("value", [2**31, 1e308, 2**63 - 1, 200_000_000])
def test_absurd_hidden_size_fails_at_once_naming_the_field(tmp_path, value):
    """hidden_size = 2^31 .. 1e308 with a head count that does not divide it looped over
    range(hidden_size) for a hint (forever); now a bound names the field."""
    folder = _packed(tmp_path)
    _edit_json(folder / "config.json",
               lambda c: c["model"].update(hidden_size=value, num_attention_heads=3))
    r = _isolated(f"""
        import time
        import onebit
        t0 = time.perf_counter()
        try:
            onebit.load({str(folder)!r})
        except ValueError as e:
            print("refused:", e)
        print(f"seconds {{time.perf_counter() - t0:.1f}}")
    """, timeout=60)
    assert r.returncode == 0 and "refused:" in r.stdout, (r.returncode, r.stderr[-1000:])
    assert "hidden_size" in r.stdout and str(folder) in r.stdout
    assert float(r.stdout.split("seconds ")[1]) < 5, r.stdout  # 200,000,000 took ~20 s


def test_train_override_of_an_absurd_size_fails_at_once():
    from onebit.train import load_run_config

    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="hidden_size=200000000 is larger than"):
        load_run_config("demo", ["--model.hidden_size=200000000"])  # was 21 s in the hint scan
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("field,value", [("head_dim", 1e308), ("num_hidden_layers", 2**40),
                                         ("vocab_size", 2**31), ("max_position_embeddings", 2**40),
                                         ("rms_norm_eps", float("nan")), ("rope_theta", float("inf"))])
def test_model_config_bounds_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict({**SMALL, field: value})


def test_packed_head_dim_1e308_is_an_error_naming_the_file(tmp_path):
    folder = _packed(tmp_path)
    _edit_json(folder / "config.json", lambda c: c["model"].update(head_dim=1e308))
    with pytest.raises(EngineError, match="head_dim") as e:
        onebit.load(folder)
    assert str(folder) in str(e.value)


# ---------------------------------------------------------------------------------------------
# Giant allocations: declared sizes against the tensors present, before allocating
# ---------------------------------------------------------------------------------------------

def _gguf(tmp_path):
    pytest.importorskip("gguf", reason="the gguf package (dev extra) writes the GGUF files")
    from onebit.formats.convert import convert

    src = _packed(tmp_path, "src", vocab_size=320, hidden_size=256, intermediate_size=256,
                  hidden_act="silu")
    (src / "tokenizer.json").write_text(_tokenizer(300))  # llama.cpp needs the vocabulary
    out = tmp_path / "m.gguf"
    convert(src, out, "gguf-tq2_0", verify=False)
    return out


def _set_gguf_u32(path, key: str, value: int) -> None:
    """Overwrite the uint32 value of metadata ``key`` in place (key string, type 4, value)."""
    data = bytearray(path.read_bytes())
    at = data.index(key.encode()) + len(key)
    assert struct.unpack_from("<I", data, at)[0] == 4, "expected a uint32 value"
    struct.pack_into("<I", data, at + 4, value)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("key,value,match", [
    ("bitnet.block_count", 4294967295, "block_count = 4294967295"),   # a 4-billion-item list
    ("bitnet.block_count", 1, "block_count = 1 but the file holds tensors of 2 blocks"),  # truncated
    ("bitnet.attention.head_count", 0, "head_count = 0"),              # ZeroDivisionError
])
def test_gguf_metadata_checked_against_the_tensors(tmp_path, key, value, match):
    path = _gguf(tmp_path)
    _set_gguf_u32(path, key, value)
    r = _isolated(f"""
        from onebit.formats.gguf_io import GGUFError, read_gguf
        try:
            read_gguf({str(path)!r})
            print("loaded")
        except GGUFError as e:
            print("refused:", e)
    """)
    assert r.returncode == 0, (r.returncode, r.stderr[-1500:])
    assert "refused:" in r.stdout and match in r.stdout and str(path) in r.stdout, r.stdout


@pytest.fixture
def checkpoint(tmp_path):
    import torch

    from onebit.model import CausalLM

    cfg = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return save_model(tmp_path / "ckpt", CausalLM(cfg), cfg)


EDITS = [dict(hidden_size=16384), dict(vocab_size=4_000_000), dict(intermediate_size=200_000),
         dict(num_hidden_layers=1000), dict(hidden_size=192000), dict(vocab_size=2**31),
         dict(num_hidden_layers=2**40)]


def test_checkpoint_config_larger_than_its_weights(checkpoint):
    """load_model built CausalLM(config) before looking at the tensors: hidden_size=192000 asked
    for 147 GB, vocab_size=2^31 for 1.6 TB, num_hidden_layers=2^40 until out of memory. The
    safetensors header is now compared with the config first (and absurd sizes stop at the
    config's bounds). One child process for all edits (one torch import)."""
    r = _isolated(f"""
        import json, pathlib, time
        from onebit.checkpoint import load_model
        cfg = pathlib.Path({str(checkpoint)!r}) / "config.json"
        good = json.loads(cfg.read_text())
        for edit in {EDITS!r}:
            t0 = time.perf_counter()
            cfg.write_text(json.dumps({{**good, "model": {{**good["model"], **edit}}}}))
            try:
                load_model(cfg.parent)
                print("loaded", edit)
            except ValueError as e:
                print("refused", round(time.perf_counter() - t0, 1), e)
    """, mem_gib=2.5)
    assert r.returncode == 0, (r.returncode, r.stderr[-1500:])
    lines = r.stdout.splitlines()
    assert len(lines) == len(EDITS) and all(line.startswith("refused") for line in lines), r.stdout
    assert all(str(checkpoint) in line and float(line.split()[1]) < 5 for line in lines), r.stdout


# ---------------------------------------------------------------------------------------------
# Silently wrong: fewer layers in the config than in the file
# ---------------------------------------------------------------------------------------------

def test_packed_config_with_fewer_layers_is_refused(tmp_path):
    folder = _packed(tmp_path)
    _edit_json(folder / "config.json", lambda c: c["model"].update(num_hidden_layers=1))
    with pytest.raises(EngineError, match="does not account") as e:
        onebit.load(folder)
    assert "model.layers.1." in str(e.value) and str(folder) in str(e.value)
    with pytest.raises(PackedFormatError, match="model.layers.1") as e:
        read_packed_folder(folder)  # `onebit convert`'s reader
    assert str(folder) in str(e.value)


# ---------------------------------------------------------------------------------------------
# Other exception types: RecursionError, PanicException
# ---------------------------------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000


def test_deeply_nested_json_is_an_error_naming_the_file(tmp_path, checkpoint):
    folder = _packed(tmp_path)
    (folder / "config.json").write_text(DEEP)
    with pytest.raises(ValueError, match="nested too deeply") as e:
        onebit.load(folder)
    assert f"{folder}/config.json" in str(e.value)
    (checkpoint / "config.json").write_text('{"model": ' + DEEP + "}")
    with pytest.raises(CheckpointError, match="nested too deeply"):
        load_model(checkpoint)


def test_deeply_nested_safetensors_header(tmp_path):
    raw = ('{"__metadata__": {"x": "y"}, "a": ' + DEEP + "}").encode()
    path = tmp_path / "deep.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw)
    with pytest.raises(SafetensorsError, match="nested too deeply") as e:
        read_safetensors(path)
    assert str(path) in str(e.value)


def test_deeply_nested_packed_metadata(tmp_path):
    folder = _packed(tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["__metadata__"]["onebit.tensors"] = DEEP
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    with pytest.raises(ValueError, match="nested too deeply") as e:
        onebit.load(folder)
    assert str(path) in str(e.value)


def test_tokenizer_that_panics_in_rust_is_an_error(tmp_path, checkpoint):
    """continuing_subword_prefix = "None" makes tokenizers' BPE builder panic; pyo3 raises that as
    PanicException, a BaseException that `except Exception` let through as a crash."""
    tok = json.loads(_tokenizer(300))
    tok["model"]["continuing_subword_prefix"] = "None"
    folder = _packed(tmp_path)
    for d in (folder, checkpoint):
        (d / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(EngineError, match="not a valid tokenizer") as e:
        onebit.load(folder)
    assert f"{folder}/tokenizer.json" in str(e.value)
    with pytest.raises(CheckpointError, match="not a valid tokenizer"):
        load_model(checkpoint)


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    folder = _packed(tmp_path)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(_tokenizer(300))
    tok.add_tokens([f"<extra{i}>" for i in range(400 - tok.get_vocab_size())])
    (folder / "tokenizer.json").write_text(tok.to_str())  # 400 tokens, embeddings for 320
    with pytest.raises(EngineError, match=r"token ids up to 399 \(400 tokens\) but the model's vocab_size is 320"):
        onebit.load(folder)


def test_valid_models_still_load_and_run(tmp_path):
    """The checks refuse nothing a writer produces: a packed folder of each layout runs."""
    for layout in ("i2", "t1_6"):
        m = onebit.load(_packed(tmp_path, layout, layout=layout))
        assert np.isfinite(m.logits([1, 2, 3])).all()


def test_tokenizer_with_an_id_past_the_vocabulary_is_refused(tmp_path):
    """Found by the fuzz run: a vocab entry edited to id 4294967295 kept the token count (300) but
    encoded to an id the embedding does not have; the API then refused the *prompt* without
    naming the file."""
    folder = _packed(tmp_path)
    tok = json.loads(_tokenizer(300))
    tok["model"]["vocab"]["o"] = 4294967295
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(EngineError, match="token ids up to 4294967295") as e:
        onebit.load(folder)
    assert f"{folder}/tokenizer.json" in str(e.value)


def test_weights_out_of_float_range_name_the_model(tmp_path, checkpoint):
    """Found by the fuzz run: finite weights (3e38) overflow to inf logits, and the sampler's
    error ("logits contain NaN/inf") did not say which model."""
    from safetensors.numpy import load_file, save_file

    from onebit.generate import generate

    folder = write_random_model(tmp_path / "m", ModelConfig(**{**SMALL, "tie_word_embeddings": False}),
                                embedding="f32", seed=0)
    t = load_file(str(folder / "model.safetensors"))
    meta = read_safetensors(folder / "model.safetensors")[1]
    t["lm_head.weight"][:] = 3e38  # finite; its dot products overflow
    save_file(t, str(folder / "model.safetensors"), metadata=meta)
    with pytest.raises(EngineError, match="logits are NaN/inf") as e:
        onebit.load(folder).logits([1, 2])
    assert str(folder) in str(e.value)
    t = load_file(str(checkpoint / "model.safetensors"))
    t["model.norm.weight"][:] = 3e38
    save_file(t, str(checkpoint / "model.safetensors"), metadata={"format": "onebit", "format_version": "1"})
    model, _, _ = load_model(checkpoint)
    with pytest.raises(ValueError, match="logits are NaN/inf") as e:
        list(generate(model, [1, 2], 2, temperature=0))
    assert str(checkpoint) in str(e.value)


def _hf(tmp_path, **kw):
    from onebit.formats.convert import convert

    src = _packed(tmp_path, "src", **kw)
    (src / "tokenizer.json").write_text(_tokenizer(300))
    convert(src, tmp_path / "hf", "hf", verify=False)
    return tmp_path / "hf"


def test_hf_import_checks_the_source_tokenizer(tmp_path, monkeypatch):
    """A broken tokenizer.json in a transformers folder was copied into the converted cache and
    refused from there: the error named the cache, not the user's file."""
    monkeypatch.setenv("ONEBIT_CACHE", str(tmp_path / "cache"))
    hf = _hf(tmp_path)
    (hf / "tokenizer.json").write_text("[]")
    with pytest.raises(ValueError, match="not a valid tokenizer") as e:
        onebit.load(hf)
    assert f"{hf}/tokenizer.json" in str(e.value)


def test_hf_import_of_a_short_context_model(tmp_path, monkeypatch):
    """The conversion check probed 8 tokens whatever the model's context: a model with
    max_position_embeddings = 4 failed with "max_len=9 must be in [1, 4]", naming nothing."""
    monkeypatch.setenv("ONEBIT_CACHE", str(tmp_path / "cache"))
    hf = _hf(tmp_path, max_position_embeddings=4)
    m = onebit.load(hf)
    assert np.isfinite(m.logits([1, 2, 3])).all()
