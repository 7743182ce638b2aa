"""What a new user trips on (issue 15): defaults that fail, missing feedback, tracebacks instead of
one-line errors. Each test drives `onebit.cli.main` (or a subprocess) on the built-in model."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import onebit
from onebit.cli import main
from onebit.engine import default_model_path
from conftest import SHARED_DATA

BOOK = SHARED_DATA / "gutenberg" / "alice_in_wonderland.txt"
TOKENIZERS = SHARED_DATA / "tokenizers"


@pytest.fixture(scope="module")
def builtin():
    return onebit.load(default_model_path())


def _chat(monkeypatch, capsys, lines: list[str], *argv: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{x}\n" for x in lines)))
    capsys.readouterr()
    rc = main(["chat", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


# -- chat ---------------------------------------------------------------------------------------

def test_chat_defaults_survive_a_long_conversation(monkeypatch, capsys):
    """Default --max-new-tokens 256 = the built-in model's whole context: the first message used to
    fail, and later the conversation overflowed and chat exited. Now every message gets a reply,
    the oldest turns are dropped (said on stderr) and the system message stays."""
    msgs = ["Hello there", "How are you?", "Tell me a story", "More, please", "And then?", "Why?"]
    rc, out, err = _chat(monkeypatch, capsys, msgs, "--seed", "0", "--system", "Be brief.")
    assert rc == 0, err
    assert "error" not in err and "Traceback" not in err
    assert out.count("> ") >= len(msgs)  # a prompt per message (and the final one at EOF)
    assert "dropped the oldest" in err and "kept the system message" in err


def test_fit_chat_fits_the_reply_and_keeps_the_system_message(builtin):
    m, ctx = builtin, builtin.config.max_position_embeddings
    system = {"role": "system", "content": "You are terse."}
    turns = []
    for i in range(12):
        turns += [{"role": "user", "content": f"question {i} " + "word " * 20},
                  {"role": "assistant", "content": "answer " * 30}]
    fit = m.fit_chat([system, *turns, {"role": "user", "content": "last"}], 256)
    assert len(fit.ids) + fit.max_new_tokens <= ctx and fit.max_new_tokens >= ctx // 4
    assert fit.messages[0] == system and fit.messages[-1]["content"] == "last"
    assert fit.messages[1]["role"] == "user" and fit.dropped > 0
    assert fit.ids == m.chat_ids(fit.messages)
    short = m.fit_chat([{"role": "user", "content": "Hi"}], 256)
    assert short.dropped == 0 and short.max_new_tokens == ctx - len(short.ids)
    with pytest.raises(ValueError, match="shorten the message"):
        m.fit_chat([{"role": "user", "content": "word " * 400}], 256)


def test_chat_reply_never_starts_with_a_broken_character(builtin):
    """The template ends "Assistant: " and the trailing space became a lone space token, which the
    built-in model (trained on prose, where a space starts the next word's token) continued with a
    stray UTF-8 lead byte (a reply starting with U+FFFD) or a word fragment. Token healing: the
    prompt loses that token and the first one generated must start with it."""
    m = builtin
    msgs = [{"role": "user", "content": "Hello there"}]
    ids = m.chat_ids(msgs)
    healed, mask, text = m.heal(ids)
    assert healed == ids[:-1] and text == " " and m.tokenizer.id_to_token(ids[-1]) == "Ġ"
    assert mask[m.tokenizer.token_to_id("Ġthe")] and not mask[m.tokenizer.token_to_id("the")]
    starts = [m.chat(msgs, 3, seed=s)[:1] for s in range(100)]
    assert "\ufffd" not in starts  # 3 of these 100 seeds started with U+FFFD before
    assert not any(c.isspace() for c in starts if c)
    assert sum(c.isalpha() for c in starts) >= 80  # was 65: word fragments after the bare space
    assert m.heal([m.bos_id, 5, 6]) == ([m.bos_id, 5, 6], None, "")  # no trailing space: as is


@pytest.mark.parametrize("name, space", [("llama3", "Ġ"), ("llama2", "▁")])
def test_chat_healing_with_other_tokenizers(tmp_path, name, space):
    from tokenizers import Tokenizer

    from onebit.config import ModelConfig
    from onebit.engine.synth import write_random_model

    tok = Tokenizer.from_file(str(TOKENIZERS / name / "tokenizer.json"))
    V = tok.get_vocab_size()
    bos = tok.token_to_id("<|begin_of_text|>") or tok.token_to_id("<s>")
    eos = tok.token_to_id("<|end_of_text|>") or tok.token_to_id("</s>")
    cfg = ModelConfig.preset("tiny", vocab_size=V, hidden_size=32, intermediate_size=64,
                             bos_token_id=bos, eos_token_id=eos)
    folder = write_random_model(tmp_path / name, cfg)
    shutil.copy(TOKENIZERS / name / "tokenizer.json", folder / "tokenizer.json")
    m = onebit.load(folder)
    ids = m.chat_ids([{"role": "user", "content": "Hi"}])
    assert tok.id_to_token(ids[-1]) == space
    healed, mask, text = m.heal(ids)
    assert healed == ids[:-1] and text == " "
    first = list(m.generate_ids(healed, 1, temperature=0, stop_ids=(), first_allowed=mask))[0]
    assert tok.id_to_token(first).startswith(space)
    reply = "".join(m.stream(ids, 4, heal=True, temperature=0, stop_ids=()))
    assert reply and not reply[0].isspace()


def test_stream_text_keeps_the_space_between_prompt_and_completion():
    """SentencePiece (llama2) drops the leading space of the first token it decodes, so the new ids
    decoded alone printed "Once upona time"; decoded behind the prompt's tail they do not."""
    from tokenizers import Tokenizer

    from onebit.streaming import stream_text

    for name in ("llama2", "llama3", "gpt2"):
        tok = Tokenizer.from_file(str(TOKENIZERS / name / "tokenizer.json"))
        prompt = tok.encode("Once upon", add_special_tokens=False).ids
        new = tok.encode("Once upon a time, café", add_special_tokens=False).ids[len(prompt):]
        assert "".join(stream_text(tok, new, context=prompt)) == " a time, café", name


def test_chat_non_utf8_stdin_is_reported_and_the_chat_goes_on(monkeypatch, capsys):
    rc, out, err = _chat(monkeypatch, capsys, ["caf\udce9", "hi"], "--max-new-tokens", "4", "--seed", "1")
    assert rc == 0 and "Traceback" not in err
    assert "not UTF-8" in err and "b'\\xe9'" in err
    assert out.count("> ") == 3  # the bad line, "hi" (answered), EOF


# -- generate -------------------------------------------------------------------------------------

def test_generate_non_utf8_prompt_is_one_line(capsys):
    assert main(["generate", "caf\udce9", "--max-new-tokens", "3"]) == 2  # argv via surrogateescape
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not UTF-8" in err and "Traceback" not in err


def test_generate_zero_new_tokens_prints_no_nan(capsys):
    assert main(["generate", "Hi", "--max-new-tokens", "0"]) == 0
    out, err = capsys.readouterr()
    assert out == "Hi\n" and "nan" not in err and "0 generated" in err


def test_unknown_flag_shows_the_subcommand_usage(capsys):
    for argv, usage in ((["generate", "hi", "--bogus"], "usage: onebit generate"),
                        (["eval", "ppl", "x.txt", "--bogus"], "usage: onebit eval ppl"),
                        (["chat", "--bogus"], "usage: onebit chat")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and usage in err and "--bogus" in err, argv


def test_generate_pytorch_path_uses_one_thread_for_a_small_model(tmp_path, monkeypatch, capsys):
    """181 s vs 17 s for 60 tokens of the demo model: torch's default threads spin on a busy machine."""
    import torch

    from onebit.checkpoint import save_model
    from onebit.config import ModelConfig
    from onebit.model import CausalLM

    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny")
    tok_json = (TOKENIZERS / "tok512" / "tokenizer.json").read_text(encoding="utf-8")
    folder = save_model(tmp_path / "run", CausalLM(cfg), cfg, tok_json)
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    assert main(["generate", "--model", str(folder), "Once", "--max-new-tokens", "3"]) == 0
    assert calls == [1]
    calls.clear()
    assert main(["generate", "--model", str(folder), "Once", "--max-new-tokens", "3", "--threads", "2"]) == 0
    assert calls == [2]


# -- peak RSS -------------------------------------------------------------------------------------

_LAUNCHER = """
import json, os, subprocess, sys
p = subprocess.Popen([sys.executable, "-m", "onebit", *sys.argv[1:]], stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True)
out, err = p.stdout.read(), p.stderr.read()  # small outputs: no pipe deadlock
_, status, ru = os.wait4(p.pid, 0)
print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "out": out, "err": err,
                  "maxrss_mb": ru.ru_maxrss / 1024}))
"""


def _run_measured(argv: list[str]) -> tuple[str, str, float]:
    """Run `python -m onebit ARGV` as /usr/bin/time does from a shell: stdout, stderr and wait4's
    peak RSS in MB (the process, or a child it waited for if that one peaked higher). Launched
    from a small intermediate process because Linux carries a process's peak across fork + exec:
    started straight from this test process, the command's own ru_maxrss would start at pytest's
    (torch loaded, ~500 MB)."""
    r = subprocess.run([sys.executable, "-c", _LAUNCHER, *argv], capture_output=True, text=True,
                       timeout=300, check=True)
    res = json.loads(r.stdout)
    assert res["rc"] == 0, res["err"]
    return res["out"], res["err"], res["maxrss_mb"]


def test_bench_model_reports_the_real_peak_rss():
    """bench model took its RSS before the bandwidth probe's 512 MiB buffer (47 MB reported,
    573 MB by /usr/bin/time). The probe now runs in a child, and the report gives the process's
    real peak and the child's: the larger is what the OS measured."""
    out, _, measured = _run_measured(["bench", "model", "--json", "--pp", "32", "--tg", "8",
                                      "--reps", "1"])
    res = json.loads(out)
    assert res["probe_peak_rss_mb"] > 512 > 200 > res["peak_rss_mb"]  # the buffer is the child's
    assert max(res["peak_rss_mb"], res["probe_peak_rss_mb"]) == pytest.approx(measured, rel=0.05)


def test_generate_reports_the_real_peak_rss():
    _, err, measured = _run_measured(["generate", "Once", "--max-new-tokens", "8"])
    reported = float(re.search(r"peak RSS (\d+) MB", err).group(1))
    assert reported == pytest.approx(measured, rel=0.05)


# -- bench model ----------------------------------------------------------------------------------

def test_bench_model_defaults_fit_the_builtin_model(capsys):
    """Defaults --pp 128,512 --tg 128 needed 513 positions of the built-in model's 256."""
    assert main(["bench", "model", "--json", "--reps", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert list(res["pp"]) == ["128"] and res["tg"] == 128 and res["kv_context"] <= 256
    assert main(["bench", "model", "--pp", "512"]) == 2
    err = capsys.readouterr().err
    assert "--pp 512" in err and "256" in err and "Traceback" not in err


def test_fit_lengths():
    from onebit.benchmarks.model import fit_lengths

    assert fit_lengths(4096, None, None, []) == ([128, 512], 128)
    assert fit_lengths(256, None, None, []) == ([128], 128)
    assert fit_lengths(100, None, None, [50]) == ([49], 49)
    for args, flag in (((256, [300], None, []), "--pp 300"), ((256, None, 300, []), "--tg 300"),
                       ((256, None, 128, [200]), "--depth 200")):
        with pytest.raises(ValueError, match=flag):
            fit_lengths(*args)


# -- eval ppl -------------------------------------------------------------------------------------

def test_eval_ppl_defaults_to_the_builtin_model_with_progress(capsys):
    assert main(["eval", "ppl", str(BOOK), "--max-tokens", "512"]) == 0
    out, err = capsys.readouterr()
    assert "models/default" in out and "over 512 tokens" in out
    assert re.search(r"\[onebit\] eval: 512/512 tokens, [\d,]+ tok/s", err)


@pytest.mark.parametrize("flag, value", [("--seq-len", "0"), ("--max-tokens", "0"),
                                         ("--max-tokens", "-5"), ("--seq-len", "-1")])
def test_eval_ppl_rejects_non_positive_sizes(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "ppl", str(BOOK), flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}: {value} must be >= 1" in err


def test_eval_ppl_refuses_binary_and_non_utf8_files(tmp_path, capsys):
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(range(256)) * 4)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Once upon a time in a café.\n".encode("latin-1") * 20)
    for f, needle in ((binary, "binary file"), (latin1, "not UTF-8 text (byte 0xe9 at offset 25")):
        assert main(["eval", "ppl", str(f)]) == 2
        err = capsys.readouterr().err
        assert str(f) in err and needle in err and "Traceback" not in err


def test_eval_ppl_tokenizes_only_what_max_tokens_needs(builtin):
    """--max-tokens 512 tokenized every file whole first; now reading stops once enough tokens
    are there, with the same ids as tokenizing everything."""
    from onebit.data import corpus_tokens

    class Counting:  # tokenizers.Tokenizer is a Rust class: count through a wrapper
        def __init__(self, tok):
            self.tok, self.chars = tok, 0

        def encode(self, text, add_special_tokens=True):
            self.chars += len(text)
            return self.tok.encode(text, add_special_tokens=add_special_tokens)

    files = [BOOK, SHARED_DATA / "gutenberg" / "moby_dick.txt"]
    full_tok = Counting(builtin.tokenizer)
    full = corpus_tokens(files, full_tok, 0, 1)
    for n in (1, 513, 5000, len(full) - 1):
        part_tok = Counting(builtin.tokenizer)
        part = corpus_tokens(files, part_tok, 0, 1, max_tokens=n)
        assert np.array_equal(part, full[:n])
        if n < 10_000:
            assert part_tok.chars < full_tok.chars / 20


def test_eval_ppl_on_the_engine_imports_no_torch(tmp_path):
    code = ("import sys; from onebit.cli import main; "
            f"assert main(['eval', 'ppl', {str(BOOK)!r}, '--max-tokens', '256', '--json']) == 0; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["tokens"] == 256


# -- train ----------------------------------------------------------------------------------------

def test_train_and_finetune_help_list_the_section_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for line in ("--train.steps=INT  default 1000", "--model.hidden_act={relu2,silu}  default relu2",
                 "--data.tokenizer=STR  default bpe:8192", "--train.lr=FLOAT|none  default None",
                 "--model.preset=NAME"):
        assert line in out, line
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    out = capsys.readouterr().out
    assert "--train.lr=FLOAT|none  default 0.0001" in out  # finetune's own defaults
    assert "--finetune.lambda_schedule={linear,exponential,sigmoid,none}  default linear" in out
    assert "--model." not in out  # the architecture comes from --from


def test_train_type_error_names_the_section_flag(capsys):
    assert main(["train", "--train.steps=abc"]) == 2
    err = capsys.readouterr().err
    assert "--train.steps=" in err and " --steps=" not in err


def test_train_says_what_it_does_before_the_first_step(tmp_path, capsys):
    """~60 s of silence while the tokenizer trained on the corpus."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = BOOK.read_text(encoding="utf-8")[:60_000]
    for i in range(3):
        (corpus / f"p{i}.txt").write_text(text[i * 20_000:(i + 1) * 20_000], encoding="utf-8")
    argv = ["train", "--model.preset=tiny", "--model.max_position_embeddings=64",
            f"--data.paths={corpus}", "--data.tokenizer=bpe:300", "--data.seq_len=32",
            "--data.val_fraction=0.34", f"--data.cache_dir={tmp_path / 'cache'}",
            "--train.steps=1", "--train.batch_size=2", "--train.eval_every=1",
            "--train.eval_tokens=64", "--train.progress=false", "--train.tensorboard=false",
            "--train.threads=1"]
    assert main(argv + [f"--train.out_dir={tmp_path / 'a'}"]) == 0
    err = capsys.readouterr().err
    for needle in ("reading the corpus", "training a byte-level BPE tokenizer (300 tokens)",
                   "tokenizer trained in", "tokenized 2/2 train documents", "token cache written"):
        assert needle in err, needle
    assert main(argv + [f"--train.out_dir={tmp_path / 'b'}"]) == 0
    assert "reusing the token cache" in capsys.readouterr().err


def test_random_model_writer_reports_its_peak(tmp_path, monkeypatch):
    """`bench model --shape` writes the model in a child (~6 GB for 2B4T): its peak is reported
    beside the process's, not lost (here on the tiny preset)."""
    from onebit.benchmarks import model as bench

    monkeypatch.setitem(bench.SHAPES, "tiny", "tiny")
    info: dict = {}
    folder = bench.model_for_shape("tiny", "i2", "i8", tmp_path, info)
    assert (folder / "model.safetensors").is_file() and info["writer_peak_rss_mb"] > 10
    again: dict = {}
    assert bench.model_for_shape("tiny", "i2", "i8", tmp_path, again) == folder and again == {}


def test_generate_into_a_closed_pipe_stops_quietly():
    """`onebit generate ... | head -c 20`: the reader leaves early; no BrokenPipeError traceback."""
    p = subprocess.Popen([sys.executable, "-m", "onebit", "generate", "Once upon", "--seed", "1",
                          "--max-new-tokens", "200", "--quiet"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.read(20)
    p.stdout.close()  # as head does after its 20 bytes
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) in (0, 141), err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
