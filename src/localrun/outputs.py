"""Files the operator commands write (a PNG, a CSV, a model): written under a temporary name in the same folder
and renamed into place, so a failed or interrupted command leaves the previous file (or none), never half a one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from localrun.errors import OperatorError


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an error, it becomes ``path``."""
    folder = path.parent
    if not folder.is_dir():
        raise OperatorError(f"cannot write {path}: folder {folder} does not exist")
    if path.is_dir():
        raise OperatorError(f"cannot write {path}: it is a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise OperatorError(f"cannot write {path}: {exc}") from exc
    os.close(fd)
    temporary = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    temporary.chmod(0o666 & ~umask)  # as open() would create it (mkstemp makes it private)
    try:
        yield temporary
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
