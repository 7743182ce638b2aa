"""The zero-shot tasks of the BitNet papers, read from local files, prompted as lm-eval prompts them.

Each task turns one line of its file into a doc (the fields lm-eval's own task reads) and each doc
into an ``Item``: the context(s), the continuations to score and the gold index. The prompt
formats and metrics are those of lm-evaluation-harness 0.4 (lm_eval/tasks/<task>/*.yaml):

    arc_easy, arc_challenge  "Question: {question}\\nAnswer:"  + " {choice}"        acc, acc_norm
    openbookqa               "{question_stem}"                  + " {choice}"        acc, acc_norm
    piqa                     "Question: {goal}\\nAnswer:"       + " {sol}"           acc, acc_norm
    hellaswag                "{activity_label}: {ctx}"          + " {ending}"        acc, acc_norm
    winogrande               "{sentence up to _}{option}"       + " {rest after _}"  acc
    boolq                    "Question: {question}?\\nAnswer:"  + " no" / " yes"     acc

The data (``../shared/data/eval``, its SOURCE.txt) differs from lm-eval's downloads in two
places, recorded in each task's ``note`` and in every report: BoolQ has no passage (lm-eval's
prompt starts with it), and HellaSwag's context is stored joined, so lm-eval's capitalisation of
``ctx_b`` (the fragment after the last full sentence) cannot be reproduced. The lm-eval plugin
(``onebit.eval.harness``) reads docs through these same functions, so both paths see one prompt.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TASKS", "TaskSpec", "Item", "EvalDataError", "find_data_dir", "load_docs", "items",
           "resolve_tasks", "doc_to_item"]

ENV_DATA = "ONEBIT_EVAL_DATA"


class EvalDataError(ValueError):
    """An evaluation data folder or file is missing or malformed, or a task name is unknown."""


@dataclass(frozen=True)
class TaskSpec:
    name: str                  # lm-eval's task name
    path: str                  # file under the eval data folder
    version: float             # metadata.version of the lm-eval task whose prompt we follow
    metrics: tuple[str, ...]   # lm-eval's metric_list
    note: str = ""             # how the local data differs from lm-eval's


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("arc_easy", "arc-easy/arc-easy.jsonl", 1.0, ("acc", "acc_norm"),
             "ARC-Easy test split (2,376), LLM-Adapters packaging"),
    TaskSpec("arc_challenge", "arc-challenge/arc-challenge.jsonl", 1.0, ("acc", "acc_norm"),
             "ARC-Challenge test split (1,172), LLM-Adapters packaging"),
    TaskSpec("hellaswag", "hellaswag/hellaswag_val.jsonl", 1.0, ("acc", "acc_norm"),
             "validation (10,042); context stored joined: lm-eval's ctx_b.capitalize() not applied"),
    TaskSpec("piqa", "piqa/piqa.jsonl", 1.0, ("acc", "acc_norm"), "validation (1,838)"),
    TaskSpec("winogrande", "winogrande/winogrande.jsonl", 1.0, ("acc",),
             "winogrande_1.1 dev (1,267), lm-eval's partial scoring"),
    TaskSpec("boolq", "boolq/test.json", 2.0, ("acc",),
             "validation (3,270) WITHOUT the passage (the local copy has none): not standard BoolQ"),
    TaskSpec("openbookqa", "openbookqa/openbookqa.jsonl", 1.0, ("acc", "acc_norm"),
             "test split (500)"),
)}


@dataclass(frozen=True)
class Item:
    """One doc as log-likelihood requests: ``contexts`` has one entry shared by every
    continuation, or one per choice (winogrande: the choice fills the blank, the continuation is
    the rest of the sentence). ``choices`` are lm-eval's doc_to_choice strings (acc_norm divides
    each log-likelihood by their length in characters)."""
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    choices: tuple[str, ...]
    gold: int

    def requests(self) -> list[tuple[str, str]]:
        n = len(self.choices)
        ctx = self.contexts if len(self.contexts) == n else self.contexts * n
        cont = self.continuations if len(self.continuations) == n else self.continuations * n
        return list(zip(ctx, cont))


def find_data_dir(data_dir: str | Path | None = None) -> Path:
    """The eval data folder: ``data_dir``, else $ONEBIT_EVAL_DATA, else ``shared/data/eval`` beside
    the current folder (or in it) or beside this checkout. Raises EvalDataError naming the places
    looked."""
    if data_dir is not None:
        p = Path(data_dir)
        if not p.is_dir():
            raise EvalDataError(f"eval data folder '{p}' does not exist; pass the folder holding "
                                f"arc-easy/, hellaswag/, ... (../shared/data/eval in this project)")
        return p
    if os.environ.get(ENV_DATA):
        p = Path(os.environ[ENV_DATA])
        if not p.is_dir():
            raise EvalDataError(f"${ENV_DATA}={p} is not a folder; point it at the eval data "
                                f"folder (arc-easy/, hellaswag/, ...) or unset it")
        return p
    looked = []
    for p in _default_dirs():
        if p.is_dir():
            return p
        looked.append(str(p))
    raise EvalDataError("no eval data folder found (looked in " + ", ".join(dict.fromkeys(looked))
                        + f"); pass --data-dir DIR or set {ENV_DATA} to the folder holding "
                        f"arc-easy/, hellaswag/, ... (see its SOURCE.txt)")


def _default_dirs() -> list[Path]:
    repo = Path(__file__).resolve().parents[3]   # src/onebit/eval/tasks.py -> the checkout
    return [Path.cwd().parent / "shared" / "data" / "eval", Path.cwd() / "shared" / "data" / "eval",
            repo.parent / "shared" / "data" / "eval"]


def resolve_tasks(names: str | list[str]) -> list[TaskSpec]:
    """Task specs for a comma-separated string or list of names ("all": the seven)."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise EvalDataError(f"no task given; known tasks: {', '.join(TASKS)}")
    if names == ["all"]:
        return list(TASKS.values())
    bad = [n for n in names if n not in TASKS]
    if bad:
        raise EvalDataError(f"unknown task{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))}; "
                            f"known tasks: {', '.join(TASKS)} (or 'all')")
    return [TASKS[n] for n in dict.fromkeys(names)]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- reading the files: one doc per line, in lm-eval's field names --------------------------------

