"""Nothing inside a run is followed through a symbolic link.

A run directory may itself be reached through links (the user chose that path), but every
path component *below* the run root (``manifest.json``, ``ledger.sqlite`` and its ``-wal`` /
``-shm`` files, ``checkpoints/``, each ``step-*`` folder and its files, ``.lock``) must be the
real thing: a link there could make a reader load a file from elsewhere or a writer write
outside the run. ``inside(root, *parts)`` checks each component with ``lstat``; reads use
``O_NOFOLLOW`` on the last component as well, so a link swapped in after the check is still
refused by the kernel.
"""

from __future__ import annotations

import errno
import os
import stat

from .errors import RunError

__all__ = ["SymlinkError", "inside", "no_link", "read_nofollow"]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class SymlinkError(RunError):
    """A path inside a run is a symbolic link (refused: nothing in a run is followed)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        super().__init__(
            f"{self.path}: is a symbolic link; nothing inside a run is followed through a link "
            "(refused; replace the link with the real file or folder)"
        )


def no_link(path: str | os.PathLike) -> bool:
    """Raise SymlinkError if ``path`` is a link; True if it exists, False if it does not."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        return False
    if stat.S_ISLNK(st.st_mode):
        raise SymlinkError(path)
    return True


def inside(root: str | os.PathLike, *parts: str) -> str:
    """``root/parts...`` after checking that no component below ``root`` is a link (the ones
    that exist; a missing component ends the check). Returns the joined path."""
    pieces = [piece for part in parts for piece in part.split("/") if piece]
    path = os.fspath(root)
    for piece in pieces:
        path = os.path.join(path, piece)
        if not no_link(path):
            break
    return os.path.join(os.fspath(root), *pieces)


def read_nofollow(path: str | os.PathLike) -> bytes:
    """The bytes of the regular file ``path``, opened with O_NOFOLLOW (SymlinkError for a link,
    FileNotFoundError if missing, RunError if it is not a regular file)."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SymlinkError(path) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RunError(f"{path}: not a regular file")
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
