"""Checkpoint folders: one ``step-XXXXXXXX/`` per checkpoint, written atomically as a whole.

Layout of ``checkpoints/step-00000100/``:

* ``tensors.safetensors``: every tensor of the state (safetensors format);
* ``state.json``: the skeleton from ``flatten_state`` (everything that is not a tensor).

A checkpoint is built in a temporary sibling folder (``.tmp-step-00000100-<random>``), every file
and the folder are fsynced, and the folder is renamed to its final name, then
``checkpoints/`` is fsynced. A ``step-*`` folder therefore only ever exists complete; a crash
leaves at most a ``.tmp-*`` folder, which readers never look at and
``remove_stale_temporaries`` deletes. Replacing an existing checkpoint swaps the two folders
atomically (``renameat2(RENAME_EXCHANGE)``) where the file system allows, and otherwise moves
the old folder to a ``.tmp-*`` name first.

Reading verifies each file's SHA-256 against the hashes the ledger recorded *before* parsing it,
and parses exactly the bytes it verified.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import secrets

from .atomic import TEMP_PREFIX, fsync_dir, sha256_bytes
from .errors import CorruptRunError
from .paths import SymlinkError, inside, no_link, read_nofollow
from .schema import check_checkpoint_state, load_json

__all__ = [
    "STATE_FILE",
    "TENSORS_FILE",
    "checkpoint_steps",
    "read_checkpoint",
    "remove_stale_temporaries",
    "step_folder_name",
    "write_checkpoint",
]

TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
CHECKPOINT_FILES = (TENSORS_FILE, STATE_FILE)

_STEP_RE = re.compile(r"step-([0-9]{8,})")


def step_folder_name(step: int) -> str:
    """``"step-00000100"`` for step 100 (at least 8 digits; longer for steps >= 10**8)."""
    if type(step) is not int or step < 0:
        raise ValueError(f"a checkpoint step must be a non-negative int, got {step!r}")
    return f"step-{step:08d}"


def _write_file_durably(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2 = None


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2). False where unsupported."""
    global _renameat2
    if _renameat2 is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2 = fn
        except (OSError, AttributeError):
            _renameat2 = False
    if _renameat2 is False:
        return False
    rc = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def write_checkpoint(checkpoints_dir: str | os.PathLike, step: int, state) -> dict[str, str]:
    """Write ``state`` as ``checkpoints_dir/step-{step:08d}/``, atomically and durably.

    ``state`` is anything ``flatten_state`` accepts (TypeError otherwise, before any file is
    touched). An existing checkpoint of the same step is replaced: after a crash the folder holds
    the old checkpoint or the new one (on file systems without ``RENAME_EXCHANGE``, a crash in
    the instant between two renames can leave no folder, never a partial one).

    Returns ``{"tensors.safetensors": sha256, "state.json": sha256}`` for the ledger.
    """
    name = step_folder_name(step)
    checkpoints_dir = os.fspath(checkpoints_dir)
    no_link(checkpoints_dir)  # never write through a linked checkpoints/ (or step folder)
    no_link(os.path.join(checkpoints_dir, name))
    from .encode import flatten_state  # torch loads here, on first use: listing a run needs none
    from safetensors.torch import save as save_safetensors_bytes

    skeleton, tensors = flatten_state(state)
    state_bytes = (
        json.dumps(skeleton, indent=1, sort_keys=False, allow_nan=False, ensure_ascii=True) + "\n"
    ).encode("ascii")

    tmp = os.path.join(checkpoints_dir, f"{TEMP_PREFIX}{name}-{secrets.token_hex(8)}")
    final = os.path.join(checkpoints_dir, name)
    os.mkdir(tmp)
    try:
        # safetensors.torch.save gives the same bytes save_file would write; writing them
        # ourselves gives one write, an fsync before close, the hash of exactly those bytes,
        # and the usual file mode.
        tensor_bytes = save_safetensors_bytes(tensors)
        del tensors
        _write_file_durably(os.path.join(tmp, TENSORS_FILE), tensor_bytes)
        _write_file_durably(os.path.join(tmp, STATE_FILE), state_bytes)
        hashes = {TENSORS_FILE: sha256_bytes(tensor_bytes), STATE_FILE: sha256_bytes(state_bytes)}
        del tensor_bytes
        fsync_dir(tmp)

        if os.path.lexists(final) and _exchange(tmp, final):
            fsync_dir(checkpoints_dir)  # tmp now holds the old checkpoint; removed below
        else:
            if os.path.lexists(final):
                trash = os.path.join(checkpoints_dir, f"{TEMP_PREFIX}old-{name}-{secrets.token_hex(8)}")
                os.rename(final, trash)
                try:
                    os.rename(tmp, final)
                except BaseException:
                    os.rename(trash, final)  # put the old checkpoint back
                    raise
                tmp = trash
            else:
                os.rename(tmp, final)
                tmp = None
            fsync_dir(checkpoints_dir)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        fsync_dir(checkpoints_dir)
    return hashes


