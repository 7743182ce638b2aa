"""Loaded by lm-eval (``!function onebit_tasks.*`` in this folder's YAMLs): the local eval files
as datasets, through ``onebit.eval.tasks`` (the docs and prompts of ``onebit eval tasks``).
Any lm-eval model runs these tasks (``--model hf`` as well as
``onebit-lm-eval --model onebit``). The data folder: ``--metadata '{"data_dir": "DIR"}'``, else
$ONEBIT_EVAL_DATA, else ../shared/data/eval (``onebit.eval.tasks.find_data_dir``)."""

from onebit.eval.tasks import (doc_to_item, find_data_dir, load_docs, winogrande_doc_to_choice,
                               winogrande_doc_to_target, winogrande_doc_to_text)

__all__ = ["winogrande_doc_to_choice", "winogrande_doc_to_target", "winogrande_doc_to_text"]


def _dataset(task: str, data_dir=None, **_metadata):
    """{"test": Dataset}: docs as {"query", "choices", "gold"} (one context, the choices after
    it), or winogrande's own fields (its choices fill the blank, scored by the functions above)."""
    import datasets

    docs = load_docs(task, find_data_dir(data_dir))
    if task != "winogrande":
        docs = [{"query": it.contexts[0], "choices": list(it.choices), "gold": it.gold}
                for it in (doc_to_item(task, d) for d in docs)]
    return {"test": datasets.Dataset.from_list(docs)}


def arc_easy(**kw):
    return _dataset("arc_easy", **kw)


def arc_challenge(**kw):
    return _dataset("arc_challenge", **kw)


def hellaswag(**kw):
    return _dataset("hellaswag", **kw)


def piqa(**kw):
    return _dataset("piqa", **kw)


def winogrande(**kw):
    return _dataset("winogrande", **kw)


def boolq(**kw):
    return _dataset("boolq", **kw)


def openbookqa(**kw):
    return _dataset("openbookqa", **kw)
