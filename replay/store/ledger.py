"""The ledger: one SQLite database (WAL mode, ``synchronous=FULL``) holding a row per step.

Tables (every value that must be exact is stored as text, so SQLite's signed 64-bit INTEGER and
lossy REAL never touch it)::

    meta(key TEXT PRIMARY KEY, value TEXT)          format marker and version; the manifest's
                                                    SHA-256 ("manifest_sha256", and
                                                    "manifest_sha256_next" while it is rewritten)
    steps(step INTEGER PRIMARY KEY, epoch INTEGER, batch_ids TEXT,  -- JSON list of ints
          batch_hash TEXT, loss TEXT, lr TEXT,      -- float_to_text, NULL for None
          metrics TEXT,                             -- JSON {name: float_to_text}
          fingerprints TEXT,                        -- JSON {component: {tensor: 16 hex digits}}
          digest TEXT,                              -- 16 hex digits
          rank_digests TEXT)                        -- JSON [16 hex digits per rank], NULL for one
                                                    -- process (absent from earlier ledgers)
    epochs(epoch INTEGER PRIMARY KEY, order_hash TEXT)
    checkpoints(step INTEGER PRIMARY KEY, files TEXT)   -- JSON {file name: sha256}
    events(id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL, kind TEXT, detail TEXT)  -- JSON

Floats are written with ``float_to_text`` (shortest repr, ``inf``, ``nan``, or the exact NaN
bits), so loss, learning rate and metrics come back bit for bit. Unsigned 64-bit fingerprints
and digests are 16 lowercase hex digits: readable, sortable, lossless in any JSON tool.

Every write method is one transaction, committed durably before it returns. Opening runs
``PRAGMA quick_check``; a file that is not a SQLite database, is damaged, or is not a replay
ledger raises CorruptRunError naming it, and no raw ``sqlite3`` error escapes any method.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import numbers
import operator
import os
import sqlite3
import time
from urllib.parse import quote

from .floats import float_from_text, float_to_text
from .errors import CorruptRunError, RunError, RunExistsError
from .paths import no_link

__all__ = ["Ledger", "StepRow"]

_FORMAT = "replay-ledger"
_VERSION = 1
_U64 = 1 << 64

_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE steps(
    step INTEGER PRIMARY KEY,
    epoch INTEGER NOT NULL,
    batch_ids TEXT NOT NULL,
    batch_hash TEXT NOT NULL,
    loss TEXT,
    lr TEXT,
    metrics TEXT NOT NULL,
    fingerprints TEXT NOT NULL,
    digest TEXT NOT NULL,
    rank_digests TEXT
);
CREATE TABLE epochs(epoch INTEGER PRIMARY KEY, order_hash TEXT NOT NULL);
CREATE TABLE checkpoints(step INTEGER PRIMARY KEY, files TEXT NOT NULL);
CREATE TABLE events(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
);
"""
_TABLES = {"meta", "steps", "epochs", "checkpoints", "events"}

# SQLite primary result codes that mean "this file is damaged or not a database".
_SQLITE_CORRUPT, _SQLITE_NOTADB, _SQLITE_IOERR = 11, 26, 10


@dataclasses.dataclass
class StepRow:
    """One step of a recording.

    ``fingerprints`` maps component (``"model"``, ``"optimizer"``, ``"ema"``, ...) to tensor name
    to an unsigned 64-bit fingerprint; ``digest`` combines them (unsigned 64-bit).
    """

    step: int
    epoch: int
    batch_ids: list[int]
    batch_hash: str
    loss: float | None
    lr: float | None
    metrics: dict[str, float]
    fingerprints: dict[str, dict[str, int]]
    digest: int
    # A run of several processes (replay.distributed): the digest of each rank's state, in rank
    # order (rank 0's is `digest`); None for one process.
    rank_digests: list[int] | None = None


def _u64(value, what: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an int, got bool")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(value).__name__}") from None
    if not 0 <= v < _U64:
        raise ValueError(f"{what} must be an unsigned 64-bit int, got {value!r}")
    return v


