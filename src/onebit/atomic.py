"""Atomic writes (torch-free): a file or a whole folder appears complete or not at all.

Temp files and folders sit beside their final path as ``.{name}.tmp.{pid}.{8 hex}``, so a later
writer can tell the leftover of a killed process (``clean_stale`` removes it) from one being
written now. They are created with ``os.open(..., 0o666)`` / ``os.mkdir(..., 0o777)``: the user's
umask applies, as with ``open()`` / ``mkdir`` (``tempfile.mkstemp`` / ``mkdtemp`` give 0600 / 0700;
so does safetensors' writer, whose files are given the same mode before they are moved into place).
An OSError on the destination (read-only, no permission, disk full, a file in the path) becomes a
one-line ``DestinationError`` naming the path and the fix; nothing half-written is left behind.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path

__all__ = ["DestinationError", "atomic_file", "atomic_write_text", "clean_stale", "make_temp_dir",
           "write_dir_atomic", "write_error"]


class DestinationError(ValueError):
    """A destination must not (it holds data onebit did not write, it is the source) or cannot
    (read-only, no permission, disk full) be written. ``os_error``: the OSError behind it, if any."""

    def __init__(self, message: str, path: Path | None = None, os_error: OSError | None = None):
        super().__init__(message)
        self.path, self.os_error = path, os_error


_FIXES = {
    errno.EACCES: "you may not write there: choose a folder you can write to (or fix its permissions)",
    errno.EPERM: "you may not write there: choose a folder you can write to (or fix its permissions)",
    errno.EROFS: "the file system is read-only: choose a destination on a writable disk",
    errno.ENOSPC: "the disk is full: free space or choose a destination on another disk",
    errno.EDQUOT: "your disk quota is used up: free space or choose a destination on another disk",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another destination",
    errno.EEXIST: "a part of the path is a file, not a folder: choose another destination",
    errno.EISDIR: "it is a folder: choose another destination",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter path",
}


def write_error(final: Path, e: OSError) -> DestinationError:
    """The one-line error for an OSError met while writing ``final``."""
    final = Path(final)
    what = e.strerror or str(e) or type(e).__name__
    at = ""
    if e.filename and Path(os.fsdecode(e.filename)) != final and not _is_temp_of(e.filename, final):
        at = f" (at '{os.fsdecode(e.filename)}')"
    fix = _FIXES.get(e.errno, "choose another destination")
    return DestinationError(f"cannot write '{final}': {what}{at}; {fix} (nothing was written)",
                            final, e)


def _is_temp_of(path, final: Path) -> bool:
    return os.fsdecode(path).startswith(str(final.parent / f".{final.name}.tmp."))


def _reraise_for(final: Path, tmp: Path, e: DestinationError) -> DestinationError:
    """An error a nested writer raised about ``tmp`` (or a file in it, or its own temp): name
    ``final`` instead, the path the user gave."""
    p = Path(e.path) if e.path is not None else None
    if e.os_error is not None and p is not None and (
            p == tmp or tmp in p.parents or _is_temp_of(p, tmp)):
        return write_error(final, e.os_error)
    return e


def _temp_path(final: Path) -> Path:
    return final.parent / f".{final.name}.tmp.{os.getpid()}.{secrets.token_hex(4)}"


def _open_temp(final: Path) -> tuple[int, Path]:
    """A new temp file beside ``final`` (mode 0666 & ~umask), open for writing."""
    while True:
        tmp = _temp_path(final)
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                           0o666), tmp
        except FileExistsError:
            continue


def make_temp_dir(final: Path) -> Path:
    """A new empty temp folder beside ``final`` (mode 0777 & ~umask)."""
    while True:
        tmp = _temp_path(Path(final))
        try:
            os.mkdir(tmp, 0o777)
            return tmp
        except FileExistsError:
            continue


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (not every file system can; that is not an error)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(final: Path):
    """Yield a temp path beside ``final`` to write; on a normal exit it is fsync'ed and renamed
    onto ``final``, on an exception removed. OSErrors become DestinationError naming ``final``."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _open_temp(final)
        mode = stat.S_IMODE(os.fstat(fd).st_mode)  # 0o666 & ~umask
        os.close(fd)
    except OSError as e:
        raise write_error(final, e) from None
    try:
        try:
            yield tmp
            os.chmod(tmp, mode)  # a writer that replaced the file may have made it 0600
            _fsync(tmp)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as e:
        raise write_error(final, e) from None
    except DestinationError as e:
        raise _reraise_for(final, tmp, e) from None
    _fsync_dir(final.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file + fsync + os.replace (never half-written)."""
    with atomic_file(Path(path)) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def write_dir_atomic(final: Path, fill) -> Path:
    """Create folder ``final`` by letting ``fill(tmpdir)`` write into a sibling temp folder and
    renaming it into place. An existing ``final`` is replaced only after the new one is complete
    (callers decide whether it may be: onebit.destination.check_destination)."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(final)
    except OSError as e:
        raise write_error(final, e) from None
    try:
        try:
            fill(tmp)
            mask = 0o777 & ~stat.S_IMODE(tmp.stat().st_mode)  # made 0o777 & ~umask
            for f in tmp.rglob("*"):
                if f.is_symlink():
                    continue
                os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~mask)  # safetensors writes 0600
                if f.is_file():
                    _fsync(f)
            _fsync_dir(tmp)
            if os.path.lexists(final):
                old = final.with_name(f".{final.name}.old")
                _remove(old)
                os.replace(final, old)
                os.replace(tmp, final)
                _remove(old)
            else:
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except OSError as e:
        raise write_error(final, e) from None
    except DestinationError as e:  # a file inside the temp folder: name the destination instead
        raise _reraise_for(final, tmp, e) from None
    _fsync_dir(final.parent)
    return final


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif os.path.lexists(p):
        try:
            p.unlink()
        except OSError:
            pass


