"""Imported once by the fuzz harness's fork server, so that every worker it forks (and every
restart after a crash or a timeout) starts with torch and the loaders already imported."""

import onebit.checkpoint  # noqa: F401  (torch)
import onebit.engine  # noqa: F401
import onebit.formats.convert  # noqa: F401
import onebit.formats.gguf_io  # noqa: F401
import onebit.formats.hf  # noqa: F401
import onebit.formats.llama2c  # noqa: F401
import onebit.generate  # noqa: F401
import onebit.kernels  # noqa: F401
import onebit.model  # noqa: F401
import onebit.testing.fuzz  # noqa: F401