def _float(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a real number, got {type(value).__name__}")
    return float(value)


def _int(value, what: str, minimum: int | None = 0) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an int, got bool")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(value).__name__}") from None
    if minimum is not None and v < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {v}")
    return v


def _dumps(obj) -> str:
    return json.dumps(obj, allow_nan=False, ensure_ascii=True, separators=(",", ":"))


def _encode_row(row: StepRow) -> tuple:
    if not isinstance(row, StepRow):
        raise TypeError(f"expected a StepRow, got {type(row).__name__}")
    step = _int(row.step, "StepRow.step")
    epoch = _int(row.epoch, "StepRow.epoch")
    # Fast paths for what the engine writes (Python ints); anything else is checked one by one.
    batch_ids = list(row.batch_ids)
    if not all(type(b) is int for b in batch_ids):
        batch_ids = [_int(b, "StepRow.batch_ids[...]", None) for b in batch_ids]
    if not isinstance(row.batch_hash, str):
        raise TypeError("StepRow.batch_hash must be a str")
    loss = None if row.loss is None else float_to_text(_float(row.loss, "StepRow.loss"))
    lr = None if row.lr is None else float_to_text(_float(row.lr, "StepRow.lr"))
    metrics = {}
    for k, v in row.metrics.items():
        if not isinstance(k, str):
            raise TypeError(f"StepRow.metrics keys must be str, got {k!r}")
        metrics[k] = float_to_text(_float(v, f"StepRow.metrics[{k!r}]"))
    fps = {}
    for comp, tensors in row.fingerprints.items():
        if not isinstance(comp, str):
            raise TypeError(f"StepRow.fingerprints components must be str, got {comp!r}")
        fps[comp] = {}
        for name, fp in tensors.items():
            if not isinstance(name, str):
                raise TypeError(f"StepRow.fingerprints[{comp!r}] keys must be str, got {name!r}")
            if type(fp) is not int or not 0 <= fp < _U64:
                fp = _u64(fp, f"fingerprint {comp}/{name}")  # raises with the reason, or normalizes
            fps[comp][name] = f"{fp:016x}"
    digest = f"{_u64(row.digest, 'StepRow.digest'):016x}"
    ranks = None
    if row.rank_digests is not None:
        if not isinstance(row.rank_digests, (list, tuple)) or not row.rank_digests:
            raise TypeError("StepRow.rank_digests must be a non-empty list of ints, or None")
        ranks = _dumps([f"{_u64(d, f'StepRow.rank_digests[{r}]'):016x}" for r, d in enumerate(row.rank_digests)])
    return (step, epoch, _dumps(batch_ids), row.batch_hash, loss, lr, _dumps(metrics),
            _dumps(fps), digest, ranks)


def _hex_u64(text) -> int:
    if not isinstance(text, str) or len(text) != 16:
        raise ValueError(f"not 16 hex digits: {text!r}")
    return int(text, 16)


_MAX_DEPTH = 8  # the deepest JSON a ledger column holds is 3 (fingerprints); events allow 8


def _loads(text, max_depth: int = _MAX_DEPTH):
    """json.loads of a ledger column, refusing (ValueError) text nested deeper than
    ``max_depth`` before parsing it (no RecursionError from a hostile ledger) and anything that
    is not text."""
    from .schema import _nesting_depth

    if not isinstance(text, str):
        raise ValueError(f"not JSON text: {type(text).__name__}")
    data = text.encode("utf-8", "surrogatepass")
    if _nesting_depth(data) > max_depth:
        raise ValueError(f"JSON nested deeper than {max_depth} levels")
    return json.loads(text)


def _decode_ids(text) -> list[int]:
    ids = _loads(text)
    if type(ids) is not list or not all(type(i) is int for i in ids):
        raise ValueError("batch_ids is not a list of ints")
    return ids


