"""Torch-free inference on packed models (numpy + the C kernels).

``runtime.Runtime`` is the forward pass over a memory-mapped packed folder; ``api.Model`` adds
the tokenizer, sampling, streaming and chat; ``load(path)`` builds one.
"""
from pathlib import Path

from .api import BITNET_CHAT_TEMPLATE, Model, load
from .batch import BatchEngine, SamplingParams, TokenEvent
from .runtime import EngineError, Runtime
from .stats import kv_cache_bytes

__all__ = ["BITNET_CHAT_TEMPLATE", "BatchEngine", "EngineError", "SamplingParams", "TokenEvent", "Model", "Runtime", "default_model_path",
           "kv_cache_bytes", "load"]


def default_model_path() -> Path:
    """The built-in model shipped in the package (a small BitNet b1.58 trained on Gutenberg)."""
    p = Path(__file__).resolve().parent.parent / "models" / "default"
    if not (p / "model.safetensors").is_file():
        raise EngineError(f"the built-in model is missing from this installation ({p}); reinstall "
                          f"onebit, or pass --model with a packed model folder")
    return p
