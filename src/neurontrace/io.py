"""Atomic file output: a result file is either the old one or the complete new one, never half-written.

Files get the usual mode of a new file, ``0o666 & ~umask`` (a temporary file alone would be ``0o600``).
:func:`write_files_atomic` writes a set of files that belong together (a graph's JSON, full graph and page):
every part is written in full before any is renamed into place, so a full disk leaves the old set whole.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path


def _umask() -> int:
    """The process umask, read without changing it where Linux tells it (else set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_temporary(path: Path, data: bytes) -> Path:
    """``data`` in a temporary file next to ``path``, flushed to disk, with the usual file mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def check_writable(path: str | os.PathLike, *, what: str = "the output") -> Path:
    """Stop early (before any compute) when ``path`` cannot be written as a file: say why, in one line.

    A folder at ``path``, a file where a parent folder should be, or a folder where new files cannot be created
    (read-only, no permission) are user errors. Creates the parent folders, as the writers would.
    """
    from neurontrace.errors import NeurontraceError

    path = Path(path)
    if path.is_dir():
        raise NeurontraceError(
            f"{what} {path} is a folder, where a file is to be written; choose another path"
        )
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NeurontraceError(f"{what} {path}: {parent} is a file, not a folder")
            break
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise NeurontraceError(f"{what} {path} cannot be written: {exc.strerror or exc}") from None
    return path


def _replace(tmp: Path, target: Path) -> None:
    """``os.replace`` whose error names the target (the user's path), not the temporary file."""
    try:
        os.replace(tmp, target)
    except OSError as exc:
        raise type(exc)(exc.errno, exc.strerror, str(target)) from None


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    tmp = _write_temporary(path, data)
    try:
        _replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_files_atomic(files: Mapping[str | os.PathLike, bytes | str]) -> list[Path]:
    """Write every file of ``files`` (path -> content) in full, then rename them all into place.

    If any part cannot be written (no space, no permission), no file is replaced and the temporary parts are
    removed. The renames themselves are atomic one by one.
    """
    written: list[tuple[Path, Path]] = []
    try:
        for path, data in files.items():
            target = Path(path)
            written.append(
                (_write_temporary(target, data.encode("utf-8") if isinstance(data, str) else data), target)
            )
    except BaseException:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        raise
    try:
        for tmp, target in written:
            _replace(tmp, target)
    finally:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
    return [target for _, target in written]


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


class JsonResult:
    """Mixin for result dataclasses: ``to_json()`` (all fields) and an atomic ``save(path)``."""

    def to_json(self) -> str:
        from dataclasses import asdict

        return json.dumps(asdict(self), indent=2)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the result as JSON, atomically."""
        return write_text_atomic(path, self.to_json())