_BOOLQ = re.compile(r"^Please answer the following question with true or false, question: (.*)"
                    r"\n\nAnswer format: true/false$", re.S)


def _doc(task: str, raw: dict) -> dict:
    """One record of the local file -> the doc lm-eval's task would see (KeyError/TypeError/
    ValueError on a malformed record)."""
    if task == "boolq":  # LLM-Adapters instruction text; answer "true"/"false"
        m = _BOOLQ.match(raw["instruction"])
        if not m or raw["answer"] not in ("true", "false"):
            raise ValueError("not a BoolQ instruction record")
        return {"question": m.group(1).strip().rstrip("?"), "label": int(raw["answer"] == "true")}
    if task == "hellaswag":
        endings, label = [str(e) for e in raw["endings"]], int(raw["label"])
        doc = {"query": _hellaswag_preprocess(raw["context"]),
               "choices": [_hellaswag_preprocess(e) for e in endings], "gold": label}
    elif task == "winogrande":
        sentence, (o1, o2) = str(raw["question"]), raw["choices"]
        if "_" not in sentence:
            raise ValueError("the sentence has no '_' blank")
        return {"sentence": sentence, "option1": str(o1), "option2": str(o2),
                "answer": str(int(raw["label"]) + 1)}
    else:
        q, choices = str(raw["question"]), [str(c) for c in raw["choices"]]
        query = q if task == "openbookqa" else f"Question: {q}\nAnswer:"
        doc = {"query": query, "choices": choices, "gold": int(raw["label"])}
    if not 0 <= doc["gold"] < len(doc["choices"]):
        raise ValueError(f"label {doc['gold']} is not one of the {len(doc['choices'])} choices")
    return doc


def _hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag ``preprocess`` (WikiHow bracket artifacts, double spaces)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def load_docs(task: str | TaskSpec, data_dir: str | Path | None = None,
              limit: int | None = None) -> list[dict]:
    """The first ``limit`` (default all) docs of ``task``, in file order (lm-eval's --limit)."""
    spec = TASKS[task] if isinstance(task, str) else task
    path = find_data_dir(data_dir) / spec.path
    if not path.is_file():
        raise EvalDataError(f"'{path}' is missing: the eval data folder lacks {spec.name}; see "
                            f"its SOURCE.txt for the files each task reads")
    if limit is not None and (isinstance(limit, bool) or limit < 1):
        raise EvalDataError(f"limit={limit!r} must be a positive integer (or None: all)")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            records = json.loads(text)
            lines = list(enumerate(records, 1))
        else:
            lines = [(i, json.loads(line)) for i, line in enumerate(text.splitlines(), 1)
                     if line.strip() and (limit is None or i <= limit)]
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EvalDataError(f"'{path}' is not valid JSON{' lines' if path.suffix != '.json' else ''} "
                            f"({e}); restore it from the source named in SOURCE.txt") from None
    docs = []
    for i, raw in lines[:limit]:
        try:
            if not isinstance(raw, dict):
                raise TypeError("not an object")
            docs.append(_doc(spec.name, raw))
        except (KeyError, TypeError, ValueError) as e:
            raise EvalDataError(f"'{path}' record {i} is malformed for {spec.name} ({type(e).__name__}: "
                                f"{e}); restore the file from the source named in SOURCE.txt") from None
    if not docs:
        raise EvalDataError(f"'{path}' holds no records")
    return docs


# -- docs -> requests, as lm-eval builds them (doc_to_text / doc_to_choice / doc_to_target) ------

def winogrande_doc_to_text(doc: dict) -> int:
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_target(doc: dict) -> str:
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc: dict) -> list[str]:
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]


BOOLQ_CHOICES = ("no", "yes")


def boolq_doc_to_text(doc: dict) -> str:
    return f"Question: {doc['question']}?\nAnswer:"


def doc_to_item(task: str, doc: dict) -> Item:
    """The requests lm-eval makes for ``doc`` (target_delimiter " ", zero-shot, no description)."""
    if task == "winogrande":
        choices = tuple(winogrande_doc_to_choice(doc))
        return Item(choices, (" " + winogrande_doc_to_target(doc),), choices,
                    winogrande_doc_to_text(doc))
    if task == "boolq":
        return Item((boolq_doc_to_text(doc),), tuple(" " + c for c in BOOLQ_CHOICES), BOOLQ_CHOICES,
                    doc["label"])
    choices = tuple(doc["choices"])
    return Item((doc["query"],), tuple(" " + c for c in choices), choices, doc["gold"])


def items(task: str | TaskSpec, data_dir: str | Path | None = None,
          limit: int | None = None) -> list[Item]:
    spec = TASKS[task] if isinstance(task, str) else task
    return [doc_to_item(spec.name, d) for d in load_docs(spec, data_dir, limit)]
