"""Torch-free inference on packed models (numpy + the C kernels). See runtime.py."""
from .runtime import EngineError, Runtime

__all__ = ["EngineError", "Runtime"]
