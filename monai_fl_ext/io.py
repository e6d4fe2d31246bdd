"""Atomic file and directory output, and content hashing.

Outputs are written under a temporary name in the destination's folder and renamed into
place, so a crash or a bad input never leaves a half-written file or folder behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename.

    Args:
        path: destination file; its parent folder is created if needed.
        data: the bytes to write.

    Returns:
        The destination path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def to_json(obj: Any) -> str:
    """Canonical JSON used for every file the package writes: sorted keys, 2-space indent, final newline."""
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as canonical JSON (see :func:`to_json`) atomically."""
    return atomic_write_text(path, to_json(obj))


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, raising :class:`~monai_fl_ext.errors.InputError` naming the file on failure."""
    from monai_fl_ext.errors import InputError

    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise InputError(f"{path}: file not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Build a folder under a temporary name and move it to ``path`` only if the block succeeds.

    Args:
        path: the final folder.
        overwrite: replace an existing folder at ``path``; if False an existing folder is an error.

    Yields:
        The temporary folder to write into.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hex SHA-256 of ``obj``'s canonical JSON, so equal content gives an equal hash."""
    return hashlib.sha256(to_json(obj).encode("utf-8")).hexdigest()
