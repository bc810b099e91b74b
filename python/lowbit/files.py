"""The one way lowbit writes a file: ``write_file(path, write)``.

Every file lowbit writes (``lowbit compress`` / ``decompress``, ``lowbit.save``, ``save_pretrained``,
benchmark results, plots) goes through it, so that a failed or hostile write loses nothing:

- The output must be a regular file or not exist yet. A device (``/dev/full``), a FIFO, a socket or
  a directory is refused before anything is written: renaming over it would replace it.
- A symlink is followed on purpose: the file it points to is written and the link stays a link.
- The data goes to a temporary file in the target's directory (same file system), is flushed to
  disk, and is renamed over the target only once complete: an interrupted write leaves the old
  file as it was and no partial file under the target's name.
- Permissions: those of ``like`` (a source file whose mode and times the output should keep, e.g.
  the file ``lowbit decompress`` restores) when given, else those of the file being replaced, else
  the usual ones for a new file (0666 less the umask), never the temporary file's 0600.
- ``verify(tmp_path)``, when given, runs on the complete temporary file before the rename and may
  raise to keep the target untouched (``lowbit compress`` checks the round trip this way before it
  replaces its own input).
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable

from lowbit.errors import LowbitError

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def output_path(path: str | os.PathLike, *, what: str = "output") -> Path:
    """The file a write to ``path`` replaces: symlinks followed; refused (LowbitError naming ``what``
    and the path) when it exists and is not a regular file, or when its directory does not exist."""
    given = Path(path)
    target = Path(os.path.realpath(given))
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        via = f" (the symlink {given} points to {target})" if target != given.absolute() and given.is_symlink() else ""
        raise LowbitError(f"{what} {given} is {kind}{via}; lowbit writes only regular files and will not replace it")
    if not target.parent.is_dir():
        raise LowbitError(f"{what} {given}: the directory {target.parent} does not exist")
    return target


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` name one existing file (through links too)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_file(path: str | os.PathLike, write: Callable[[Path], None], *, like: str | os.PathLike | None = None,
               verify: Callable[[Path], None] | None = None, what: str = "output") -> Path:
    """Write a file safely (see the module docstring): ``write(tmp_path)`` writes the whole file at
    ``tmp_path``; returns the path written (``path`` with symlinks resolved)."""
    target = output_path(path, what=what)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".lowbit-tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if like is not None:
            shutil.copystat(like, tmp)
        elif target.exists():
            shutil.copymode(target, tmp)
        else:
            os.chmod(tmp, 0o666 & ~_umask())
        if verify is not None:
            verify(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def write_text(path: str | os.PathLike, text: str, *, what: str = "output") -> Path:
    """``write_file`` for a text file (UTF-8)."""
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), what=what)


def free_name(path: str | os.PathLike) -> Path:
    """``path`` if nothing exists there, else the first of ``stem-2.suffix``, ``stem-3.suffix``, ...
    that is free: for outputs named by default (a date), so a second run keeps the first's file."""
    path = Path(path)
    candidate, k = path, 2
    while candidate.exists() or candidate.is_symlink():
        candidate = path.with_name(f"{path.stem}-{k}{path.suffix}")
        k += 1
    return candidate