def _decode_rank_digests(text) -> list[int] | None:
    if text is None:
        return None
    digests = _loads(text)
    if type(digests) is not list or not digests:
        raise ValueError("rank_digests is not a non-empty JSON list")
    return [_hex_u64(d) for d in digests]


def _decode_row(r: tuple) -> StepRow:
    step, epoch, batch_ids, batch_hash, loss, lr, metrics, fps, digest, ranks = r
    ids = _decode_ids(batch_ids)
    return StepRow(
        step=step,
        epoch=epoch,
        batch_ids=ids,
        batch_hash=batch_hash,
        loss=None if loss is None else float_from_text(loss),
        lr=None if lr is None else float_from_text(lr),
        metrics={k: float_from_text(v) for k, v in _loads(metrics).items()},
        fingerprints={
            comp: {name: _hex_u64(v) for name, v in tensors.items()}
            for comp, tensors in _loads(fps).items()
        },
        digest=_hex_u64(digest),
        rank_digests=_decode_rank_digests(ranks),
    )


_STEP_COLUMNS = "step, epoch, batch_ids, batch_hash, loss, lr, metrics, fingerprints, digest"
# Ledgers written before runs of several processes have no rank_digests column: read as NULL.
_RANK_COLUMN = "rank_digests"


class Ledger:
    """A run's ledger file. Build with ``Ledger.create(path)`` or ``Ledger.open(path, writable)``.

    Not shareable across threads (sqlite3's default check). Use as a context manager or call
    ``close()``. Concurrent readers are fine while one writer appends (WAL).
    """

    def __init__(self, path: str, conn: sqlite3.Connection, writable: bool):
        self._path = path
        self._conn: sqlite3.Connection | None = conn
        self._writable = writable
        with _sqlite_errors(path):
            columns = {r[1] for r in conn.execute("PRAGMA table_info(steps)").fetchall()}
        self._has_rank_column = _RANK_COLUMN in columns
        self._select = f"{_STEP_COLUMNS}, {_RANK_COLUMN if self._has_rank_column else 'NULL'}"

    # ------------------------------------------------------------------ opening ----

    @property
    def path(self) -> str:
        return self._path

    @property
    def writable(self) -> bool:
        return self._writable

    @classmethod
    def create(cls, path: str | os.PathLike) -> Ledger:
        """Create a new, empty ledger at ``path`` (RunExistsError if the file exists)."""
        path = os.fspath(path)
        _no_links(path)
        if os.path.lexists(path):
            raise RunExistsError(f"{path}: a ledger already exists here")
        with _sqlite_errors(path):
            # O_EXCL makes creation exclusive; the URI then opens (never creates) the file.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            os.close(fd)
            conn = _connect(path, writable=True)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("BEGIN IMMEDIATE")
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
                conn.execute("INSERT INTO meta VALUES ('format', ?), ('version', ?)",
                             (_FORMAT, str(_VERSION)))
                conn.execute("COMMIT")
            except BaseException:
                conn.close()
                raise
        return cls(path, conn, writable=True)

    @classmethod
    def open(cls, path: str | os.PathLike, writable: bool = False) -> Ledger:
        """Open an existing ledger; read-only by default (never creates the file).

        Runs ``PRAGMA quick_check`` and checks the schema: CorruptRunError naming ``path``
        when the file is missing, not a database, damaged, or not a replay ledger.
        """
        path = os.fspath(path)
        _no_links(path)
        if not os.path.isfile(path):
            raise CorruptRunError(path, "the ledger file is missing")
        with _sqlite_errors(path):
            conn = _connect(path, writable=writable)
            try:
                _check(path, conn)
                if writable:
                    conn.execute("PRAGMA journal_mode=WAL")
            except BaseException:
                conn.close()
                raise
        return cls(path, conn, writable=writable)

    def close(self) -> None:
        """Close the database (idempotent). A writer's close folds the WAL back into the file."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with _sqlite_errors(self._path):
                conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "writable" if self._writable else "read-only"
        return f"Ledger({self._path!r}, {mode})"

    # ------------------------------------------------------------------ plumbing ---

    def _live(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RunError(f"{self._path}: the ledger is closed")
        return self._conn

    @contextlib.contextmanager
    def _write(self):
        if not self._writable:
            raise RunError(f"{self._path}: the ledger is open read-only")
        conn = self._live()
        with _sqlite_errors(self._path):
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        conn = self._live()
        with _sqlite_errors(self._path):
            return conn.execute(sql, args).fetchall()

    def _decode(self, what: str, fn, *args):
        try:
            return fn(*args)
        except (ValueError, TypeError, AttributeError) as e:
            raise CorruptRunError(self._path, f"unreadable {what}: {e}") from None

    # ------------------------------------------------------------------ steps ------

    def append_step(self, row: StepRow) -> None:
        """Record one step (one durable transaction). ValueError if the step is recorded."""
        self.append_steps([row])

    def append_steps(self, rows) -> None:
        """Record several steps in one durable transaction (all or none)."""
        encoded = [_encode_row(r) for r in rows]
        if not encoded:
            return
        if not self._has_rank_column and any(values[-1] is not None for values in encoded):
            raise RunError(f"{self._path}: this ledger predates runs of several processes; it cannot hold per-rank digests")
        columns = f"{_STEP_COLUMNS}, {_RANK_COLUMN}" if self._has_rank_column else _STEP_COLUMNS
        marks = ",".join("?" * (columns.count(",") + 1))
        with self._write() as conn:
            for values in encoded:
                try:
                    conn.execute(f"INSERT INTO steps({columns}) VALUES ({marks})",
                                 values if self._has_rank_column else values[:-1])
                except sqlite3.IntegrityError:
                    raise ValueError(
                        f"{self._path}: step {values[0]} is already recorded "
                        "(truncate_after first to re-record it)"
                    ) from None

    def step_row(self, step: int) -> StepRow | None:
        """The row of ``step``, or None if it is not recorded."""
        rows = self._query(f"SELECT {self._select} FROM steps WHERE step = ?",
                           (_int(step, "step", None),))
        return self._decode(f"row of step {step}", _decode_row, rows[0]) if rows else None

    def rows(self, start: int | None = None, end: int | None = None) -> list[StepRow]:
        """Rows with ``start <= step <= end`` (either bound optional), in step order."""
        lo = -(1 << 63) if start is None else _int(start, "start", None)
        hi = (1 << 63) - 1 if end is None else _int(end, "end", None)
        rows = self._query(
            f"SELECT {self._select} FROM steps WHERE step BETWEEN ? AND ? ORDER BY step", (lo, hi)
        )
        return [self._decode(f"row of step {r[0]}", _decode_row, r) for r in rows]

    def batches(self, start: int | None = None, end: int | None = None) -> list[tuple[int, list[int], str]]:
        """(step, batch ids, batch hash) of the steps with ``start <= step <= end``, in step
        order: the data a run trained on, without decoding fingerprints and metrics."""
        lo = -(1 << 63) if start is None else _int(start, "start", None)
        hi = (1 << 63) - 1 if end is None else _int(end, "end", None)
        rows = self._query("SELECT step, batch_ids, batch_hash FROM steps WHERE step BETWEEN ? AND ? ORDER BY step",
                           (lo, hi))
        return [(r[0], self._decode(f"batch ids of step {r[0]}", _decode_ids, r[1]), r[2]) for r in rows]

    def last_step(self) -> int | None:
        """The highest recorded step, or None for an empty ledger."""
        return self._query("SELECT MAX(step) FROM steps")[0][0]

    def truncate_after(self, step: int, keep_checkpoint: int | None = None) -> None:
        """Forget steps and checkpoint records after ``step`` (one transaction); epochs and
        events stay.

        ``keep_checkpoint`` spares one checkpoint record: with checkpoints taken *after* a step
        (checkpoint k holds the state once steps 0..k-1 ran), resuming from checkpoint k is
        ``truncate_after(k - 1, keep_checkpoint=k)``.
        """
        step = _int(step, "step", None)
        keep = -1 if keep_checkpoint is None else _int(keep_checkpoint, "keep_checkpoint")
        with self._write() as conn:
            conn.execute("DELETE FROM steps WHERE step > ?", (step,))
            conn.execute("DELETE FROM checkpoints WHERE step > ? AND step != ?", (step, keep))

    # ------------------------------------------------------------------ epochs -----

    def record_epoch(self, epoch: int, order_hash: str) -> None:
        """Record the order hash of ``epoch``. Recording the same hash again is a no-op; a
        different hash for a recorded epoch raises ValueError (the data order changed)."""
        epoch = _int(epoch, "epoch")
        if not isinstance(order_hash, str):
            raise TypeError("order_hash must be a str")
        with self._write() as conn:
            got = conn.execute("SELECT order_hash FROM epochs WHERE epoch = ?", (epoch,)).fetchall()
            if got and got[0][0] != order_hash:
                raise ValueError(
                    f"{self._path}: epoch {epoch} is recorded with order hash {got[0][0]}, "
                    f"now {order_hash}: the data order differs from the recording"
                )
            if not got:
                conn.execute("INSERT INTO epochs VALUES (?, ?)", (epoch, order_hash))

    def epochs(self) -> dict[int, str]:
        """Epoch -> order hash, in epoch order."""
        return dict(self._query("SELECT epoch, order_hash FROM epochs ORDER BY epoch"))

    # ------------------------------------------------------------------ checkpoints -

    def record_checkpoint(self, step: int, files: dict[str, str]) -> None:
        """Record that the checkpoint of ``step`` is complete, with its files' SHA-256
        (replaces an earlier record of the same step)."""
        step = _int(step, "step")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
            raise TypeError("files must map file names (str) to SHA-256 hex digests (str)")
        with self._write() as conn:
            conn.execute("INSERT OR REPLACE INTO checkpoints VALUES (?, ?)",
                         (step, _dumps(dict(files))))

    def remove_checkpoint(self, step: int) -> None:
        """Forget the checkpoint record of ``step`` (no-op if none)."""
        with self._write() as conn:
            conn.execute("DELETE FROM checkpoints WHERE step = ?", (_int(step, "step"),))

    def checkpoint_files(self, step: int) -> dict[str, str] | None:
        """The recorded {file name: SHA-256} of ``step``'s checkpoint, or None."""
        rows = self._query("SELECT files FROM checkpoints WHERE step = ?", (_int(step, "step", None),))
        if not rows:
            return None
        return self._decode(f"checkpoint record of step {step}", _str_dict, rows[0][0])

    def checkpoints(self) -> dict[int, dict[str, str]]:
        """Recorded checkpoints: step -> {file name: SHA-256}, in step order."""
        out = {}
        for step, files in self._query("SELECT step, files FROM checkpoints ORDER BY step"):
            out[step] = self._decode(f"checkpoint record of step {step}", _str_dict, files)
        return out

    # ------------------------------------------------------------------ manifest ---

    def manifest_digests(self) -> tuple[str | None, str | None]:
        """(recorded, pending) SHA-256 of the run's manifest: ``recorded`` is None for a run
        written before digests were recorded; ``pending`` is set only while (or if a crash
        interrupted) a rewrite of the manifest."""
        meta = dict(self._query(
            "SELECT key, value FROM meta WHERE key IN ('manifest_sha256', 'manifest_sha256_next')"))
        return meta.get("manifest_sha256"), meta.get("manifest_sha256_next")

    def record_manifest_digest(self, sha256: str, pending: bool = False) -> None:
        """Record the manifest's SHA-256: ``pending=True`` before the manifest file is replaced
        (so a crash between the two leaves a digest that matches either file), then
        ``pending=False`` once it is."""
        if not isinstance(sha256, str) or len(sha256) != 64:
            raise ValueError(f"not a SHA-256 hex digest: {sha256!r}")
        with self._write() as conn:
            if pending:
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('manifest_sha256_next', ?)", (sha256,))
            else:
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('manifest_sha256', ?)", (sha256,))
                conn.execute("DELETE FROM meta WHERE key = 'manifest_sha256_next'")

    # ------------------------------------------------------------------ events -----

    def add_event(self, kind: str, detail: dict) -> None:
        """Append an event (``kind`` plus a JSON-able ``detail`` dict), timestamped now."""
        if not isinstance(kind, str):
            raise TypeError("event kind must be a str")
        if not isinstance(detail, dict):
            raise TypeError("event detail must be a dict")
        text = _dumps(detail)  # ValueError / TypeError before anything is written
        with self._write() as conn:
            conn.execute("INSERT INTO events(time, kind, detail) VALUES (?, ?, ?)",
                         (time.time(), kind, text))

    def events(self) -> list[dict]:
        """All events in order: ``{"id", "time", "kind", "detail"}`` dicts."""
        out = []
        for id_, t, kind, detail in self._query(
            "SELECT id, time, kind, detail FROM events ORDER BY id"
        ):
            d = self._decode(f"event {id_}", _loads, detail, 32)
            out.append({"id": id_, "time": t, "kind": kind, "detail": d})
        return out


