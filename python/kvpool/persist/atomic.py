"""Atomic cache files: write a temporary file, fsync, rename over the target, fsync the dir.

A crash at any point leaves the old file or the new one at the final path, never a mix;
stray temporary files are removed by the next save (or :func:`remove_stale_temp_files`)
once their writer is dead.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import sys
from collections.abc import Callable
from pathlib import Path

from kvpool.errors import CacheWriteError, KvpoolError

# Temporary files: ".{final name}.tmp-{pid}-{8 hex}.safetensors" (the suffix keeps
# mx.save_safetensors from appending one). Hidden names never collide with agent files.
_TEMP_RE = re.compile(r"\.(?P<final>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]{8}\.safetensors")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if sys.platform == "darwin":  # fsync does not reach the disk on macOS
            import fcntl

            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
        else:
            os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` creates a temporary file next to ``path``; it becomes ``path`` atomically.

    Order: make the directory, write, fsync the file, rename over ``path``, fsync the
    directory. On any error the temporary file is removed and ``path`` is untouched; an
    OSError (a full disk, permissions) is raised as CacheWriteError naming ``path``.
    """
    directory = path.parent
    tmp = directory / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}.safetensors"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(directory, path.name)
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, KvpoolError):
            raise _write_error(path, exc, "the old file, if any, is intact") from exc
        raise
    try:
        _fsync_dir(directory)
    except OSError as exc:
        raise _write_error(path, exc, "written, but its directory could not be synced") from exc


def _write_error(path: Path, exc: OSError, what: str) -> CacheWriteError:
    error = CacheWriteError(f"could not write {path}: {exc.strerror or exc} ({what})")
    error.errno = exc.errno
    return error


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temp_files(
    directory: str | os.PathLike[str], final_name: str | None = None
) -> int:
    """Delete temporary files whose writer process is gone; returns how many.

    Only names this module creates are touched; ``final_name`` limits it to the temporaries
    of one file. A live writer's temporary file is left alone.
    """
    removed = 0
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0
    for name in names:
        match = _TEMP_RE.fullmatch(name)
        if match is None or (final_name is not None and match["final"] != final_name):
            continue
        if _pid_alive(int(match["pid"])):
            continue
        with contextlib.suppress(OSError):  # gone already, or not a file we could remove
            os.unlink(Path(directory) / name)
            removed += 1
    return removed
