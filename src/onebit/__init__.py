"""onebit: train, pack and run 1-bit (ternary) LLMs."""
__version__ = "0.1.0"


def load(path, **kwargs):
    """Load a packed model folder for torch-free inference (see ``onebit.engine.load``:
    ``sparse=``, ``activation_scheme=``)."""
    from .engine.api import load as _load

    return _load(path, **kwargs)


def quantize_model(model, **kwargs):
    """Convert a causal LM to BitNet b1.58 in place (see ``onebit.finetune.quantize_model``)."""
    from .finetune import quantize_model as _quantize_model

    return _quantize_model(model, **kwargs)