def _str_dict(text: str) -> dict[str, str]:
    d = _loads(text)
    if type(d) is not dict or not all(type(v) is str for v in d.values()):
        raise ValueError("not a JSON object of strings")
    return d


def _connect(path: str, writable: bool) -> sqlite3.Connection:
    mode = "rw" if writable else "ro"
    uri = f"file:{quote(os.path.abspath(path))}?mode={mode}"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=30.0)
    try:
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
    except BaseException:
        conn.close()
        raise
    return conn


def _check(path: str, conn: sqlite3.Connection) -> None:
    result = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
    if result != ["ok"]:
        shown = "; ".join(str(r) for r in result[:3])
        raise CorruptRunError(path, f"the ledger database is damaged (quick_check: {shown})")
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not _TABLES <= tables:
        raise CorruptRunError(
            path, f"not a replay ledger: missing tables {sorted(_TABLES - tables)}"
        )
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    if meta.get("format") != _FORMAT:
        raise CorruptRunError(path, f"not a replay ledger (format {meta.get('format')!r})")
    version = meta.get("version")
    if version != str(_VERSION):
        if isinstance(version, str) and version.isdigit() and len(version) < 10 and int(version) > _VERSION:
            from .schema import NewerFormatError

            raise NewerFormatError(path, "ledger", int(version), _VERSION)
        raise CorruptRunError(
            path, f"ledger version {version!r}; this replay reads version {_VERSION}"
        )


def _no_links(path: str) -> None:
    """The ledger and SQLite's companion files must not be symbolic links (SQLite would
    follow them, reading or writing outside the run)."""
    for p in (path, path + "-wal", path + "-shm", path + "-journal"):
        no_link(p)


@contextlib.contextmanager
def _sqlite_errors(path: str):
    """Turn sqlite3 errors into run-store errors naming the file."""
    try:
        yield
    except sqlite3.IntegrityError:
        raise  # a constraint the caller translates (e.g. a duplicate step)
    except sqlite3.Error as e:
        code = getattr(e, "sqlite_errorcode", None)
        primary = None if code is None else code & 0xFF
        msg = str(e)
        if primary in (_SQLITE_CORRUPT, _SQLITE_NOTADB) or (
            primary is None and ("malformed" in msg or "not a database" in msg)
        ):
            raise CorruptRunError(path, f"the ledger database is damaged or not a database: {msg}") from None
        if primary == _SQLITE_IOERR:
            raise CorruptRunError(path, f"I/O error reading the ledger (truncated?): {msg}") from None
        raise RunError(f"{path}: SQLite error: {msg}") from None
