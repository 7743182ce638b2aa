"""One resolver for every --model (onebit/resolve.py): each kind is classified, generate / chat /
eval ppl run all of them (the engine for ternary formats, PyTorch for the others), and the
commands that need a ternary model say in one line what to do instead.

llama2.c's stories260K through `onebit generate` prints llama2.c's own greedy 200 tokens."""

import json

import pytest

from onebit.cli import main
from onebit.engine import default_model_path
from onebit.resolve import classify, load_runnable
from conftest import SHARED_DATA

STORIES = SHARED_DATA / "models" / "stories260K"
BIN = STORIES / "stories260K.bin"


def test_classify_every_kind(tmp_path):
    assert classify(default_model_path()).kind == "packed"
    assert classify(BIN).kind == "llama2c" and not classify(BIN).engine
    (tmp_path / "g.gguf").write_bytes(b"GGUF" + bytes(60))
    assert classify(tmp_path / "g.gguf").kind == "gguf"
    for name, cfg, kind in (("bitnet", {"model_type": "bitnet"}, "hf-ternary"),
                            ("llama", {"model_type": "llama"}, "hf-fp"),
                            ("hf1bit", {"model_type": "llama", "quantization_config":
                                        {"quant_method": "bitnet"}}, "hf-ternary"),
                            ("qwen2", {"model_type": "qwen2"}, "hf-fp")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        assert classify(tmp_path / name).kind == kind, name
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000010\n")
    assert classify(tmp_path / "run").kind == "run"
    (tmp_path / "junk.bin").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not GGUF and not a llama2.c model"):
        classify(tmp_path / "junk.bin")
    with pytest.raises(ValueError, match="does not exist"):
        classify(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a model onebit knows"):
        classify(tmp_path / "empty")


def test_llama2c_generate_is_llama2c_greedy_200(capsys):
    capsys.readouterr()
    assert main(["generate", "--model", str(BIN), "--temperature", "0", "--max-new-tokens", "200"]) == 0
    out = capsys.readouterr()
    assert out.out.encode() == (STORIES / "expected_greedy_200.txt").read_bytes() + b"\n"
    assert "Traceback" not in out.err


def test_llama2c_chat_and_eval_ppl(capsys, monkeypatch):
    lines = iter(["Once upon a time", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    capsys.readouterr()
    assert main(["chat", "--model", str(BIN), "--temperature", "0", "--max-new-tokens", "16"]) == 0
    assert len(capsys.readouterr().out.strip()) > 10
    text = SHARED_DATA / "tinystories" / "tinystories_valid_head.txt"
    assert main(["eval", "ppl", "--model", str(BIN), str(text), "--max-tokens", "2048", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    # SOURCE.txt: validation cross-entropy ~1.81 nats/token, random init ~6.25
    assert res["loss"] < 2.2 and res["model"] == str(BIN)
    m = load_runnable(BIN)
    assert m.encode("Once")[0] == 1 and m.bos_convention.add_bos  # llama2.c: BOS (id 1) first


@pytest.mark.parametrize("argv", [["convert", str(BIN), "OUT", "--to", "onebit"],
                                  ["bench", "model", "--model", str(BIN)]])
def test_commands_that_need_a_ternary_model_say_what_to_do(argv, capsys, tmp_path):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "full-precision llama2.c model" in err and "onebit finetune --from" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