# Leftovers of writes that never finished (process killed, power lost). Older onebit versions
# named temps with tempfile's 8 random characters and no pid: folders .X.tmp.RRRRRRRR, files
# .X.RRRRRRRR.tmp, and (atomic_write_text, only in run folders) .X.RRRRRRRR.
_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp\.(?P<pid>\d+)\.[0-9a-f]{8}$")
_LEGACY = re.compile(r"^\.(?P<name>.+?)(\.tmp\.[a-z0-9_]{8}|\.[a-z0-9_]{8}\.tmp)$")
_LEGACY_TEXT = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}$")
_OLD = re.compile(r"^\.(?P<name>.+)\.old$")


def temp_target(name: str) -> str | None:
    """The final name a temp entry ``name`` (``.X.tmp.PID.HEX``) is being written for, else None."""
    m = _TEMP.match(name)
    return m["name"] if m else None


def _alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # no cheap liveness test: keep it
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def clean_stale(folder: Path, names: set[str] | None = None) -> list[Path]:
    """Remove the temp leftovers of killed writes in ``folder`` (only those for ``names`` if given;
    without ``names`` the folder must be onebit's own, e.g. a run folder): temp files/folders of
    processes that are gone, and ``.X.old`` (restored to ``X`` if the swap that made it died before
    ``X`` was back). Returns what was removed or restored."""
    folder = Path(folder)
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    done = []
    for p in entries:
        m = _TEMP.match(p.name)
        if m:
            if names is not None and m["name"] not in names or _alive(int(m["pid"])):
                continue
        elif (m := _OLD.match(p.name)):
            if names is not None and m["name"] not in names:
                continue
            target = folder / m["name"]
            if not os.path.lexists(target):  # the previous output, moved aside by a dead writer
                try:
                    os.replace(p, target)
                    done.append(p)
                except OSError:
                    pass
                continue
        elif (m := _LEGACY.match(p.name)):
            if names is not None and m["name"] not in names:
                continue
        elif names is None and _LEGACY_TEXT.match(p.name):
            pass
        else:
            continue
        _remove(p)
        done.append(p)
    return done
