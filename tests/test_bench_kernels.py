"""`onebit bench kernels`: the --quick --json rows have the documented schema and sane numbers; bad
options exit 2 naming the option; the results-table targets are judged as documented."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from onebit import kernels as K
from onebit.benchmarks import kernels as kb
from onebit.formats import packed_row_bytes

KEYS = {"op", "m", "n", "k", "layout", "model", "us", "raw_us", "linear_us", "e2e_us", "torch_fp32_us",
        "torch_bf16_us", "weight_gb_s", "read_gb_s", "bw_frac", "raw_bw_frac", "gops", "vs_fp32",
        "vs_bf16", "vs_fp32_e2e", "vs_bf16_e2e", "packed_bytes", "weight_copies", "torch_fp32_copies",
        "torch_bf16_copies", "threads", "isa", "reps"}
POSITIVE = ["us", "raw_us", "linear_us", "e2e_us", "torch_fp32_us", "torch_bf16_us", "weight_gb_s",
            "read_gb_s", "bw_frac", "raw_bw_frac", "gops", "vs_fp32", "vs_bf16", "vs_fp32_e2e",
            "vs_bf16_e2e"]


@pytest.fixture(scope="module")
def quick_rows() -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "onebit", "bench", "kernels", "--quick", "--json",
                          "--threads", "1", "--layouts", "i2,t1_6"],
                         check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # --json prints nothing but the JSON


def test_quick_json_one_row_per_shape_op_layout(quick_rows):
    got = [(r["n"], r["k"], r["op"], r["layout"]) for r in quick_rows]
    want = [(n, k, op, lay) for n, k in kb.QUICK_SHAPES for op in kb.OPS for lay in ("i2", "t1_6")]
    assert got == want


def test_quick_json_schema_and_sanity(quick_rows):
    read = {r["read_gb_s"] for r in quick_rows}
    assert len(read) == 1  # one bandwidth measurement per run
    for r in quick_rows:
        assert KEYS <= r.keys()
        for key in POSITIVE:
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["m"] == (1 if r["op"] == "gemv" else kb.QUICK.m_gemm)
        assert r["threads"] == 1 and r["isa"] in K.available_isas()
        assert r["packed_bytes"] == r["n"] * packed_row_bytes(r["k"], r["layout"])
        assert r["bw_frac"] == pytest.approx(r["weight_gb_s"] / r["read_gb_s"], rel=1e-2, abs=1e-4)  # bw_frac is rounded to 4 decimals
        assert r["weight_gb_s"] == pytest.approx(r["packed_bytes"] / r["us"] / 1e3, rel=1e-2)
        assert r["gops"] == pytest.approx(2 * r["m"] * r["n"] * r["k"] / r["us"] / 1e3, rel=1e-2)
        assert r["vs_bf16"] == pytest.approx(r["torch_bf16_us"] / r["us"], rel=1e-2)
        assert r["vs_fp32"] == pytest.approx(r["torch_fp32_us"] / r["us"], rel=1e-2)
        # the rotation budget (4 MiB under --quick) is covered by every candidate's copies
        assert r["weight_copies"] * r["packed_bytes"] >= 4 << 20
        assert r["torch_fp32_copies"] * r["n"] * r["k"] * 4 >= 4 << 20


def test_main_restores_thread_counts(capsys):
    before_torch, before_ob = torch.get_num_threads(), K.get_num_threads()
    assert kb.main(["--quick", "--json", "--threads", "2", "--shapes", "64x128", "--ops", "gemv"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["n"], r["k"], r["op"], r["threads"]) for r in rows] == [(64, 128, "gemv", 2)]
    assert (torch.get_num_threads(), K.get_num_threads()) == (before_torch, before_ob)


@pytest.mark.parametrize("option, value", [("--shapes", "2560by2560"), ("--shapes", "0x128"),
                                           ("--ops", "gemv,conv"), ("--layouts", "i3"),
                                           ("--threads", "0")])
def test_bad_option_exits_2_naming_it(option, value, capsys):
    with pytest.raises(SystemExit) as e:
        kb.main([option, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}:" in err and "onebit bench kernels" in err


def test_bad_shapes_via_cli_subprocess():
    out = subprocess.run([sys.executable, "-m", "onebit", "bench", "kernels", "--shapes", "12x"],
                         check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "argument --shapes" in out.stderr and "NxK" in out.stderr and not out.stdout


def test_parse_shapes():
    assert kb.parse_shapes("2560x2560, 640X2560,6912×2560") == ((2560, 2560), (640, 2560), (6912, 2560))


def _row(op, n, k, m, bw_frac, vs_bf16, vs_fp32):
    return {"op": op, "n": n, "k": k, "m": m, "model": kb.model_of(n, k), "bw_frac": bw_frac,
            "vs_bf16": vs_bf16, "vs_fp32": vs_fp32}


def test_targets():
    assert [ok for _, ok in kb.targets(_row("gemv", 2560, 2560, 1, 0.85, 9.0, 1.0))] == [True, True]
    assert [ok for _, ok in kb.targets(_row("gemv", 6912, 2560, 1, 0.70, 9.0, 1.0))] == [False, True]
    assert kb.targets(_row("gemv", 1536, 1536, 1, 0.1, 1.0, 1.0)) == []  # 700M GEMV: no target
    assert [ok for _, ok in kb.targets(_row("gemm", 1536, 4096, 128, 0.0, 0.0, 3.5))] == [True]
    assert [ok for _, ok in kb.targets(_row("gemm", 2560, 2560, 128, 0.0, 0.0, 2.9))] == [False]
    assert kb.targets(_row("gemm", 2560, 2560, 16, 0.0, 0.0, 9.0)) == []  # only m=128 is judged
