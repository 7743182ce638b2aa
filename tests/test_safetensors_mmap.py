"""The engine's zero-copy safetensors reader: equal to the safetensors library on valid files, and
only its own clear error (never a crash, hang or giant allocation) on mutated ones."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from onebit.formats.safetensors_mmap import SafetensorsError, bf16_to_f32, read_safetensors


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    d = tmp_path_factory.mktemp("st")
    tensors = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([1, -2, 3], np.int8),
               "c": np.zeros((0, 5), np.float16), "d": np.arange(6, dtype=np.uint8)}
    path = d / "x.safetensors"
    save_file(tensors, str(path), metadata={"k": "v"})
    return path, path.read_bytes()


def test_matches_the_safetensors_library(valid):
    path, _ = valid
    got, meta = read_safetensors(path)
    want = load_file(str(path))
    assert meta == {"k": "v"} and set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
        np.testing.assert_array_equal(got[k], want[k])
        assert not got[k].flags.writeable  # a read-only view of the map, not a copy


def test_bf16_widening_is_exact():
    x = np.array([1.0, -2.5, 3.140625, 0.0], np.float32)
    bits = (x.view(np.uint32) >> 16).astype(np.uint16)  # these values are exact in bf16
    np.testing.assert_array_equal(bf16_to_f32(bits), x)


@pytest.mark.parametrize("edit,match", [
    (lambda b: b[:5], "shorter than the 8-byte"),
    (lambda b: (10**12).to_bytes(8, "little") + b[8:], "header claims"),
    (lambda b: b[:-3], "outside|span"),
    (lambda b: b[:8] + b"[" + b[9:], "not UTF-8 JSON|not a JSON object"),
])
def test_targeted_corruptions(tmp_path, valid, edit, match):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(edit(valid[1]))
    with pytest.raises(SafetensorsError, match=match):
        read_safetensors(p)


def _header(raw: bytes) -> dict:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n])


def test_overlapping_and_mis_sized_entries(tmp_path, valid):
    raw = valid[1]
    n = int.from_bytes(raw[:8], "little")
    h = _header(raw)
    a0 = h["a"]["data_offsets"][0]
    for mutate, match in ((lambda h: h["b"].update(data_offsets=[a0, a0 + 3]), "overlap"),
                          (lambda h: h["a"].update(shape=[4, 4]), "bytes but its data_offsets span"),
                          (lambda h: h["a"].update(dtype="F8"), "unknown dtype"),
                          (lambda h: h["a"].update(shape=[-1, 4]), "invalid shape")):
        hh = json.loads(json.dumps(h))
        mutate(hh)
        text = json.dumps(hh).encode().ljust(n)
        if len(text) > n:
            continue
        p = tmp_path / "m.safetensors"
        p.write_bytes(raw[:8] + text + raw[8 + n:])
        with pytest.raises(SafetensorsError, match=match):
            read_safetensors(p)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_mutations_fail_cleanly(tmp_path, valid, data):
    raw = bytearray(valid[1])
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[:data.draw(st.integers(0, len(raw)))]
    p = tmp_path / "f.safetensors"
    p.write_bytes(bytes(raw))
    try:
        tensors, _ = read_safetensors(p)
    except SafetensorsError:
        return
    for t in tensors.values():  # what loads is readable, and no bigger than the file
        assert t.nbytes <= len(raw)
        t.sum()
