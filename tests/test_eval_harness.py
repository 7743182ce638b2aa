"""The lm-evaluation-harness plugin: on one tiny model and a few items of every task,
`onebit eval tasks`, `lm_eval --model onebit` (onebit-lm-eval) and lm-eval's own `hf` backend on
the model exported with `onebit convert --to hf` score the same; loglikelihood_rolling and
generate_until against the engine; the task YAMLs read the local files (offline)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys

import numpy as np
import pytest

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # transformers' bitnet code is @torch.compile'd

import lm_eval  # noqa: E402  (the dev extra installs it: it is the oracle here)
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import onebit  # noqa: E402
from onebit.eval import TASKS, evaluate_tasks, load_scorer, reference_loglikelihoods  # noqa: E402
from onebit.eval.harness import TASKS_PATH, OnebitLM, main, register  # noqa: E402
from conftest import SHARED_DATA  # noqa: E402
from eval_fixtures import tiny_model  # noqa: E402

EVAL = SHARED_DATA / "eval"
LIMIT = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny"), hf=True)


@pytest.fixture(scope="module")
def task_manager():
    register()
    # only the onebit folder: indexing lm-eval's thousands of task files costs ~10 s
    return TaskManager(include_path=str(TASKS_PATH), include_defaults=False,
                       metadata={"data_dir": str(EVAL)})


def _lm_eval(model, model_args, task_manager) -> dict:
    return lm_eval.simple_evaluate(model=model, model_args=model_args,
                                   tasks=[f"onebit_{t}" for t in TASKS], task_manager=task_manager,
                                   limit=LIMIT, log_samples=True, batch_size=16, device="cpu")


def _lls(res: dict, task: str) -> list[list[float]]:
    docs = sorted(res["samples"][f"onebit_{task}"], key=lambda s: s["doc_id"])
    return [[float(r[0][0]) for r in s["resps"]] for s in docs]


def test_onebit_eval_tasks_lm_eval_onebit_and_lm_eval_hf_agree(tiny, task_manager):
    ours = evaluate_tasks(load_scorer(tiny["packed"]), "all", limit=LIMIT, data_dir=EVAL,
                          show_progress=False, keep_samples=True)
    plugin = _lm_eval("onebit", f"pretrained={tiny['packed']}", task_manager)
    hf = _lm_eval("hf", f"pretrained={tiny['hf']},dtype=float32,add_bos_token=True", task_manager)
    for task, spec in TASKS.items():
        mine = [s["lls"] for s in ours["tasks"][task]["samples"]]
        # the plugin: lm-eval's own request building and token split, the same engine scorer
        assert _lls(plugin, task) == mine, task
        for metric in spec.metrics:
            assert plugin["results"][f"onebit_{task}"][f"{metric},none"] == ours["tasks"][task][metric]
        # transformers' BitNet on the HF export: same choices but for float ties (its bf16-free
        # float32 forward differs from the engine by summation order and INT8 rounding ties)
        theirs = _lls(hf, task)
        for a, b in zip(mine, theirs, strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=0.15)
            if int(np.argmax(a)) != int(np.argmax(b)):
                assert abs(a[int(np.argmax(a))] - a[int(np.argmax(b))]) <= 0.15, (task, a, b)


def test_loglikelihood_rolling_and_generate_until(tiny):
    lm = OnebitLM(pretrained=str(tiny["packed"]))
    m = lm.model
    short = "Once upon a time there was a fox."
    long_ = " ".join(["the fox ran over the old log by the river"] * 40)   # > 256 tokens
    ids_long = m.encode(long_, add_bos=False)
    assert len(ids_long) > m.config.max_position_embeddings
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), 0)
                                    for t in (short, long_)], disable_tqdm=True)
    ids = m.encode(short, add_bos=False)
    want_short = reference_loglikelihoods(m, [([m.bos_id], ids)])[0][0]
    # the long text: lm-eval's disjoint windows (the first after BOS, then L tokens at a time
    # with the L + 1 - n tokens before them as context), each scored alone by the reference
    L = m.config.max_position_embeddings
    windows = [([m.bos_id], ids_long[:L])]
    for e in range(L, len(ids_long), L):
        n = min(L, len(ids_long) - e)
        windows.append((ids_long[e + n - L - 1:e], ids_long[e:e + n]))
    want_long = sum(r[0] for r in reference_loglikelihoods(m, windows))
    np.testing.assert_allclose(got, [want_short, want_long], rtol=1e-6)

    # generation: greedy, cut before the first `until` string (taken from the middle of the
    # greedy text itself, so the cut happens), at most max_gen_toks tokens
    prompts = ["Once upon a time", "The fox"]
    greedy = [m.decode(list(m.generate_ids(m.encode(p), 8, temperature=0))) for p in prompts]
    stops = [g[len(g) // 2:len(g) // 2 + 2] for g in greedy]
    assert all(len(s) == 2 for s in stops)
    reqs = [Instance("generate_until", {}, (p, {"until": [s], "max_gen_toks": 8}), 0)
            for p, s in zip(prompts, stops)]
    reqs.append(Instance("generate_until", {}, (prompts[0], {"until": ["\x00"], "max_gen_toks": 3}), 0))
    out = lm.generate_until(reqs, disable_tqdm=True)
    assert out[:2] == [g[:g.find(s)] for g, s in zip(greedy, stops)]
    assert out[2] == m.decode(list(m.generate_ids(m.encode(prompts[0]), 3, temperature=0)))


def test_onebit_lm_eval_command_line(monkeypatch):
    """`onebit-lm-eval ARGS` = lm-eval's own CLI on ARGS with --model onebit registered and the
    onebit task folder as --include_path (a given one is kept: lm-eval takes one path)."""
    import lm_eval.__main__ as lm_main
    from lm_eval.api.registry import get_model

    seen = []
    monkeypatch.setattr(lm_main, "cli_evaluate", lambda: seen.append(list(sys.argv)))
    main(["--model", "onebit", "--tasks", "onebit_boolq"])
    main(["run", "--model", "hf", "--include_path", "/mine", "--tasks", "x"])
    main(["--help"])
    assert seen == [["lm-eval", "--model", "onebit", "--tasks", "onebit_boolq", "--include_path",
                     str(TASKS_PATH)],
                    ["lm-eval", "run", "--model", "hf", "--include_path", "/mine", "--tasks", "x"],
                    ["lm-eval", "--help"]]
    assert get_model("onebit") is OnebitLM and get_model("hf").__name__ == "HFLM"


def test_task_data_folder_from_metadata(tiny, tmp_path):
    """The YAMLs read the folder given as --metadata data_dir (one hand-written BoolQ record)."""
    (tmp_path / "boolq").mkdir()
    rec = {"instruction": "Please answer the following question with true or false, question: is "
                          "the sky blue?\n\nAnswer format: true/false", "input": "",
           "output": "the correct answer is true", "answer": "true"}
    (tmp_path / "boolq" / "test.json").write_text(json.dumps([rec]))
    tm = TaskManager(include_path=str(TASKS_PATH), include_defaults=False,
                     metadata={"data_dir": str(tmp_path)})
    task = tm.load(["onebit_boolq"])["tasks"]["onebit_boolq"]
    docs = list(task.test_docs())
    assert docs == [{"query": "Question: is the sky blue?\nAnswer:", "choices": ["no", "yes"],
                     "gold": 1}]


def test_entry_point_names_the_model_class():
    eps = importlib.metadata.entry_points(group="lm_eval.models")
    assert [e.load() for e in eps if e.name == "onebit"] == [OnebitLM]


def test_lm_eval_local_completions_against_onebit_serve_agrees(tiny, task_manager):
    """lm-eval's `local-completions` backend (token-id prompts, echo + prompt logprobs, 16 prompts
    per request) against `onebit serve` scores every choice as `onebit eval tasks` does; and its
    remote-tokenizer mode finds the server's vLLM-style /tokenizer_info + /tokenize."""
    pytest.importorskip("fastapi", reason="onebit serve needs fastapi (pip install 'onebit[serve]')")
    import httpx
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    from serve_util import start_server, stop_server

    proc, url = start_server("--model", str(tiny["packed"]), "--parallel", "4")
    try:
        name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        # the tokenizer: the HF export's (transformers' AutoTokenizer), BOS added as the model's
        # convention says, as for the hf backend above
        res = _lm_eval("local-completions",
                       f"base_url={url}/v1/completions,model={name},tokenizer_backend=huggingface,"
                       f"tokenizer={tiny['hf']},add_bos_token=True,max_length=256,max_retries=1,"
                       f"num_concurrent=1", task_manager)
        ours = evaluate_tasks(load_scorer(tiny["packed"]), "all", limit=LIMIT, data_dir=EVAL,
                              show_progress=False, keep_samples=True)
        for task, spec in TASKS.items():
            mine = [s["lls"] for s in ours["tasks"][task]["samples"]]
            theirs = _lls(res, task)
            # the same engine, tokens and per-token logprobs; lm-eval sums the continuation's
            # token logprobs itself, in its own order (measured: <= 1.2e-13 apart)
            np.testing.assert_allclose(theirs, mine, rtol=0, atol=1e-9, err_msg=task)
            assert [int(np.argmax(a)) for a in theirs] == [int(np.argmax(a)) for a in mine], task
            for metric in spec.metrics:
                assert res["results"][f"onebit_{task}"][f"{metric},none"] == ours["tasks"][task][metric]

        # no local tokenizer at all: lm-eval's auto mode detects the server's tokenizer endpoints
        assert check_remote_tokenizer_support(url + "/v1/completions")
        m = onebit.load(tiny["packed"])
        rt = RemoteTokenizer(url + "/v1/completions")
        text = "Once upon a time there was a fox."
        assert rt.encode(text) == m.encode(text, add_bos=False)
        assert rt.decode(m.encode(text, add_bos=False)) == text
        assert (rt.bos_token_id, rt.eos_token_id) == (m.bos_id, m.eos_id)
        assert rt.tokenizer_info["model_max_length"] == 256
    finally:
        stop_server(proc)
