"""Zero-shot task evaluation (lm-eval's prompts and metrics on local files) and the
lm-evaluation-harness plugin. ``tasks``: the task files and prompts; ``score``: batched
log-likelihoods on the engine (and PyTorch); ``run``: ``evaluate_tasks`` and its report;
``harness``: the lm-eval model class (imports lm_eval)."""

from .run import Scorer, evaluate_tasks, format_report, load_scorer, mean_stderr
from .score import encode_pair, loglikelihoods, reference_loglikelihoods, torch_loglikelihoods
from .tasks import TASKS, EvalDataError, Item, TaskSpec, find_data_dir, items, load_docs, resolve_tasks

__all__ = ["TASKS", "EvalDataError", "Item", "Scorer", "TaskSpec", "encode_pair", "evaluate_tasks",
           "find_data_dir", "format_report", "items", "load_docs", "load_scorer", "loglikelihoods",
           "mean_stderr", "reference_loglikelihoods", "resolve_tasks", "torch_loglikelihoods"]
