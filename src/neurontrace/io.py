"""Atomic file output: a result file is either the old one or the complete new one, never half-written.

Files get the usual mode of a new file, ``0o666 & ~umask`` (a temporary file alone would be ``0o600``).
:func:`write_files_atomic` writes a set of files that belong together (a graph's JSON, full graph and page):
every part is written in full before any is renamed into place, so a full disk leaves the old set whole.
"""

from __future__ import annotations

import errno
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


def _naming(exc: OSError, path: Path) -> OSError:
    """``exc`` naming ``path`` instead of a temporary file (unchanged when it has no error number)."""
    return exc if exc.errno is None else type(exc)(exc.errno, exc.strerror, str(path))


def _write_temporary(path: Path, data: bytes) -> Path:
    """``data`` in a temporary file next to ``path``, flushed to disk, with the usual file mode.

    An ``OSError`` names ``path`` (the user's path), not the temporary file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _naming(exc, path) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _naming(exc, path) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


# the machine refused (exit 3), as opposed to a path of the wrong kind (the user's choice, exit 2)
REFUSALS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT})


def _check_creatable(folder: Path, named: Path, what: str) -> None:
    """Files can be created in ``folder`` (or in its nearest existing parent, where it is missing); errors name
    ``named``, the user's path."""
    from neurontrace.errors import NeurontraceError

    existing = Path.cwd()  # a relative path whose every part is missing lives in the working folder
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            if not candidate.is_dir():
                raise NeurontraceError(f"{what} {named}: {candidate} is a file, not a folder")
            existing = candidate
            break
    try:
        fd, probe = tempfile.mkstemp(prefix=".neurontrace-", suffix=".probe", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        if exc.errno in REFUSALS:
            raise OSError(exc.errno, exc.strerror, str(named)) from None
        raise NeurontraceError(f"{what} {named} cannot be written: {exc.strerror or exc}") from None


def check_folder_writable(path: str | os.PathLike, *, what: str = "the output") -> Path:
    """Stop early (before any compute) when files cannot be created in the folder ``path``, without creating it.

    ``path`` may not exist yet: its nearest existing parent must then be a folder where files can be created.
    A file in the way is a user error (:class:`~neurontrace.errors.NeurontraceError`); a read-only folder, no
    permission or no space is the machine refusing, an ``OSError`` naming ``path`` (the CLI's exit code 3).
    Nothing is left behind: the probe file is removed at once and no folder is made.
    """
    path = Path(path)
    _check_creatable(path, path, what)
    return path


def check_writable(path: str | os.PathLike, *, what: str = "the output") -> Path:
    """Stop early (before any compute) when ``path`` cannot be written as a file: say why, in one line.

    A folder at ``path`` or a file where a parent folder should be are user errors
    (:class:`~neurontrace.errors.NeurontraceError`); a folder where new files cannot be created (read-only, no
    permission) is an ``OSError`` naming ``path``, as the write itself would raise. No folder is created: a run
    that stops before it computes leaves nothing behind.
    """
    from neurontrace.errors import NeurontraceError

    path = Path(path)
    if path.is_dir():
        raise NeurontraceError(
            f"{what} {path} is a folder, where a file is to be written; choose another path"
        )
    _check_creatable(path.parent, path, what)
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


def text_lines(path: str | os.PathLike) -> list[tuple[int, str]]:
    """``(line number, line)`` of a UTF-8 text file, split on ``\\n`` only (a ``\\r\\n`` ending is dropped too).

    ``str.splitlines`` would also split on U+2028/U+2029, form feeds and other separators, so one line of the
    file (one prompt, one JSON object) could silently become several. A first-line byte-order mark is dropped.
    Bytes that are not UTF-8 are a one-line :class:`~neurontrace.errors.DatasetError` naming the line and byte.
    """
    from neurontrace.errors import DatasetError

    path = Path(path)
    data = path.read_bytes()  # an OSError (no permission) is the machine's refusal, not the file's fault
    lines = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise DatasetError(
                f"{path}:{number}: not UTF-8 text (byte {raw[exc.start]:#04x} at column {exc.start + 1}); "
                "save the file as UTF-8"
            ) from None
        lines.append((number, line.removesuffix("\r")))
    return lines
