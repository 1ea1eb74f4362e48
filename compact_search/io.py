"""File writes that never leave a half-written file behind, and reads that fail in one line."""

from __future__ import annotations

import contextlib
import contextvars
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from compact_search.errors import UserInputError

# errno values that mean "the disk (or a quota, or a file size limit) is full".
FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

# The writes of an open `written_together` block: (temporary file, final path), in order.
_staged: contextvars.ContextVar[list[tuple[str, Path]] | None] = contextvars.ContextVar(
    "staged_writes", default=None
)


def file_in_the_way(path: str | os.PathLike) -> Path | None:
    """The nearest ancestor of `path` that exists as something other than a folder, if any."""
    for parent in Path(path).absolute().parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def folder_problem(folder: Path) -> str:
    """Why `folder` cannot hold a new file: a file stands where it or a parent should be, or
    it does not exist."""
    blocker = folder if folder.exists() and not folder.is_dir() else file_in_the_way(folder)
    if blocker is not None:
        return f"{blocker} is a file, not a folder"
    return f"folder {folder} does not exist"


def ensure_folder(folder: str | os.PathLike) -> Path:
    """mkdir -p `folder`; a file in the way or a refused mkdir raise UserInputError (one line)."""
    folder = Path(folder)
    blocker = folder if folder.exists() and not folder.is_dir() else file_in_the_way(folder)
    if blocker is not None:
        raise UserInputError(f"cannot create folder {folder}: {blocker} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserInputError(f"cannot create folder {folder}: {exc.strerror or exc}") from exc
    return folder


def describe_os_error(exc: OSError, path: str | os.PathLike | None = None, size: int = 0) -> str:
    """One line for a failed file operation; a full disk names the free space and the need."""
    where = path if path is not None else (exc.filename or "a file")
    if exc.errno in FULL_DISK:
        folder = Path(where).parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        free = shutil.disk_usage(folder).free
        need = f"; writing it needs {_size(size)}" if size else ""
        reason = exc.strerror or "No space left on device"
        return f"cannot write {where}: {reason} ({_size(free)} free{need})"
    if exc.errno == errno.ENOTDIR:
        blocker = file_in_the_way(where)
        if blocker is not None:
            return f"cannot write {where}: {blocker} is a file, not a folder"
    return f"cannot write {where}: {exc.strerror or exc}"


def _size(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same folder, fsync, then rename.

    An interruption or a full disk leaves the previous file (if any) untouched. Missing or
    read-only folders, a file where a folder should be and a full disk raise UserInputError.
    Inside `written_together()` the rename waits for the end of the block.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UserInputError(f"cannot write {path}: {folder_problem(folder)}")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise UserInputError(describe_os_error(exc, path, len(data))) from exc
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        staged = _staged.get()
        if staged is not None:
            staged.append((tmp, path))
            return
        os.replace(tmp, path)
    except OSError as exc:
        _remove_quietly(tmp)
        raise UserInputError(describe_os_error(exc, path, len(data))) from exc
    except BaseException:
        _remove_quietly(tmp)
        raise


@contextlib.contextmanager
def written_together() -> Iterator[None]:
    """Files that belong together, committed together: every `atomic_write_*` inside the block
    is written and flushed to a temporary file first, and only when all of them are on disk are
    they renamed into place, back to back. A full disk or an interruption inside the block
    leaves every earlier file as it was (renames need no space)."""
    if _staged.get() is not None:  # nested: the outer block commits
        yield
        return
    staged: list[tuple[str, Path]] = []
    token = _staged.set(staged)
    try:
        yield
    except BaseException:
        for tmp, _ in staged:
            _remove_quietly(tmp)
        raise
    finally:
        _staged.reset(token)
    for tmp, path in staged:
        os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Parse a JSON file; missing, unreadable, truncated or non-JSON files raise UserInputError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise UserInputError(f"{path}: {what} not found") from exc
    except IsADirectoryError as exc:
        raise UserInputError(f"{path}: is a folder, expected a {what}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise UserInputError(f"{path}: cannot read {what}: {exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserInputError(
            f"{path}: not valid JSON (truncated or corrupt?) at line {exc.lineno} col {exc.colno}"
        ) from exc


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