def _read_verified(path: str, expected_sha256: str) -> bytes:
    try:
        data = read_nofollow(path)
    except SymlinkError:
        raise
    except FileNotFoundError:
        raise CorruptRunError(path, "missing (the ledger records this checkpoint file)") from None
    except OSError as e:
        raise CorruptRunError(path, f"cannot be read: {e.strerror or e}") from None
    actual = sha256_bytes(data)
    if actual != expected_sha256:
        raise CorruptRunError(
            path,
            f"SHA-256 mismatch: the ledger records {expected_sha256}, the file ({len(data)} bytes) "
            f"hashes to {actual}; the file was changed, truncated or replaced",
        )
    return data


def read_checkpoint(checkpoints_dir: str | os.PathLike, step: int, expected: dict[str, str]):
    """Load the checkpoint of ``step``, verified against ``expected`` (file name -> SHA-256).

    Each file is read once, its hash checked, and only then are those same bytes parsed
    (safetensors for tensors, JSON for the rest). Raises CorruptRunError naming the file when it
    is missing, its hash differs (flipped bytes, truncation, substitution), or it does not parse.
    Files in the folder that ``expected`` does not name are never opened.
    """
    from .encode import unflatten_state  # torch loads on first use (see write_checkpoint)
    from safetensors.torch import load as load_safetensors_bytes

    folder = inside(os.fspath(checkpoints_dir), step_folder_name(step))
    no_link(checkpoints_dir)
    if not isinstance(expected, dict) or not all(f in expected for f in CHECKPOINT_FILES):
        raise CorruptRunError(folder, f"the recorded file hashes are incomplete: {expected!r}")
    if not no_link(folder) or not os.path.isdir(folder):
        raise CorruptRunError(folder, "missing: the ledger records this checkpoint")
    data = {}
    for fname in CHECKPOINT_FILES:
        data[fname] = _read_verified(os.path.join(folder, fname), expected[fname])

    state_path = os.path.join(folder, STATE_FILE)
    # Size, depth, strict JSON; then the engine checkpoint's format (a newer one is refused),
    # keys and completed_steps == step (the step of the folder name and of the ledger record).
    skeleton = load_json(data[STATE_FILE], state_path, "checkpoint")
    check_checkpoint_state(skeleton, state_path, step)
    del data[STATE_FILE]
    tensors_path = os.path.join(folder, TENSORS_FILE)
    try:
        loaded = load_safetensors_bytes(data[TENSORS_FILE])  # safetensors: never pickle
    except Exception as e:  # safetensors raises its own SafetensorError, among others
        raise CorruptRunError(tensors_path, f"not a valid safetensors file: {e}") from None
    # safetensors.torch.load views immutable bytes objects; give each tensor its own storage
    # so that in-place updates after a restore (optimizer moments) are safe.
    del data[TENSORS_FILE]
    tensors = {k: v.clone() for k, v in loaded.items()}
    del loaded
    try:
        return unflatten_state(skeleton, tensors)
    except ValueError as e:
        raise CorruptRunError(state_path, str(e)) from None


def checkpoint_steps(checkpoints_dir: str | os.PathLike) -> list[int]:
    """Sorted steps of the complete ``step-XXXXXXXX`` folders in ``checkpoints_dir``.

    Looks at names only (plus that both files exist); never opens a file, never considers
    ``.tmp-*`` or anything else. Whether a folder is *recorded* is the ledger's business.
    """
    checkpoints_dir = os.fspath(checkpoints_dir)
    steps = []
    for entry in os.scandir(checkpoints_dir):
        m = _STEP_RE.fullmatch(entry.name)
        if not m or not entry.is_dir(follow_symlinks=False):
            continue
        step = int(m.group(1))
        if step_folder_name(step) != entry.name:  # e.g. "step-000000001": not ours
            continue
        if all(os.path.isfile(os.path.join(entry.path, f)) for f in CHECKPOINT_FILES):
            steps.append(step)
    return sorted(steps)


def remove_stale_temporaries(checkpoints_dir: str | os.PathLike) -> list[str]:
    """Delete the ``.tmp-*`` entries a crashed writer left in ``checkpoints_dir``.

    Only call this while holding the run's write lock (another writer's temporaries are live).
    Returns the names removed.
    """
    checkpoints_dir = os.fspath(checkpoints_dir)
    removed = []
    for entry in os.scandir(checkpoints_dir):
        if not entry.name.startswith(TEMP_PREFIX):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)
        removed.append(entry.name)
    if removed:
        fsync_dir(checkpoints_dir)
    return sorted(removed)
