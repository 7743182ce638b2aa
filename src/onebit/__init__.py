"""onebit: train, pack and run 1-bit (ternary) LLMs."""
__version__ = "0.1.0"
