"""onebit: train, pack and run 1-bit (ternary) LLMs."""
__version__ = "0.1.0"


def load(path):
    """Load a packed model folder for torch-free inference (see ``onebit.engine.load``)."""
    from .engine.api import load as _load

    return _load(path)
