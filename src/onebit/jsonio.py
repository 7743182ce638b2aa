"""JSON read defensively (torch-free): every failure is one error that names the file.

``json.loads`` alone lets through exceptions that are not errors about the input's name: a
RecursionError for a document nested ~100,000 deep, a bare ValueError for an integer of more than
4,300 digits, UnicodeDecodeError, IsADirectoryError. Config files are also capped in size, so a
hostile "config.json" is never read into memory whole.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["MAX_JSON_BYTES", "is_panic", "loads_checked", "read_json", "read_tokenizer"]

MAX_JSON_BYTES = 64 << 20  # config / index / tokenizer_config files are kilobytes


def loads_checked(text: str | bytes, where: str, error: type[ValueError] = ValueError,
                  fix: str = "") -> Any:
    """``json.loads(text)``, or ``error`` naming ``where`` (a file, or 'file: metadata key')."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        what = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:200]
        raise error(f"{where} is not valid JSON ({what}){'; ' + fix if fix else ''}") from None


def read_json(path: str | os.PathLike, error: type[ValueError] = ValueError, fix: str = "",
              max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON value in file ``path``; ``error`` naming the file if it is missing, not a regular
    file, larger than ``max_bytes``, not UTF-8 or not JSON (however nested)."""
    path = Path(path)
    tail = f"; {fix}" if fix else ""
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise error(f"'{path}' is not a regular file{tail}")
        if size > max_bytes:
            raise error(f"'{path}' is {size} bytes, more than the {max_bytes} a JSON config may "
                        f"have{tail}")
        data = path.read_bytes()
    except FileNotFoundError:
        raise error(f"'{path}' does not exist{tail}") from None
    except OSError as e:
        raise error(f"'{path}' cannot be read ({e.strerror or e}){tail}") from None
    return loads_checked(data, f"'{path}'", error, fix)


TOKENIZER_PROBE = "Hello, world! 123 \u00e9\u4e2d \n"


def is_panic(e: BaseException) -> bool:
    """A Rust panic inside the tokenizers library (pyo3's PanicException, not an Exception)."""
    return type(e).__name__ == "PanicException"


def read_tokenizer(path: str | os.PathLike, error: type[ValueError] = ValueError,
                   vocab_size: int | None = None):
    """``tokenizers.Tokenizer.from_file(path)``, or ``error`` naming the file. The library raises
    a bare Exception for bad JSON and, for some malformed vocabularies, a Rust panic that reaches
    Python as pyo3's PanicException, a BaseException that ``except Exception`` lets through.
    ``vocab_size``: the model's; a tokenizer with more tokens (ids the embedding does not have)
    is refused too."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
        # some broken settings load and panic only when used (continuing_subword_prefix = "None")
        tok.decode(tok.encode(TOKENIZER_PROBE, add_special_tokens=False).ids)
        if vocab_size is not None:  # the largest id, not the count: ids may have gaps
            ids = tok.get_vocab(with_added_tokens=True).values()
            n = max(ids, default=-1) + 1
            if n > vocab_size:
                raise error(f"'{path}' has token ids up to {n - 1} ({len(ids)} tokens) but the "
                            f"model's vocab_size is {vocab_size}: it is not this model's tokenizer; "
                            f"copy the tokenizer.json the model was trained with")
        return tok
    except ValueError as e:
        if isinstance(e, error) and str(path) in str(e):
            raise
        why = e
    except Exception as e:  # noqa: BLE001 - the library's only error type
        why = e
    except BaseException as e:
        if not is_panic(e):
            raise
        why = e
    raise error(f"'{path}' is not a valid tokenizer ({str(why)[:200]}); copy the tokenizer.json the "
                f"model was trained with")
