"""Crash-safe file writes: a crash leaves the old file or the new one, never half of one.

The one place canet's atomic writers live (checkpoints, metrics, ranks, comparisons).
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import threading
from pathlib import Path

__all__ = [
    "fsync_dir",
    "fsync_file",
    "process_umask",
    "set_created_mode",
    "write_bytes_atomic",
    "write_text_atomic",
]

_umask_guard = threading.Lock()


def process_umask() -> int:
    """The process umask, read without changing it where possible (/proc/self/status on
    Linux); elsewhere os.umask set and restored under a lock, so no two canet threads race on
    it (a thread outside canet creating a file in that instant could still see 0o022)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    with _umask_guard:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def set_created_mode(path: Path, directory: bool = False, umask: int | None = None) -> None:
    """Give a file or directory that canet created through mkdtemp/mkstemp (0700/0600) or a
    library (safetensors, torch.save) the mode an ordinary open/mkdir would have: 0o666 (files)
    or 0o777 (directories) less the process umask, so a serving account or a teammate can read
    a checkpoint whenever the umask lets them."""
    mask = process_umask() if umask is None else umask
    os.chmod(path, (0o777 if directory else 0o666) & ~mask)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    # Directory fsync makes the renames durable; not every platform/filesystem allows it.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text_atomic(text: str, path: str | os.PathLike[str]) -> Path:
    """Write a text file (metrics, ranks, recommendations, configs) so that a crash leaves the
    old file or the new one, never half of one: a uniquely named temporary sibling, fsync,
    rename, fsync of the directory. The one atomic writer of every command.

    Errors are OSErrors whose ``filename`` is ``path`` (the user's path, never the hidden
    temporary), and no temporary is left behind, whatever fails. The file gets the mode an
    ordinary ``open(path, "w")`` would: an existing file's mode is kept, a new one is 0o666
    less the umask.
    """
    return _write_atomic(text, path, binary=False)


def write_bytes_atomic(data: bytes, path: str | os.PathLike[str]) -> Path:
    """:func:`write_text_atomic` for binary content (e.g. a rendered PNG), same guarantees."""
    return _write_atomic(data, path, binary=True)


def _write_atomic(content: str | bytes, path: str | os.PathLike[str], *, binary: bool) -> Path:
    # The mode comes from the caller, not from type(content): text given bytes (or bytes given
    # text) fails while writing the temporary, before the target is touched.
    path = Path(path)
    if path.is_dir():  # else the rename's EISDIR would come after writing the whole file
        raise IsADirectoryError(errno.EISDIR, "is a directory; expected a file path", str(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a file where a directory of the path should be
        raise NotADirectoryError(
            errno.ENOTDIR, f"cannot create its directory: {path.parent} is a file", str(path)
        ) from None
    except OSError as error:
        raise _naming(error, path) from None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise _naming(error, path) from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o666 & ~process_umask()
        os.chmod(tmp, mode)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise _naming(error, path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def _naming(error: OSError, path: Path) -> OSError:
    """``error`` again (same type and errno) with ``filename`` the user's ``path``."""
    if error.errno is None:
        return error
    return OSError(error.errno, error.strerror or str(error), str(path))
