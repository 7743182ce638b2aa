"""`onebit eval tasks`: lm-eval's prompts and metrics on the local task files, the batched engine
scorer against the one-forward-per-request reference, the PyTorch backend against the engine,
and the errors a user meets (unknown task, missing or malformed data)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import onebit
from onebit.cli import main
from onebit.eval import (TASKS, EvalDataError, Item, Scorer, encode_pair, evaluate_tasks, items,
                         load_docs, load_scorer, loglikelihoods, mean_stderr,
                         reference_loglikelihoods, resolve_tasks)
from onebit.eval import tasks as tasks_mod
from onebit.eval.score import token_encoder
from onebit.engine import Runtime
from conftest import SHARED_DATA
from eval_fixtures import tiny_model

EVAL = SHARED_DATA / "eval"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny"))


def assert_same_choices(a: list[dict], b: list[dict], tol: float) -> None:
    """The same log-likelihoods to ``tol`` nats, and the same pred / pred_norm on every item but
    float ties: where the two differ, both runs score the two choices within ``tol``."""
    for sa, sb in zip(a, b, strict=True):
        np.testing.assert_allclose(sa["lls"], sb["lls"], rtol=0, atol=tol)
        for key in ("pred", "pred_norm"):
            if sa[key] != sb[key]:
                for s in (sa, sb):
                    lls = np.asarray(s["lls"])
                    if key == "pred_norm":
                        lls = lls / np.asarray(s["choice_chars"])
                    assert abs(lls[sa[key]] - lls[sb[key]]) <= tol, (key, sa, sb)


# -- prompts, as lm-eval's task YAMLs write them ---------------------------------------------

def test_prompts_follow_lm_eval_formats():
    arc = items("arc_easy", EVAL, limit=1)[0]
    assert arc.requests()[0] == ("Question: Which statement best explains why photosynthesis is the "
                                 "foundation of most food webs?\nAnswer:",
                                 " Sunlight is the source of energy for nearly all ecosystems.")
    assert arc.gold == 0 and len(arc.choices) == 4
    obqa = items("openbookqa", EVAL, limit=1)[0]      # question_stem alone
    assert obqa.contexts[0].startswith("A person wants") and obqa.continuations[1] == " quit eating lunch out"
    piqa = items("piqa", EVAL, limit=1)[0]
    assert piqa.contexts[0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    wino = items("winogrande", EVAL, limit=1)[0]      # partial scoring: choice fills the blank
    assert wino.requests() == [("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
                               ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.")]
    assert wino.gold == 1 and wino.choices == tuple(c for c, _ in wino.requests())
    boolq = items("boolq", EVAL, limit=1)[0]          # lm-eval's prompt minus the passage
    assert boolq.requests() == [("Question: does ethanol take more energy make that produces?\nAnswer:", " no"),
                                ("Question: does ethanol take more energy make that produces?\nAnswer:", " yes")]
    assert boolq.gold == 0
    hs = items("hellaswag", EVAL, limit=1)[0]
    assert hs.contexts == ("Roof shingle removal: A man is sitting on a roof. he",) and hs.gold == 3
    from lm_eval.tasks.hellaswag.utils import preprocess   # lm-eval's own, the oracle
    for text in ("  [header] How to x [title] Do y.  [step] z ", hs.contexts[0], "a  b [x] c"):
        assert tasks_mod._hellaswag_preprocess(text) == preprocess(text)


def test_every_task_loads_with_limit_and_counts():
    full = {"arc_easy": 2376, "arc_challenge": 1172, "openbookqa": 500, "piqa": 1838, "winogrande": 1267}
    for name in TASKS:
        docs = load_docs(name, EVAL, limit=5)
        assert len(docs) == 5
    for name, n in full.items():
        assert len(load_docs(name, EVAL)) == n


# -- metrics ----------------------------------------------------------------------------------

class FixedScorer(Scorer):
    """Log-likelihoods given per continuation text: tests the metric arithmetic alone."""

    def __init__(self, table: dict[str, float]):
        super().__init__("fixed", "test", lambda s: [0] + [ord(c) for c in s], 0,
                         lambda reqs, progress=None: [(table[self._text(c)], False) for _, c in reqs], {})

    @staticmethod
    def _text(ids):
        return "".join(chr(i) for i in ids)


def test_acc_norm_divides_by_choice_characters_and_stderr_is_lm_evals():
    from onebit.eval.run import score_items

    # choice "a" (1 char) ll -1, "bbbb" (4 chars) ll -3: acc picks "a"; acc_norm "bbbb" (-0.75 >
    # -1), where dividing by the continuations' lengths (" a", " bbbb") would pick "a" (-0.5 > -0.6)
    scorer = FixedScorer({" a": -1.0, " bbbb": -3.0})
    it = Item(("Q",), (" a", " bbbb"), ("a", "bbbb"), 1)
    (s,) = score_items(scorer, [it])
    assert (s["pred"], s["acc"], s["pred_norm"], s["acc_norm"]) == (0, 0.0, 1, 1.0)
    xs = [1.0, 0.0, 1.0, 1.0, 0.0]
    # lm-eval's mean_stderr: sqrt(sum((x - mean)^2) / (n - 1)) / sqrt(n)
    mu = sum(xs) / 5
    assert mean_stderr(xs) == pytest.approx(math.sqrt(sum((x - mu) ** 2 for x in xs) / 4) / math.sqrt(5))
    assert mean_stderr([1.0]) is None


def test_encode_pair_is_lm_evals_split():
    enc = lambda s: [9] + [ord(c) for c in s]  # noqa: E731  (a BOS, then one id per character)
    assert encode_pair(enc, "ab ", "c", 9) == ([9, ord("a"), ord("b")], [ord(" "), ord("c")])
    assert encode_pair(enc, "", "c", 9) == ([9], [ord("c")])      # empty context: the prefix id


# -- the engine scorer --------------------------------------------------------------------------

def test_forward_seqs_and_copy_slot_equal_single_forwards(tiny):
    rt = Runtime(tiny["packed"])
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 512, n) for n in (7, 1, 13, 2)]
    rt.reset(40, slots=5)
    got = rt.forward_seqs(seqs, [0] * 4, [4, 0, 2, 1], [True, False, True, True])
    for s, g, all_rows in zip(seqs, got, [True, False, True, True]):
        rt.reset(40, slots=1)
        want = rt.forward(s, 0, last_only=not all_rows)
        assert np.array_equal(g, want)          # batched rows are bit-identical to one sequence
    rt.reset(40, slots=3)                        # a context in slot 0, continued in slot 2
    rt.forward_seqs([seqs[2][:9]], [0], [0])
    rt.copy_slot(0, 2, 9)
    cont = rt.forward_seqs([seqs[2][9:]], [9], [2], [True])[0]
    rt.reset(40, slots=1)
    rt.forward(seqs[2][:9], 0)
    assert np.array_equal(cont, rt.forward(seqs[2][9:], 9, last_only=False))
    with pytest.raises(ValueError, match="distinct slot"):
        rt.forward_seqs([seqs[0], seqs[1]], [0, 0], [1, 1])


@pytest.mark.parametrize("budget", [None, 1])  # default: many slots; 1 byte: a single slot
def test_batched_loglikelihoods_equal_reference(tiny, budget):
    m = onebit.load(tiny["packed"])
    reqs = []
    for name in ("hellaswag", "winogrande", "arc_challenge", "boolq"):
        for it in items(name, EVAL, limit=4):
            reqs += [encode_pair(m.encode, c, x, m.bos_id) for c, x in it.requests()]
    long_ctx = list(range(3, 300))                  # past the context of 256: left-truncated
    reqs += [(long_ctx, [5, 6, 7]), ([m.bos_id], [4]), ([m.bos_id], [4])]   # and a duplicate
    kw = {} if budget is None else {"kv_budget": budget}
    got = loglikelihoods(m, reqs, **kw)
    want = reference_loglikelihoods(m, reqs)
    assert len(got) == len(reqs)
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=0, atol=2e-3)
    assert [g[1] for g in got] == [w[1] for w in want]
    with pytest.raises(ValueError, match="continuation"):
        loglikelihoods(m, [([1], [])])


def test_quantized_kv_cache_contexts_are_copied_whole(tiny):
    """With a 4-bit KV cache a slot is copied as one block (copy_slot); scores still equal the
    one-forward reference on the same cache type."""
    m = onebit.load(tiny["packed"], kv_bits=4)
    reqs = [encode_pair(m.encode, c, x, m.bos_id)
            for it in items("hellaswag", EVAL, limit=3) for c, x in it.requests()]
    got, want = loglikelihoods(m, reqs), reference_loglikelihoods(m, reqs)
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=0, atol=2e-3)


def test_torch_backend_gives_the_engines_numbers(tiny):
    engine = evaluate_tasks(load_scorer(tiny["packed"]), "all", limit=6, data_dir=EVAL,
                            show_progress=False, keep_samples=True)
    torch_ = evaluate_tasks(load_scorer(tiny["run"], "torch"), "all", limit=6, data_dir=EVAL,
                            show_progress=False, keep_samples=True)
    for name in TASKS:
        assert_same_choices(engine["tasks"][name]["samples"], torch_["tasks"][name]["samples"], 0.15)


def test_torch_encoder_is_the_engines_encode(tiny):
    m = onebit.load(tiny["packed"])
    enc = token_encoder(m.tokenizer, m.bos_id)
    for text in ("Question: why?\nAnswer:", " yes", "", "Sarah was a much better surgeon"):
        assert enc(text) == m.encode(text)


# -- report, CLI, errors --------------------------------------------------------------------------

def test_cli_json_report(tiny, capsys):
    rc = main(["eval", "tasks", "--model", str(tiny["packed"]), "--tasks", "boolq,piqa", "--limit",
               "3", "--json", "--data-dir", str(EVAL)])
    out, err = capsys.readouterr()
    assert rc == 0
    rep = json.loads(out)
    assert rep["model"] == str(tiny["packed"]) and rep["backend"] == "engine"
    assert list(rep["tasks"]) == ["boolq", "piqa"]
    b = rep["tasks"]["boolq"]
    assert b["items"] == 3 and b["version"] == 2.0 and "passage" in b["note"] and "acc_norm" not in b
    assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "items_per_s", "sha256"} <= set(rep["tasks"]["piqa"])
    assert "items/s" in err                               # the progress line
    rc = main(["eval", "tasks", "--model", str(tiny["run"]), "--tasks", "boolq", "--limit", "2",
               "--quiet", "--data-dir", str(EVAL)])       # a training folder: PyTorch (auto)
    assert rc == 0 and "(torch)" in capsys.readouterr().out


def test_unknown_task_lists_the_known_ones(capsys):
    assert main(["eval", "tasks", "--tasks", "arc_easy,lambada"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'lambada'" in err and "hellaswag" in err and "Traceback" not in err
    with pytest.raises(EvalDataError, match="known tasks"):
        resolve_tasks("")


def test_missing_eval_folder_says_where_it_looks(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(tasks_mod.ENV_DATA, raising=False)
    monkeypatch.setattr(tasks_mod, "_default_dirs", lambda: [tmp_path / "a" / "eval", tmp_path / "b"])
    with pytest.raises(EvalDataError) as e:
        tasks_mod.find_data_dir()
    assert str(tmp_path / "a" / "eval") in str(e.value) and "--data-dir" in str(e.value)
    assert main(["eval", "tasks", "--tasks", "piqa", "--data-dir", str(tmp_path / "nope")]) == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err
    monkeypatch.setenv(tasks_mod.ENV_DATA, str(tmp_path / "unset"))
    with pytest.raises(EvalDataError, match="ONEBIT_EVAL_DATA"):
        tasks_mod.find_data_dir()


def test_malformed_task_files_name_the_file_and_record(tmp_path):
    (tmp_path / "piqa").mkdir()
    good = json.dumps({"question": "q", "choices": ["a", "b"], "label": 0})
    (tmp_path / "piqa" / "piqa.jsonl").write_text(good + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(EvalDataError, match=r"piqa.jsonl' record 2 is malformed"):
        load_docs("piqa", tmp_path)
    assert len(load_docs("piqa", tmp_path, limit=1)) == 1   # --limit reads only what it needs
    (tmp_path / "piqa" / "piqa.jsonl").write_text(json.dumps({"question": "q", "choices": ["a"],
                                                              "label": 3}))
    with pytest.raises(EvalDataError, match="label 3"):
        load_docs("piqa", tmp_path)
    (tmp_path / "piqa" / "piqa.jsonl").write_bytes(b"\xff{")
    with pytest.raises(EvalDataError, match="not valid JSON"):
        load_docs("piqa", tmp_path)
    with pytest.raises(EvalDataError, match="boolq/test.json' is missing"):
        load_docs("boolq", tmp_path)
