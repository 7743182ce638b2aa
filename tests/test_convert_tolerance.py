"""`onebit convert --embedding f16|i8|i4` from an f32 source: the file is checked exactly against
the source with its embeddings stored that way, the stored values against the per-element bound
the storage implies, and the report gives both and the measured logits cost."""

import numpy as np
import pytest

from onebit.cli import main
from onebit.config import ModelConfig
from onebit.engine import default_model_path
from onebit.engine.synth import write_random_model
from onebit.formats import convert as cv
from onebit.formats import packed_model
from onebit.formats.model_io import read_packed_folder


@pytest.fixture(scope="module")
def f32_model(tmp_path_factory):
    cfg = ModelConfig(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, hidden_act="silu",
                      max_position_embeddings=64, norm_placement="subln", tie_word_embeddings=False)
    folder = write_random_model(tmp_path_factory.mktemp("f32") / "m", cfg, embedding="f32", seed=11)
    (folder / "tokenizer.json").write_bytes((default_model_path() / "tokenizer.json").read_bytes())
    return folder


@pytest.mark.parametrize("emb, bound", [("f16", 2.0 ** -11), ("i8", 1 / 254), ("i4", 1 / 14)])
def test_embedding_storage_is_checked_against_its_bound(f32_model, tmp_path, emb, bound):
    rep = cv.convert(f32_model, tmp_path / "out", "onebit", embedding=emb)
    assert rep["parity"]["max_rel_err"] < 1e-6 and rep["parity"]["top1_agree"] == 1.0
    e = rep["embedding"]
    assert e["type"] == emb and e["source_type"] == "f32" and 0 < e["of_bound"] <= 1
    src, out = read_packed_folder(f32_model), read_packed_folder(tmp_path / "out")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        w, got = src.dense[name].f32(), out.dense[name].f32()
        assert out.dense[name].kind == emb
        scale = np.abs(w) if emb == "f16" else np.abs(w).max(axis=1, keepdims=True)
        assert (np.abs(got - w) <= bound * scale * (1 + 1e-6) + 2.0 ** -25).all()
    # the logits cost is measured, not bounded: an embedding change of 2^-11 already flips int8
    # activation roundings downstream (a few % of the logit range at 2 layers)
    assert 0 < e["logits"]["max_rel_err"] < 1 and 0 < e["logits"]["top1_agree"] <= 1


def test_a_wrong_quantizer_fails_the_bound_and_writes_nothing(f32_model, tmp_path, monkeypatch):
    real = packed_model.quantize_rows_i8
    monkeypatch.setattr(packed_model, "quantize_rows_i8", lambda w: (real(w)[0], real(w)[1] * 1.01))
    with pytest.raises(ValueError, match="i8 storage allows: the quantizer is wrong"):
        cv.convert(f32_model, tmp_path / "out", "onebit", embedding="i8")
    assert not (tmp_path / "out").exists()


def test_cli_prints_the_measured_error(f32_model, tmp_path, capsys):
    capsys.readouterr()
    assert main(["convert", str(f32_model), str(tmp_path / "o"), "--to", "onebit", "--embedding", "i8"]) == 0
    out = capsys.readouterr().out
    assert "parity ok" in out and "embeddings f32 -> i8: max |error|" in out and "of what i8 allows" in out


def test_gguf_f16_embedding_from_f32(tmp_path):
    """GGUF token_embd as F16 from an f32 source: checked the same way (it failed the exact check)."""
    cfg = ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=256, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, hidden_act="silu",
                      max_position_embeddings=64, norm_placement="subln")
    src = write_random_model(tmp_path / "m", cfg, embedding="f32", seed=12)
    (src / "tokenizer.json").write_bytes((default_model_path() / "tokenizer.json").read_bytes())
    rep = cv.convert(src, tmp_path / "m.gguf", "gguf-tq2_0", embedding="f16")
    assert rep["parity"]["max_rel_err"] < 1e-6 and 0 < rep["embedding"]["of_bound"] <= 1
