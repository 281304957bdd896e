"""The run directory: manifest, ledger, checkpoints, and the single-writer lock.

::

    RUN/
      manifest.json     what was run and where (JSON, rewritten atomically); "status" is
                        "incomplete" until the recording finishes
      ledger.sqlite     one row per step, epochs, checkpoint hashes, events (see ledger.py)
      checkpoints/      step-XXXXXXXX/{tensors.safetensors,state.json} (see checkpoint.py)
      .lock             flock'ed by the one writer; holds its pid

Nothing in a run is ever unpickled or executed: JSON, SQLite and safetensors only.

The store owns two manifest keys: ``status`` (``"incomplete"`` or ``"complete"``) and
``store_version`` (the run layout's version, 1). The rest is the run manifest that
``replay.driver`` builds; every manifest written or read is checked against ``schema.MANIFEST``
(types, ranges, required keys, size and depth limits), and one written by a newer replay is
refused ("written by a newer replay (format N); this is format M: upgrade").

Manifest integrity. The writer records the manifest's SHA-256 in the ledger's ``meta`` table
when it creates the run and on every update (``manifest_sha256``; ``manifest_sha256_next`` is
set first, so a crash between the ledger and the file leaves a digest that matches whichever
file is on disk). Every read of the manifest compares the file with it, so an edit, even one
flipped byte in a key, is refused naming the file. A run written before digests were recorded
(its ledger has none) is still read, validated by the schema, and reports
``manifest_digest_recorded == False`` (``replay inspect`` can flag it); its writer records the
digest at its next manifest update.

Symbolic links: nothing below the run root is followed (see ``paths.py``); a link in place of
the manifest, the ledger, ``checkpoints/``, a checkpoint folder or file, or the lock file is
refused with SymlinkError, for reading and for writing.

Writers take ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``.lock`` for the RunDir's lifetime; a second
writer, in this process or another, gets RunLockedError at once. The kernel drops the lock when
the holder dies, so a crash never leaves a run locked. Readers take no lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import shutil

from .atomic import TEMP_PREFIX, atomic_write_bytes, fsync_dir, json_bytes, sha256_bytes
from .checkpoint import (
    checkpoint_steps,
    read_checkpoint,
    remove_stale_temporaries,
    step_folder_name,
    write_checkpoint,
)
from .errors import CorruptRunError, RunError, RunExistsError, RunLockedError
from .ledger import Ledger
from .paths import SymlinkError, inside, no_link, read_nofollow
from .schema import check_manifest, load_json

__all__ = ["CHECKPOINTS", "LEDGER", "LOCK", "MANIFEST", "STORE_VERSION", "RunDir"]

MANIFEST = "manifest.json"
LEDGER = "ledger.sqlite"
CHECKPOINTS = "checkpoints"
LOCK = ".lock"
STORE_VERSION = 1
_STATUSES = ("incomplete", "complete")


# The write locks this process holds (fd -> the pid that took it). A forked child (a data-loader
# worker, a pool process) inherits the fds, and with them the parent's flock: a parent killed
# with -9 would leave its run locked for as long as a child lives. So a child closes its copies
# at once, without unlocking (LOCK_UN would release the parent's lock too), and a release by any
# process but the one that took the lock does nothing (the fd number may be reused by then).
_HELD_LOCKS: dict[int, int] = {}


def _close_inherited_locks() -> None:
    for fd in list(_HELD_LOCKS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


def _take_lock(folder: str) -> int:
    """flock ``folder/.lock`` exclusively (non-blocking) and write our pid; return the fd."""
    lock_path = os.path.join(folder, LOCK)
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SymlinkError(lock_path) from None
        raise RunError(f"{lock_path}: cannot open the write lock: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        pid = None
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            try:
                pid = int(os.pread(fd, 32, 0).decode("ascii").strip())
            except (OSError, ValueError, UnicodeDecodeError):
                pid = None
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise RunLockedError(folder, pid) from None
        raise RunError(f"{lock_path}: cannot take the write lock: {e.strerror or e}") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    except OSError:
        os.close(fd)
        raise
    _HELD_LOCKS[fd] = os.getpid()
    return fd


def _release_lock(fd: int) -> None:
    if _HELD_LOCKS.pop(fd, None) != os.getpid():
        return  # taken by the process this one was forked from: not ours to release
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _manifest_bytes(folder: str) -> bytes:
    path = inside(folder, MANIFEST)
    try:
        return read_nofollow(path)
    except FileNotFoundError:
        raise CorruptRunError(path, "missing") from None
    except SymlinkError:
        raise
    except OSError as e:
        raise CorruptRunError(path, f"cannot be read: {e.strerror or e}") from None


def _parse_manifest(path: str, data: bytes) -> dict:
    """Parse and validate manifest bytes (SchemaError / NewerFormatError naming ``path``)."""
    obj = load_json(data, path, "manifest")
    check_manifest(obj, path, STORE_VERSION)
    return obj


def _read_manifest(folder: str, ledger: Ledger | None = None) -> dict:
    """The manifest of the run at ``folder``, checked against the digest ``ledger`` records
    (when it records one) and validated."""
    path = os.path.join(folder, MANIFEST)
    data = _manifest_bytes(folder)
    manifest = _parse_manifest(path, data)  # what is wrong with it first, then whether it was edited
    if ledger is not None:
        recorded, pending = ledger.manifest_digests()
        if recorded is not None and sha256_bytes(data) not in (recorded, pending):
            raise CorruptRunError(
                path,
                f"SHA-256 mismatch: {LEDGER} records {recorded}, the file hashes to "
                f"{sha256_bytes(data)}; the manifest was edited or damaged after its writer wrote it",
            )
    return manifest


def _check_layout(path: str) -> None:
    """No entry of the run layout is a symbolic link (SymlinkError naming it)."""
    for name in (MANIFEST, LEDGER, CHECKPOINTS, LOCK):
        no_link(os.path.join(path, name))


class RunDir:
    """A run directory, open for reading or (holding the lock) for writing.

    Build with ``RunDir.create(path, manifest)`` or ``RunDir.open(path, writable=False)``;
    use as a context manager or call ``close()``.
    """

    def __init__(self, path: str, ledger: Ledger, lock_fd: int | None):
        self._path = path
        self._ledger = ledger
        self._lock_fd = lock_fd

    # ---------------------------------------------------------------- opening ----

    @classmethod
    def create(cls, path: str | os.PathLike, manifest: dict) -> RunDir:
        """Create a run at ``path`` and return it open for writing (lock held).

        ``path`` must not exist or be an empty folder (RunExistsError otherwise); missing
        parents are created. The run is assembled in a temporary sibling folder and renamed into
        place, so ``path`` never holds a half-made run. ``manifest`` (a JSON-able dict) is
        written with ``status="incomplete"`` and ``store_version`` added.
        """
        if not isinstance(manifest, dict):
            raise TypeError(f"manifest must be a dict, got {type(manifest).__name__}")
        if "store_version" in manifest and manifest["store_version"] != STORE_VERSION:
            raise ValueError("manifest key 'store_version' is reserved for the run store")
        manifest = {**manifest, "status": "incomplete", "store_version": STORE_VERSION}
        data = json_bytes(manifest)  # TypeError / ValueError now, before anything is made
        path = os.path.abspath(os.fspath(path))
        _parse_manifest(os.path.join(path, MANIFEST), data)  # never write what a reader refuses

        if os.path.lexists(path) and not (
            os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)
        ):
            raise RunExistsError(f"{path}: already exists and is not an empty folder")
        parent, name = os.path.split(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f"{TEMP_PREFIX}run-{name}-{secrets.token_hex(8)}")
        os.mkdir(tmp)
        lock_fd = None
        try:
            lock_fd = _take_lock(tmp)  # the flock follows the inode through the rename
            atomic_write_bytes(os.path.join(tmp, MANIFEST), data)
            with Ledger.create(os.path.join(tmp, LEDGER)) as new_ledger:
                new_ledger.record_manifest_digest(sha256_bytes(data))
            os.mkdir(os.path.join(tmp, CHECKPOINTS))
            fsync_dir(os.path.join(tmp, CHECKPOINTS))
            fsync_dir(tmp)
            try:
                os.rename(tmp, path)  # onto nothing or an empty folder; atomic
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise RunExistsError(f"{path}: already exists and is not an empty folder") from None
                raise
            tmp = None
            fsync_dir(parent)
            ledger = Ledger.open(os.path.join(path, LEDGER), writable=True)
        except BaseException:
            if lock_fd is not None:
                _release_lock(lock_fd)
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(path, ledger, lock_fd)

    @classmethod
    def open(cls, path: str | os.PathLike, writable: bool = False) -> RunDir:
        """Open an existing run. ``writable=True`` takes the write lock (RunLockedError if held)
        and removes temporaries a crashed writer left. RunError if ``path`` is not a run;
        CorruptRunError naming the file if the manifest or ledger is damaged."""
        path = os.path.abspath(os.fspath(path))
        if not os.path.isdir(path):
            raise RunError(f"{path}: no run directory here")
        if not os.path.lexists(os.path.join(path, MANIFEST)):
            raise RunError(f"{path}: not a replay run (no {MANIFEST})")
        _check_layout(path)
        lock_fd = _take_lock(path) if writable else None
        try:
            _read_manifest(path)  # what is wrong with the manifest first
            checkpoints_dir = os.path.join(path, CHECKPOINTS)
            if not os.path.isdir(checkpoints_dir):
                raise CorruptRunError(checkpoints_dir, "missing: every run has a checkpoints folder")
            ledger = Ledger.open(os.path.join(path, LEDGER), writable=writable)
            try:
                _read_manifest(path, ledger)
                if writable:
                    remove_stale_temporaries(checkpoints_dir)
                    _remove_temp_files(path)
            except BaseException:
                ledger.close()
                raise
        except BaseException:
            if lock_fd is not None:
                _release_lock(lock_fd)
            raise
        return cls(path, ledger, lock_fd)

    def close(self) -> None:
        """Close the ledger and release the write lock (idempotent)."""
        try:
            self._ledger.close()
        finally:
            if self._lock_fd is not None:
                fd, self._lock_fd = self._lock_fd, None
                _release_lock(fd)

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        # A RunDir dropped without close() must not keep the run locked.
        fd = getattr(self, "_lock_fd", None)
        if fd is not None:
            self._lock_fd = None
            try:
                _release_lock(fd)
            except OSError:
                pass

    def __repr__(self) -> str:
        mode = "writable" if self.writable else "read-only"
        return f"RunDir({self._path!r}, {mode})"

    # ---------------------------------------------------------------- properties --

    @property
    def path(self) -> str:
        """Absolute path of the run folder."""
        return self._path

    @property
    def writable(self) -> bool:
        return self._lock_fd is not None

    @property
    def ledger(self) -> Ledger:
        return self._ledger

    @property
    def checkpoints_dir(self) -> str:
        return os.path.join(self._path, CHECKPOINTS)

    @property
    def manifest(self) -> dict:
        """The manifest as on disk now (a fresh dict each time; edit it via update_manifest),
        checked against the digest the ledger records and validated."""
        return _read_manifest(self._path, self._ledger)

    @property
    def manifest_digest_recorded(self) -> bool:
        """False for a run written before the manifest's SHA-256 was recorded in its ledger:
        its manifest is validated but an edit to it cannot be detected."""
        return self._ledger.manifest_digests()[0] is not None

    @property
    def is_complete(self) -> bool:
        return self.manifest["status"] == "complete"

    def _need_writable(self, what: str) -> None:
        if self._lock_fd is None:
            raise RunError(f"{self._path}: cannot {what}: the run is open read-only")

    # ---------------------------------------------------------------- manifest ----

    def update_manifest(self, changes: dict) -> dict:
        """Merge ``changes`` into the manifest (top-level keys) and rewrite it atomically.
        Returns the new manifest."""
        self._need_writable("update the manifest")
        if not isinstance(changes, dict):
            raise TypeError(f"changes must be a dict, got {type(changes).__name__}")
        if "status" in changes and changes["status"] not in _STATUSES:
            raise ValueError(f"status must be one of {_STATUSES}, got {changes['status']!r}")
        if "store_version" in changes and changes["store_version"] != STORE_VERSION:
            raise ValueError("manifest key 'store_version' is reserved for the run store")
        manifest = {**self.manifest, **changes}
        data = json_bytes(manifest)
        path = inside(self._path, MANIFEST)
        _parse_manifest(path, data)
        digest = sha256_bytes(data)
        self._ledger.record_manifest_digest(digest, pending=True)
        atomic_write_bytes(path, data)
        self._ledger.record_manifest_digest(digest)
        return manifest

    def mark_complete(self) -> None:
        """Set the manifest's status to "complete" (the recording finished)."""
        self.update_manifest({"status": "complete"})

    # ---------------------------------------------------------------- checkpoints -

    def save_checkpoint(self, step: int, state) -> dict[str, str]:
        """Write the checkpoint of ``step`` and record its file hashes in the ledger.

        Order: forget any earlier record of ``step``, write the folder atomically, record it.
        A crash in between leaves a complete but unrecorded folder, which is ignored and
        overwritten later. Returns the recorded {file name: SHA-256}.
        """
        self._need_writable("save a checkpoint")
        if self._ledger.checkpoint_files(step) is not None:
            self._ledger.remove_checkpoint(step)
        files = write_checkpoint(self.checkpoints_dir, step, state)
        self._ledger.record_checkpoint(step, files)
        return files

    def load_checkpoint(self, step: int):
        """Load the recorded checkpoint of ``step``, verified against the ledger's hashes.
        CorruptRunError naming the file on any mismatch, or if ``step`` has no recorded
        checkpoint."""
        files = self._ledger.checkpoint_files(step)
        if files is None:
            folder = os.path.join(self.checkpoints_dir, step_folder_name(step))
            raise CorruptRunError(folder, f"no checkpoint of step {step} is recorded in {LEDGER}")
        state = read_checkpoint(self.checkpoints_dir, step, files)
        first = self.manifest.get("first_step", 0)
        if step != first and self._ledger.last_step() is not None and self._ledger.step_row(step - 1) is None:
            folder = os.path.join(self.checkpoints_dir, step_folder_name(step))
            raise CorruptRunError(
                folder, f"the checkpoint of step {step} has no ledger row of step {step - 1} before it "
                "(a checkpoint is recorded only after the rows it follows)")
        return state

    def checkpoint_steps(self) -> list[int]:
        """Steps with a recorded checkpoint, ascending."""
        return sorted(self._ledger.checkpoints())

    def latest_checkpoint_at_or_before(self, step: int) -> int | None:
        """The highest recorded checkpoint step <= ``step``, or None."""
        found = [s for s in self._ledger.checkpoints() if s <= step]
        return max(found) if found else None

    def truncate_after(self, step: int, keep_checkpoint: int | None = None) -> None:
        """Forget everything after ``step``: ledger rows and checkpoint records (one
        transaction, see ``Ledger.truncate_after`` for ``keep_checkpoint``), then the checkpoint
        folders (each renamed to a temporary name before it is deleted, so a crash never leaves
        a partial ``step-*`` folder)."""
        self._need_writable("truncate")
        no_link(self.checkpoints_dir)
        for entry in os.scandir(self.checkpoints_dir):  # refuse before anything is forgotten
            if entry.name.startswith("step-") and entry.is_symlink():
                raise SymlinkError(entry.path)
        self._ledger.truncate_after(step, keep_checkpoint=keep_checkpoint)
        for s in checkpoint_steps(self.checkpoints_dir):
            if s > step and s != keep_checkpoint:
                src = inside(self.checkpoints_dir, step_folder_name(s))
                dst = os.path.join(
                    self.checkpoints_dir, f"{TEMP_PREFIX}del-{step_folder_name(s)}-{secrets.token_hex(8)}"
                )
                os.rename(src, dst)
                fsync_dir(self.checkpoints_dir)
                shutil.rmtree(dst)


def _remove_temp_files(folder: str) -> None:
    """Remove ``.tmp-*`` files (interrupted manifest writes) directly inside the run folder."""
    removed = False
    for entry in os.scandir(folder):
        if entry.name.startswith(TEMP_PREFIX) and entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)
            removed = True
    if removed:
        fsync_dir(folder)
