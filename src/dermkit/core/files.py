"""Atomic file writes and file hashing: the one home for both.

A write goes to a temporary file in the destination's folder, then ``os.replace`` moves it
onto the destination, so a reader sees the old file or the new one, never half of one
(same folder: the rename stays on one filesystem, where it is atomic).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``.

    For writers that take a file name (``DataFrame.to_csv``, ``safetensors.save_file``,
    ``Image.save`` with an explicit format). On an exception the temporary file is removed
    and ``path`` is left as it was.
    """
    path = Path(path)
    # A unique name: two processes writing the same file must not share a temp file.
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns ``path``."""
    return write_bytes_atomic(path, text.encode(encoding))


def write_json_atomic(path: str | Path, obj: Any, *, indent: int | None = 2, **dumps: Any) -> Path:
    """Write ``json.dumps(obj, indent=indent, **dumps)`` to ``path`` atomically.

    ``dumps`` passes options such as ``default=str`` or ``allow_nan=False`` through; the
    object is serialised before the file is touched, so an unserialisable object leaves
    ``path`` unchanged.
    """
    return write_text_atomic(path, json.dumps(obj, indent=indent, **dumps))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in ``chunk``-byte blocks (constant memory)."""
    return update_sha256(hashlib.sha256(), path, chunk).hexdigest()


def update_sha256(digest: Any, path: str | Path, chunk: int = 1 << 20) -> Any:
    """Feed a file's bytes into ``digest`` (a ``hashlib`` object) block by block; returns it."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest
