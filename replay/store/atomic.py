"""Crash-safe file writes and content hashes.

A write that must survive a crash goes to a temporary file in the destination's own folder
(named ``.tmp-<name>-<random>``, so readers that skip ``.tmp-*`` never mistake it for data), is
flushed and fsynced, renamed over the destination with ``os.replace`` (atomic on POSIX), and then
the folder itself is fsynced so the rename is durable. After a crash the destination holds either
the old content or the new one, never a mix; at worst a ``.tmp-*`` file is left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets

__all__ = [
    "TEMP_PREFIX",
    "atomic_write_bytes",
    "atomic_write_json",
    "fsync_dir",
    "json_bytes",
    "sha256_bytes",
    "sha256_file",
]

TEMP_PREFIX = ".tmp-"
"""Names starting with this are temporaries: never read as data, removed by cleanup."""

_CHUNK = 1 << 20


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder, making renames and creations inside it durable."""
    fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(final_name: str) -> str:
    """A fresh temporary name for ``final_name`` (same folder, ``.tmp-`` prefix, random tail)."""
    return f"{TEMP_PREFIX}{final_name}-{secrets.token_hex(8)}"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably.

    Temporary file in the same folder, write, flush, fsync, ``os.replace`` onto ``path``, fsync
    of the folder. The file gets mode 0o666 minus the umask, as ``open(path, "w")`` would.
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, temp_name(name))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(folder)


def json_bytes(obj, *, sort_keys: bool = True) -> bytes:
    """The run store's JSON text for ``obj``: indented, strict (no NaN/Infinity), newline-ended.

    Raises ValueError for non-finite floats and TypeError for values JSON cannot hold.
    """
    text = json.dumps(obj, indent=2, sort_keys=sort_keys, allow_nan=False, ensure_ascii=True)
    return (text + "\n").encode("ascii")


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """``atomic_write_bytes`` of ``json.dumps(obj, indent=2, sort_keys=True, allow_nan=False)``
    plus a newline. The JSON is built before anything is written, so an unserializable ``obj``
    leaves the destination untouched."""
    atomic_write_bytes(path, json_bytes(obj))


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the file at ``path``, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()
