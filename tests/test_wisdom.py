"""Kernel choice by measurement (onebit.kernels.wisdom): the per-shape-class plan routes each m to
its variant in C, every mixed plan gives the exact integers, and the cached plan is measured once,
keyed by machine and build, and survives bad cache files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from onebit import kernels as K
from onebit.formats import pack, unpack
from onebit.kernels import wisdom

SIMD = [v for v in K.available_isas() if v != "reference"]


def _oracle(p, k, layout, x):
    return x.astype(np.int32) @ unpack(p, k, layout).astype(np.int32).T


@pytest.fixture
def clean_plan():
    yield
    wisdom.apply_plan(None)


def test_class_boundaries():
    lib = K._lib()
    assert [lib.ob_isa_class_for_m(m) for m in (1, 7, 8, 23, 24, 255, 256, 4096)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert lib.ob_set_isa_class(4, b"reference") == -2 and lib.ob_set_isa_class(-1, None) == -2
    assert lib.ob_set_isa_class(0, b"avx9000") == -5
    assert lib.ob_isa_class(4) is None


@pytest.mark.parametrize("layout", ["i2", "t1_6"])
def test_mixed_plans_are_exact_and_route_by_m(layout, clean_plan):
    rng = np.random.default_rng(7)
    variants = K.available_isas()  # the reference too: its class then runs the scalar spec
    k, n = 300, 37
    w = rng.integers(-1, 2, size=(n, k), dtype=np.int8)
    p = pack(w, layout)
    for shift in range(len(variants)):
        plan = {c: variants[(i + shift) % len(variants)] for i, c in enumerate(wisdom.CLASSES)}
        wisdom.apply_plan(plan)
        assert K.plan() == plan
        for m in (1, 5, 8, 31, 32, 100, 256, 300):
            x = rng.integers(-128, 128, size=(m, k), dtype=np.int8)
            np.testing.assert_array_equal(K.gemm(p, k, layout, x), _oracle(p, k, layout, x))
            # the int8 head's kernel follows its m's class too (avx512vnni_zmm has its own)
            x8 = np.clip(x, -127, 127)
            w8 = rng.integers(-127, 128, size=(n, k), dtype=np.int8)
            ones_m, ones_n = np.ones(m, np.float32), np.ones(n, np.float32)
            np.testing.assert_array_equal(K.linear_i8(w8, ones_n, x8, ones_m),
                                          (x8.astype(np.int64) @ w8.T.astype(np.int64)).astype(np.float32))


def test_use_overrides_then_restores_the_plan(clean_plan):
    variants = K.available_isas()
    plan = {c: variants[-1] for c in wisdom.CLASSES} | {"gemv": variants[0]}
    wisdom.apply_plan(plan)
    with K.use("reference"):
        assert set(K.plan().values()) == {"reference"}
    assert K.plan() == plan


def test_tune_caches_per_machine_and_build(tmp_path, monkeypatch, clean_plan):
    monkeypatch.setenv("ONEBIT_CACHE_DIR", str(tmp_path))
    calls = []
    fake = {"plan": {c: K.available_isas()[-1] for c in wisdom.CLASSES}, "us": {}, "ratio": {}}

    def fake_measure(*a, **kw):
        calls.append(1)
        return fake

    monkeypatch.setattr(wisdom, "measure", fake_measure)
    if len(wisdom.candidates()) < 2:
        pytest.skip("one SIMD variant: nothing to choose, nothing cached")
    assert wisdom.tune(child=False) == fake["plan"] and len(calls) == 1
    data = json.loads((tmp_path / "kernel-wisdom.json").read_text())
    key = wisdom.machine_key()
    assert list(data["entries"]) == [key] and "when" in data["entries"][key]
    assert wisdom.tune(child=False) == fake["plan"] and len(calls) == 1  # cached: not measured again
    monkeypatch.setattr(wisdom, "_lib_hash", lambda: "another-build")      # a rebuilt library
    wisdom.tune(child=False)
    assert len(calls) == 2
    assert len(json.loads((tmp_path / "kernel-wisdom.json").read_text())["entries"]) == 2
    # a damaged cache is measured again and rewritten, never an error
    for bad in ("{not json", json.dumps({"version": 1, "entries": {key: {"plan": {"gemv": "avx9000"}}}}),
                json.dumps([1, 2])):
        (tmp_path / "kernel-wisdom.json").write_text(bad)
        monkeypatch.setattr(wisdom, "_lib_hash", lambda: "b")
        n = len(calls)
        wisdom.tune(child=False)
        assert len(calls) == n + 1


def test_measure_picks_the_fastest_by_its_own_timing(clean_plan):
    if len(wisdom.candidates()) < 2:
        pytest.skip("one SIMD variant: nothing to choose")
    r = wisdom.measure(rounds=2, sample_s=0.001)
    assert set(r["plan"]) == set(wisdom.CLASSES)
    for c in wisdom.CLASSES:  # the choice is the argmin of what it reports, and a real variant
        assert r["plan"][c] == min(r["us"][c], key=r["us"][c].get)
        assert r["plan"][c] in wisdom.candidates()


def test_ensure_plan_measures_once_in_a_child_and_env_turns_it_off(tmp_path):
    env = {**os.environ, "ONEBIT_CACHE_DIR": str(tmp_path), "ONEBIT_TUNE": "1"}
    env.pop("ONEBIT_KERNELS", None)
    code = ("from onebit.kernels import wisdom; import onebit.kernels as K\n"
            "print(wisdom.ensure_plan() == K.plan(), K.plan() == wisdom.load_plan())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=300).stdout.split()
    assert out == ["True", "True"]
    assert (tmp_path / "kernel-wisdom.json").is_file() or len(wisdom.candidates()) < 2
    # ONEBIT_KERNELS forces one variant everywhere; ONEBIT_TUNE=0 keeps CPU detection's choice
    for extra, want in (({"ONEBIT_KERNELS": "reference"}, "reference"), ({"ONEBIT_TUNE": "0"}, None)):
        code = ("from onebit.kernels import wisdom; import onebit.kernels as K\n"
                "print(wisdom.ensure_plan(), sorted(set(K.plan().values())) == [K.isa()], K.isa())")
        out = subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True,
                             text=True, check=True, timeout=300).stdout.split()
        assert out[:2] == ["None", "True"]
        if want:
            assert out[2] == want
