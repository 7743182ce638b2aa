"""Torch-free inference on packed models (numpy + the C kernels).

``runtime.Runtime`` is the forward pass over a memory-mapped packed folder; ``api.Model`` adds
the tokenizer, sampling, streaming and chat; ``load(path)`` builds one.
"""
from .api import BITNET_CHAT_TEMPLATE, Model, load
from .runtime import EngineError, Runtime

__all__ = ["BITNET_CHAT_TEMPLATE", "EngineError", "Model", "Runtime", "load"]
