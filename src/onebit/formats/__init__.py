"""On-disk formats of onebit: packed ternary weights (spec: docs/formats.md)."""

from .packing import *  # noqa: F403 -- the public names are packing.__all__
from .packing import __all__  # noqa: F401
