"""Where onebit may write: the one rule every writer checks before it does any work (torch-free).

- A destination that is the source, or a folder holding the source (also through symlinks, ``..``
  or trailing slashes), is refused.
- A new path or an empty folder is written.
- An earlier onebit output of the same kind (recognised by the marker in its own files, with no
  file onebit did not write beside them: docs/formats.md §11) is replaced only with ``force``;
  the error lists what would be replaced, the return value what will be.
- Anything else (user files, an unrelated folder, a training run under export/convert, a file
  where a folder goes or the reverse, a symlink) is refused, ``force`` or not.
- A destination that cannot be written (no permission, read-only) is refused before any work.
- Leftover temps of killed writes beside the destination (or, for a run folder, inside it) are
  removed (atomic.clean_stale).
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from .atomic import DestinationError, clean_stale, temp_target, write_error

__all__ = ["DestinationError", "MODEL_FILES", "RUN_ENTRIES", "check_destination", "onebit_output"]

# What onebit writes into a model folder (packed or transformers): weights, config, tokenizer files.
MODEL_FILES = frozenset({"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                         "special_tokens_map.json", "generation_config.json", "tokenizer.model"})
# What train / finetune write into train.out_dir.
RUN_ENTRIES = ("run_config.json", "log.jsonl", "tb", "checkpoints", "model", "summary.json",
               "source_tokenizer.json")
KINDS = ("model", "gguf", "run")
_WHAT = {"packed": "an onebit packed model", "hf": "a Hugging Face model written by onebit convert",
         "gguf": "a GGUF file written by onebit convert", "run": "an onebit training run",
         "checkpoint": "an onebit training checkpoint / model folder"}


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _safetensors_meta(path: Path) -> dict:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return {}
    try:
        with safe_open(str(path), framework="numpy") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return {}


def _is_onebit_gguf(path: Path) -> bool:
    from .formats.gguf_io import GGUFError, parse_gguf

    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return False
        g = parse_gguf(path)
    except (GGUFError, OSError):
        return False
    g.data.close()
    return "onebit.hidden_act" in g.kv


def onebit_output(path: str | Path) -> str | None:
    """What onebit wrote at ``path``: "packed", "hf", "gguf", "run", "checkpoint", or None
    (not onebit's, or onebit's files with other files beside them). Reads headers only."""
    p = Path(path)
    if p.is_symlink() or not p.exists():
        return None
    if p.is_file():
        return "gguf" if _is_onebit_gguf(p) else None
    entries = list(p.iterdir())
    names = {e.name for e in entries}
    run_cfg = _json(p / "run_config.json") if "run_config.json" in names else None
    # finetune writes source_tokenizer.json before the run starts; under torchrun every rank writes
    # it (atomically, the same bytes), so another rank's temp of a run entry may be there too
    in_flight = {n for n in names if temp_target(n) in RUN_ENTRIES}
    if isinstance(run_cfg, dict) and "onebit_version" in run_cfg or names and names - in_flight in (
            {"source_tokenizer.json"}, set()):
        return "run"
    meta = _safetensors_meta(p / "model.safetensors")
    if meta.get("format") == "onebit":  # checkpoint.write_model_files
        return "checkpoint"
    if not names <= MODEL_FILES or any(e.is_symlink() or not e.is_file() for e in entries):
        return None
    cfg = _json(p / "config.json")
    if meta.get("onebit.format") == "onebit-packed" and isinstance(cfg, dict) and "packed" in cfg:
        return "packed"
    if meta.get("onebit.writer") == "onebit":  # formats.hf.write_hf
        return "hf"
    return None


def _listing(p: Path, limit: int = 6) -> str:
    names = sorted(e.name + ("/" if e.is_dir() and not e.is_symlink() else "") for e in p.iterdir())
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _holds(dst: Path, src: Path) -> bool:
    """``dst`` is ``src`` or a folder above it (symlinks, ``..`` and bind mounts seen through)."""
    d, s = Path(os.path.realpath(dst)), Path(os.path.realpath(src))
    if d == s or d in s.parents:
        return True
    if not d.exists():
        return False
    for a in (s, *s.parents):
        try:
            if os.path.samefile(a, d):
                return True
        except OSError:
            continue
    return False


def _check_writable(p: Path, inside: bool) -> None:
    """Fail fast on a destination that cannot be created: the nearest existing folder (``p``
    itself when writing ``inside`` it) must be a writable folder on a writable file system."""
    a = p if inside else p.parent
    while not os.path.lexists(a) and a != a.parent:
        a = a.parent
    if not a.is_dir():
        raise write_error(p, NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(a)))
    try:
        read_only = bool(os.statvfs(a).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        read_only = False
    if read_only:
        raise write_error(p, OSError(errno.EROFS, os.strerror(errno.EROFS), str(a)))
    if not os.access(a, os.W_OK | os.X_OK):
        raise write_error(p, PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(a)))


def check_destination(dst: str | Path, kind: str, sources=(), *, force: bool = False,
                      clean: bool = True, label: str = "destination", reserved=()) -> list[str]:
    """Check that ``dst`` may be written, before any work; return the names it will replace
    (empty: nothing is replaced). Raises DestinationError naming ``dst``, the reason and the fix.

    ``kind``: "model" (a folder: packed or Hugging Face), "gguf" (one file) or "run" (a training
    out_dir: new, empty, or an onebit run, whose checkpoints train() itself guards with --resume).
    ``sources``: paths the command reads; ``dst`` may be neither one of them nor hold one.
    ``force``: replace an earlier onebit output of the same kind. ``clean``: remove leftover temps
    of killed writes (atomic.clean_stale). ``label``: how the messages name ``dst``.
    ``reserved``: paths the same command writes otherwise; ``dst`` may not be one or lie in one."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is unknown; use one of {list(KINDS)}")
    p = Path(dst)
    name = f"{label} '{p}'"
    for src in sources:
        if src is not None and _holds(p, Path(src)):
            rel = "is" if os.path.realpath(p) == os.path.realpath(src) else "holds"
            raise DestinationError(f"{name} {rel} the source '{src}': writing there would destroy "
                                   f"it; choose another destination (nothing was written)", p)
    for r in reserved:
        if _holds(Path(r), p):
            raise DestinationError(f"{name} lies in '{r}', which this command writes itself: choose "
                                   f"a path outside it", p)
    if p.is_symlink():
        raise DestinationError(f"{name} is a symbolic link (to '{os.readlink(p)}'); onebit would "
                               f"replace the link, not what it points to: pass the real path", p)
    _check_writable(p, inside=kind == "run")
    if clean and p.parent.is_dir():
        clean_stale(p.parent, {p.name})
    if not p.exists():
        return []
    if p.is_file():
        if kind != "gguf":
            raise DestinationError(f"{name} is an existing file; onebit writes a folder there: "
                                   f"choose a new or empty folder (nothing was written)", p)
        if onebit_output(p) != "gguf":
            raise DestinationError(f"{name} is an existing file onebit did not write; choose "
                                   f"another file name (nothing was written)", p)
        if not force:
            raise DestinationError(f"{name} is {_WHAT['gguf']}; pass --force to replace it, or "
                                   f"choose another file name (nothing was written)", p)
        return [p.name]
    if not p.is_dir():
        raise DestinationError(f"{name} exists and is neither a file nor a folder; choose "
                               f"another destination", p)
    if kind == "gguf":
        raise DestinationError(f"{name} is a folder; --to gguf-* writes one file: name it, e.g. "
                               f"'{p / 'model.gguf'}' (nothing was written)", p)
    if not any(p.iterdir()):
        return []
    owner = onebit_output(p)
    if kind == "run":
        if owner != "run":
            raise DestinationError(f"{name} is a non-empty folder that is not an onebit run (it "
                                   f"holds {_listing(p)}); onebit never deletes files it did not "
                                   f"write: choose a new or empty out_dir (nothing was written)", p)
        if clean:
            clean_stale(p)
            if (p / "checkpoints").is_dir():
                clean_stale(p / "checkpoints")
        return []
    if owner in ("packed", "hf"):
        if not force:
            raise DestinationError(f"{name} holds {_WHAT[owner]} ({_listing(p)}); pass --force to "
                                   f"replace it, or choose another destination (nothing was "
                                   f"written)", p)
        return sorted(e.name for e in p.iterdir())
    if owner is not None:
        raise DestinationError(f"{name} is {_WHAT[owner]} ({_listing(p)}); export and convert "
                               f"never replace one, even with --force: choose another destination",
                               p)
    raise DestinationError(f"{name} is a non-empty folder onebit did not write (it holds "
                           f"{_listing(p)}); onebit never deletes files it did not write: choose "
                           f"a new or empty folder (nothing was written)", p)
