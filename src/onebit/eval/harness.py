"""lm-evaluation-harness plugin: ``--model onebit`` runs any lm-eval task on the C engine.

    onebit-lm-eval --model onebit --model_args pretrained=PATH --tasks onebit_zeroshot
    onebit-lm-eval --model onebit --model_args pretrained=PATH --tasks lambada_openai   # any task

lm-eval 0.4.13 discovers no plugins: its model registry is filled from its own table, it reads
no entry points and has no option to import a module (its issues #1621 and #3282; PR #3672 would
add ``--include_package``), and it builds the model before it loads any task, so a task file
cannot register one either. ``onebit-lm-eval`` (this module's ``main``) therefore registers the
model class and then runs lm-eval's own command line with the same arguments, adding
``--include_path`` for the task YAMLs shipped here (``TASKS_PATH``: ``onebit_arc_easy`` ... and
the tag ``onebit_zeroshot``, read offline from the eval data folder through
``onebit.eval.tasks``, so they are the prompts of ``onebit eval tasks``). pyproject.toml also
declares the ``lm_eval.models`` entry point, for harness versions that read one. In Python:
``register()``, then ``lm_eval.simple_evaluate(model="onebit", model_args="pretrained=PATH",
tasks=[...], task_manager=lm_eval.tasks.TaskManager(include_path=str(TASKS_PATH)))``, or pass
``model=OnebitLM(pretrained=PATH)``.

``loglikelihood`` groups requests by context and scores them in batched engine calls
(``onebit.eval.score.loglikelihoods``), ``loglikelihood_rolling`` splits each text into lm-eval's
disjoint windows of the model's context, ``generate_until`` decodes greedily with ``until`` and
``max_gen_toks`` (``onebit.eval.score.generate_until``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry, register_model
from tqdm import tqdm

from .score import generate_until, loglikelihoods

__all__ = ["OnebitLM", "TASKS_PATH", "main"]

TASKS_PATH = Path(__file__).resolve().parent / "lm_eval_tasks"
DEFAULT_MAX_GEN_TOKS = 256


class OnebitLM(TemplateLM):
    """An onebit packed model (or HF folder / GGUF file, imported once) as an lm-eval model.
    ``--model_args pretrained=PATH[,kv_bits=N][,max_gen_toks=N]``; without ``pretrained``, the
    built-in model."""

    def __init__(self, pretrained: str | None = None, kv_bits: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, **kwargs):
        super().__init__()
        from ..engine import default_model_path, load

        path = pretrained or default_model_path()
        self.model = load(path, kv_bits=None if kv_bits is None else int(kv_bits))
        if self.model.tokenizer is None:
            raise ValueError(f"model '{path}' has no tokenizer.json; lm-eval needs text in and out")
        self.pretrained, self.max_gen_toks = str(path), int(max_gen_toks)
        self.tokenizer = self.model.tokenizer

    # -- tokens ------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.model.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.model.bos_id

    @property
    def max_length(self) -> int:
        return self.model.config.max_position_embeddings

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """The engine's encoding (``Model.encode``: BOS first), or without BOS for ``False``."""
        return self.model.encode(string, add_bos=add_special_tokens is not False)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.model.decode(tokens)

    # -- requests ----------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="onebit loglikelihood")
        res = loglikelihoods(self.model, [(c, x) for _, c, x in requests],
                             progress=lambda n: bar.update(n - bar.n))
        bar.close()
        for (key, _, _), r in zip(requests, res):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, r)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text, add_special_tokens=False),
                    prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, scores):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}   # requests with the same generation settings
        for i, req in enumerate(requests):
            kw = dict(req.args[1])
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            eos = self.tok_decode([self.eot_token_id])
            if eos and eos not in until:
                until.append(eos)
            max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            temp = float(kw.pop("temperature", 0.0) or 0.0) if kw.pop("do_sample", False) else 0.0
            groups.setdefault((tuple(until), max_new, temp), []).append(i)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="onebit generate_until")
        for (until, max_new, temp), idx in groups.items():
            max_new = min(max_new, self.max_length - 1)
            texts = generate_until(self.model, [self.tok_encode(requests[i].args[0]) for i in idx],
                                   max_new, until, temperature=temp, seed=1234)
            for i, t in zip(idx, texts):
                out[i] = t
                self.cache_hook.add_partial("generate_until", requests[i].args, t)
            bar.update(len(idx))
        bar.close()
        return out  # type: ignore[return-value]

    def get_model_info(self) -> dict:
        return {"model_name": self.pretrained, "onebit_layout": self.model.runtime.packed.get("layout")}


def register() -> None:
    """Register ``OnebitLM`` as lm-eval's model "onebit" (idempotent). lm-eval's own models
    first: its get_model() fills the registry only while the registry is empty."""
    import lm_eval.models  # noqa: F401

    if "onebit" not in model_registry:
        register_model("onebit")(OnebitLM)


def main(argv: list[str] | None = None) -> None:
    """``onebit-lm-eval``: lm-eval's command line with ``--model onebit`` registered and, unless
    ``--include_path`` is given (lm-eval takes one), the onebit task YAMLs as the include path."""
    from lm_eval.__main__ import cli_evaluate

    register()
    args = list(sys.argv[1:] if argv is None else argv)
    if args and not {"-h", "--help"} & set(args) and "--include_path" not in args:
        args += ["--include_path", str(TASKS_PATH)]
    sys.argv = ["lm-eval", *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
