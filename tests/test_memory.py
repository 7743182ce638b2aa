"""Memory: a prefill holds no T x F scratch (the MLP runs in 128-row chunks) and the GEMMs keep
their int32 sums in the float outputs (no m x n accumulator copy). Measured as the growth of the
process's peak RSS (stats.peak_rss_mb: VmHWM) in a child process, over a 512-token prefill of a model whose FFN is
wide: before these changes the prefill added 61 MB here, now 17 MB."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from onebit.config import ModelConfig
from onebit.engine.synth import write_random_model

CODE = r"""
import json, sys
import numpy as np
from onebit.engine.stats import peak_rss_mb
from onebit import kernels
from onebit.engine import Runtime
kernels.set_num_threads(2)
rt = Runtime(sys.argv[1])
rt.reset(520)
ids = np.random.default_rng(0).integers(2, 300, 512)
rt.forward(ids[:4], 0)                 # everything but the prefill's own scratch is in place
before = peak_rss_mb()["self"]
rt.forward(ids, 0)
print(json.dumps({"growth_mb": peak_rss_mb()["self"] - before}))
"""


def test_prefill_scratch_does_not_scale_with_tokens_times_ffn(tmp_path):
    cfg = ModelConfig(vocab_size=300, hidden_size=256, intermediate_size=8192, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                      bos_token_id=0, eos_token_id=1, norm_placement="subln", hidden_act="relu2")
    folder = write_random_model(tmp_path / "m", cfg, embedding="f32")
    env = {**os.environ, "ONEBIT_TUNE": "0"}
    out = subprocess.run([sys.executable, "-c", CODE, str(folder)], env=env, capture_output=True,
                         text=True, check=True, timeout=300).stdout
    growth = json.loads(out.strip().splitlines()[-1])["growth_mb"]
    # expected now: gate + up for 128 rows 8 MB, codes 1 MB, q/k/v/y/o 2.6 MB, the GEMM's padded
    # code copies 2 MB, the KV rows written 1 MB, the embeddings 0.5 MB: ~16 MB (measured 16.6).
    # Before: gate + up for all 512 rows 32 MB and their int32 accumulators 16 MB more (measured
    # 61 MB growth)
    assert growth < 30, f"a 512-token prefill grew the peak RSS by {growth:.1f} MB"


def test_load_without_tokenizer_skips_it(tmp_path):
    # bench model runs token ids only: parsing Llama 3's tokenizer.json alone raised a process's
    # peak RSS by ~190 MB (the Rust tokenizers parser), counted against the model before
    import shutil

    import onebit
    from conftest import SHARED_DATA

    cfg = ModelConfig(vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      bos_token_id=128000, eos_token_id=128001)
    folder = write_random_model(tmp_path / "m", cfg, embedding="i8")
    shutil.copy(SHARED_DATA / "tokenizers" / "llama3" / "tokenizer.json", folder / "tokenizer.json")
    assert onebit.load(folder).tokenizer is not None
    m = onebit.load(folder, tokenizer=False)
    assert m.tokenizer is None
    assert len(list(m.generate_ids([128000, 5, 6], max_new_tokens=2, temperature=0))) >= 1


def test_bench_model_probes_the_model_file_in_process(tmp_path, monkeypatch):
    # a model larger than twice the L3 is its own bandwidth probe: read_probe over the file's
    # mapping in this process, interleaved with the decode rounds (no 512 MiB child buffer)
    from onebit.benchmarks import model as bm

    cfg = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=1)
    folder = write_random_model(tmp_path / "m", cfg, embedding="f16")
    monkeypatch.setattr(bm, "l3_bytes", lambda: 1024)  # the tiny file counts as "> 2 x L3"
    monkeypatch.setattr(bm, "read_bandwidth_child", lambda n: (_ for _ in ()).throw(AssertionError("child probe")))
    r = bm.bench_model(folder, [8], 4, 1, 1)
    assert r["read_probe"].startswith("model file pages") and r["probe_peak_rss_mb"] == 0
    assert r["read_gb_s"] > 0 and 0 < r["bw_frac"] <= r["bw_frac_kv"]
