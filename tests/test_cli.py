"""The `onebit` command line: a thin shell whose outputs equal the library's, errors exit 2 cleanly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from onebit.checkpoint import load_model
from onebit.cli import main
from onebit.evaluate import perplexity
from onebit.generate import generate_text
from conftest import SHARED_DATA

SHAKESPEARE = SHARED_DATA / "tinyshakespeare" / "input.txt"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    corpus = root / "corpus"
    corpus.mkdir()
    text = SHAKESPEARE.read_text(encoding="utf-8")[:80_000]
    for i in range(4):
        (corpus / f"p{i}.txt").write_text(text[i * 20_000:(i + 1) * 20_000], encoding="utf-8")
    out = root / "run"
    rc = main(["train", "--model.preset=tiny", "--model.max_position_embeddings=64", f"--data.paths={corpus}",
               "--data.tokenizer=bpe:300", "--data.seq_len=32", "--data.val_fraction=0.25",
               f"--data.cache_dir={root / 'cache'}", "--train.steps=10", "--train.batch_size=4",
               "--train.eval_every=10", "--train.eval_tokens=256", "--train.progress=false",
               "--train.tensorboard=false", f"--train.out_dir={out}", "--train.threads=1"])
    assert rc == 0
    return out, corpus


def test_help_lists_subcommands():
    r = subprocess.run([sys.executable, "-m", "onebit", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("train", "generate", "eval", "bench"):
        assert cmd in r.stdout


def test_generate_cli_equals_library(trained, capsys):
    out, _ = trained
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "To be", "--max-new-tokens", "12", "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    model, tok, _ = load_model(out)
    expected = "To be" + "".join(generate_text(model, tok, "To be", 12, temperature=0.0)) + "\n"
    assert printed == expected
    assert len(printed) > len("To be\n")


def test_eval_ppl_cli_equals_library(trained, capsys):
    out, corpus = trained
    capsys.readouterr()
    assert main(["eval", "ppl", "--model", str(out), str(corpus / "p0.txt"), "--seq-len", "32", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    model, tok, _ = load_model(out)
    cfg = model.config
    from onebit.data import read_documents
    ids = []
    for d in read_documents([corpus / "p0.txt"]):
        ids += [cfg.bos_token_id] + tok.encode(d.text, add_special_tokens=False).ids + [cfg.eos_token_id]
    ref = perplexity(model, np.asarray(ids), 32)
    assert res["loss"] == pytest.approx(ref["loss"], rel=1e-6) and res["tokens"] == ref["tokens"]
    assert 1 < res["ppl"] < cfg.vocab_size


def test_eval_ppl_kv_bits_engine_and_pytorch_agree(trained, capsys, tmp_path):
    """--kv-bits 3 on the training run (PyTorch, fake-quantized cache) and on its packed export
    (engine, the 3-bit cache it stores): the same loss to float tolerance, and not the 16-bit one."""
    from onebit.formats.packed_model import export_packed
    out, corpus = trained
    packed = export_packed(out, tmp_path / "packed", "i2", "f32")
    res = {}
    for name, model, bits in (("torch3", out, "3"), ("engine3", packed, "3"), ("engine16", packed, "16")):
        capsys.readouterr()
        assert main(["eval", "ppl", "--model", str(model), str(corpus / "p0.txt"), "--seq-len", "32",
                     "--json", "--kv-bits", bits]) == 0
        res[name] = json.loads(capsys.readouterr().out)["loss"]
    assert res["engine3"] == pytest.approx(res["torch3"], abs=5e-5)  # 3- vs 16-bit: 3e-4 apart
    assert abs(res["engine3"] - res["engine16"]) > 1e-4


@pytest.mark.parametrize("argv, needle", [
    (["generate", "--model", "/nonexistent/model", "hi"], "does not exist"),
    (["eval", "ppl", "--model", "/nonexistent/model", "x.txt"], "does not exist"),
    (["train", "--data.paths=/nonexistent/corpus", "--train.steps=1"], "does not exist"),
    (["train", "--model.hidden_size=100", "--model.num_attention_heads=3"], "num_attention_heads"),
    (["train", "--train.stepz=3"], "stepz"),
    (["train", "--config", "/nonexistent.toml"], "does not exist"),
])
def test_bad_input_exits_2_with_one_clear_line(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written into the caller's tree on failure
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_empty_corpus_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("   \n")
    assert main(["train", f"--data.paths={tmp_path / 'empty'}", f"--train.out_dir={tmp_path / 'run'}",
                 f"--data.cache_dir={tmp_path / 'cache'}", "--train.steps=1"]) == 2
    assert "no text" in capsys.readouterr().err.lower()
    assert not (tmp_path / "run").exists()


def test_generate_prompt_too_long_is_a_clear_error(trained, capsys):
    out, _ = trained
    assert main(["generate", "--model", str(out), "word " * 200, "--max-new-tokens", "5"]) == 2
    assert "context" in capsys.readouterr().err


def test_generate_bad_sampling_parameter(trained, capsys):
    out, _ = trained
    assert main(["generate", "--model", str(out), "hi", "--top-p", "1.5", "--max-new-tokens", "5"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_generate_kv_bits_and_min_p_on_pytorch(trained, capsys):
    """A training run generates in PyTorch behind the engine's API (resolve.TorchRuntime): the
    quantized KV cache and the engine's samplers work there too, and --kv-bits 3 changes the
    logits it samples from (the fake-quantized cache) while 16 and 32 are the float cache."""
    from onebit.resolve import load_runnable
    out, _ = trained
    assert main(["generate", "--model", str(out), "hi", "--kv-bits", "3", "--min-p", "0.1",
                 "--repetition-penalty", "1.2", "--max-new-tokens", "5", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("hi")
    ids = load_runnable(out).encode("To be or not")
    a, b, c = (load_runnable(out, kv_bits=k).logits(ids) for k in (32, 16, 3))
    assert np.array_equal(a, b) and not np.allclose(a, c, atol=1e-6)


def test_trained_tokenizer_declares_bos(trained):
    """onebit train puts BOS before every document, and the tokenizer it saves says so (its
    post-processor), so transformers' tok(text) and onebit agree on prompts."""
    from tokenizers import Tokenizer

    from onebit.tokenizer_convention import post_processor_prefix
    out, _ = trained
    model, tok, folder = load_model(out)
    assert post_processor_prefix(Tokenizer.from_file(str(folder / "tokenizer.json"))) == \
        (model.config.bos_token_id,)
    assert tok.encode("To be").ids[0] == model.config.bos_token_id
    assert json.loads((folder / "tokenizer_config.json").read_text())["add_bos_token"] is True


@pytest.mark.parametrize("bits", [3, 16])
def test_generate_kv_bits_on_the_engine(capsys, monkeypatch, bits):
    import onebit
    loaded = []
    real = onebit.load

    def spy(*a, **kw):
        loaded.append(real(*a, **kw))
        return loaded[-1]

    monkeypatch.setattr(onebit, "load", spy)
    assert main(["generate", "Once upon", "--kv-bits", str(bits), "--max-new-tokens", "8",
                 "--temperature", "0", "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("Once upon")
    assert [m.runtime.kv_bits for m in loaded] == [bits]
    assert loaded[0].runtime.cache_k[0].dtype == np.uint8  # the compact block, not float32
