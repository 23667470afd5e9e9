"""A persistent per-image score store: one SQLite file (WAL mode) beside the result JSON.

Diffusion scoring costs seconds per image, so every image's result is written as soon as it
is computed and a rerun of the same evaluation (same weights, options and candidate prompts)
reads it back instead of scoring again; an interrupted run resumes where it stopped. Keys are
content hashes (:mod:`clip_benchmark_diffusion.results.keys`), so the store needs no bookkeeping of
which run wrote what, and several processes (``torchrun`` ranks, parallel jobs) may share one file.

The store is plain ``sqlite3``: it never imports torch.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Mapping, TypeVar

from clip_benchmark_diffusion.errors import UserError

STORE_ENV = "CLIP_BENCHMARK_DIFFUSION_STORE"
FILENAME = "clip_benchmark_diffusion_scores.sqlite"
SCHEMA_VERSION = 1
OFF_VALUES = ("off", "none", "0", "false", "no")
BUSY_TIMEOUT_S = 60.0
LOCK_DEADLINE_S = 300.0  # retries of "database is locked" beyond the busy timeout, in total

_MAGIC = b"SQLite format 3\x00"
_IN_CHUNK = 500          # keys per SELECT ... IN (...): under SQLite's variable limit everywhere
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT)",
    "CREATE TABLE IF NOT EXISTS scores(key TEXT PRIMARY KEY, payload TEXT NOT NULL, created REAL NOT NULL)",
)
# Per-image work of images not decided yet (``ScoringEngine`` checkpoints), so a kill loses seconds.
# ``partials`` held one whole error tensor per image, rewritten at each save (stores written before
# the checkpoints became incremental; still read); ``partial_parts`` holds one row per image and
# save with only what was computed since the previous one.
_PARTIALS = "CREATE TABLE IF NOT EXISTS partials(key TEXT PRIMARY KEY, data BLOB NOT NULL, created REAL NOT NULL)"
_PARTIAL_PARTS = ("CREATE TABLE IF NOT EXISTS partial_parts(id INTEGER PRIMARY KEY, key TEXT NOT NULL, "
                  "data BLOB NOT NULL, created REAL NOT NULL)",
                  "CREATE INDEX IF NOT EXISTS partial_parts_key ON partial_parts(key)")
_T = TypeVar("_T")

# This process's open connections per store file (real path). POSIX advisory locks belong to
# the process and are all dropped when *any* descriptor of the file is closed, so reading the header
# of a store this process has open (the lease thread opens a second ScoreStore) would silently
# release the main connection's locks; another process would then believe it was the last user
# and delete the -wal and -shm files under it ("How To Corrupt An SQLite Database File", 2.2.1).
# A connection registers before it connects, and the header is read under the same lock, so no
# thread of this process can read it while another holds locks on the file.
_LIVE: Counter[str] = Counter()
_LIVE_LOCK = threading.Lock()


def register_connection(path: str | Path) -> str:
    """Count a connection this process is about to open on ``path`` (every connection to a store
    file must be counted, or a header read elsewhere in the process can drop its locks); returns
    the key to pass to :func:`release_connection` after closing it."""
    key = os.path.realpath(path)
    with _LIVE_LOCK:
        _LIVE[key] += 1
    return key


def release_connection(key: str) -> None:
    with _LIVE_LOCK:
        _LIVE[key] -= 1
        if _LIVE[key] <= 0:
            del _LIVE[key]


class ScoreStore:
    """Per-image results keyed by :func:`~clip_benchmark_diffusion.results.keys.image_key`; each ``put`` is durable on return.

    One instance per process (a connection must not cross ``fork``); any number of processes
    may open the same file. An existing file that is not a store of this schema is never
    written to: opening it raises :class:`UserError`.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self._conn: sqlite3.Connection | None = None
        self._live: str | None = None   # our entry in _LIVE while connected
        self._closed = False
        self._check_file()
        if self.path.exists():
            self._open()
        # else: created by the first put, so a run that stops before its first image leaves no file

    @classmethod
    def check(cls, path: str | Path) -> None:
        """Refuse, before any compute, a store that cannot be used: foreign, damaged or unwritable.

        Creates nothing: a missing store only needs a folder it can be created in.
        """
        path = Path(path).expanduser()
        if not path.exists():
            _check_creatable(path)
            return
        with cls(path) as store:
            store._verify()

    def _open(self) -> None:
        self._live = register_connection(self.path)
        try:
            self._conn = with_retries(self._connect, self.path)
            with_retries(self._prepare, self.path)
        except sqlite3.Error as exc:
            self.close()
            raise self._error(_one_line(exc)) from None
        except BaseException:
            self.close()  # a refused file is left as it was, without -wal or -shm beside it
            raise

    # -- public API --------------------------------------------------------------------------
    def get_many(self, keys: list[str]) -> dict[str, dict]:
        """The decoded payloads of those ``keys`` that are present."""
        return {key: json.loads(payload) for key, payload in self._select_keys("scores", "payload", keys)}

    def put(self, key: str, payload: dict) -> None:
        """Insert or replace one entry and drop its partial work, in one transaction (committed on return)."""
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        with_retries(lambda: self._transaction([
            ("INSERT OR REPLACE INTO scores(key, payload, created) VALUES (?, ?, ?)", (key, text, time.time())),
            ("DELETE FROM partials WHERE key = ?", (key,)),
            ("DELETE FROM partial_parts WHERE key = ?", (key,))]), self.path)

    def append_partial(self, key: str, data: bytes) -> None:
        """Add one more piece of the partial work of an image not decided yet (read back in order)."""
        with_retries(lambda: self._db.execute("INSERT INTO partial_parts(key, data, created) VALUES (?, ?, ?)",
                                        (key, data, time.time())), self.path)

    def get_partial_parts(self, keys: list[str]) -> dict[str, list[bytes]]:
        """The pieces of partial work stored for those ``keys`` that have some, each in the order written."""
        found: dict[str, list[bytes]] = {}
        for key, data in self._select_keys("partial_parts", "data", keys, order="ORDER BY id"):
            found.setdefault(key, []).append(data)
        return found

    def put_partial(self, key: str, data: bytes) -> None:
        """Keep the partial work of an image not decided yet (replaced by each newer one)."""
        with_retries(lambda: self._db.execute("INSERT OR REPLACE INTO partials(key, data, created) VALUES (?, ?, ?)",
                                        (key, data, time.time())), self.path)

    def get_partials(self, keys: list[str]) -> dict[str, bytes]:
        """The partial work stored for those ``keys`` that have some."""
        return dict(self._select_keys("partials", "data", keys))

    def create(self) -> None:
        """Create the file now if it does not exist (it is otherwise created by the first put)."""
        self._db

    def __len__(self) -> int:
        if self._conn is None and not self.path.exists():
            return 0
        return with_retries(lambda: self._db.execute("SELECT COUNT(*) FROM scores").fetchone()[0], self.path)

    def close(self) -> None:
        self._closed = True
        if self._conn is not None:
            # Fold the WAL back into the file, so a finished store is one file; SQLite then removes
            # -wal and -shm if this was the last connection. A checkpoint another process blocks
            # (it still reads) is left to that process's close.
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            self._conn.close()
            self._conn = None
        if self._live is not None:
            release_connection(self._live)
            self._live = None

    def __enter__(self) -> "ScoreStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ScoreStore({str(self.path)!r})"

    # -- internals ---------------------------------------------------------------------------
    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed")
            self._check_file(create=True)
            self._open()
        assert self._conn is not None
        return self._conn

    def _check_file(self, create: bool = False) -> None:
        """Refuse, before SQLite touches it, a file that cannot be one of our stores."""
        if self.path.is_dir():
            raise self._error("is a directory")
        if not self.path.exists():
            if not create:
                return  # nothing to read yet; the folder is made when the first entry is written
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise self._error(f"cannot create its folder ({exc.strerror})") from None
            return
        with _LIVE_LOCK:
            if _LIVE.get(os.path.realpath(self.path), 0) > 0:
                return  # this process has it open, so it is ours: never close a descriptor of it
            try:
                with open(self.path, "rb") as fh:
                    header = fh.read(len(_MAGIC))
            except OSError as exc:
                raise self._error(f"cannot be read ({exc.strerror})") from None
        if header and header != _MAGIC:
            raise self._error("is not an SQLite database")

    def _connect(self) -> sqlite3.Connection:
        # timeout= is SQLite's busy timeout; isolation_level=None is autocommit, so each statement
        # is its own short transaction.
        return sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)

    def _prepare(self) -> None:
        """Validate an existing store, or create the schema; only writes once the file is ours."""
        tables = self._tables()
        if tables and "meta" not in tables:
            raise self._error(f"is an SQLite database of another program (tables: {', '.join(sorted(tables))})")
        if not tables:
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("BEGIN IMMEDIATE")   # another process may be creating it right now
            try:
                for statement in _SCHEMA:
                    self._db.execute(statement)
                self._db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)",
                                 (str(SCHEMA_VERSION),))
                self._db.execute("COMMIT")
            except BaseException:
                rollback(self._db)
                raise
            tables = self._tables()
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None or row[0] != str(SCHEMA_VERSION):
            found = "no schema version" if row is None else f"schema version {row[0]}"
            raise self._error(f"has {found}, this version of clip_benchmark_diffusion needs {SCHEMA_VERSION}")
        if "scores" not in tables:
            raise self._error("has no scores table")
        if "partials" not in tables:  # added after schema 1 was released: created on first open
            with_retries(lambda: self._db.execute(_PARTIALS), self.path)
        if "partial_parts" not in tables:  # likewise
            for statement in _PARTIAL_PARTS:
                with_retries(lambda: self._db.execute(statement), self.path)
        # A no-op on stores we created; WAL lets readers and one writer work at the same time, and
        # NORMAL is still durable against a crash of the process (only an OS crash may lose the
        # last commits, never corrupt the file).
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")

    def _verify(self) -> None:
        """SQLite's quick_check: a file damaged past its first page is found now, not at the first batch."""
        try:
            problems = [r[0] for r in with_retries(lambda: self._db.execute("PRAGMA quick_check").fetchall(), self.path)]
        except sqlite3.DatabaseError as exc:
            raise self._error(f"is damaged ({' '.join(str(exc).split())})") from None
        if problems != ["ok"]:
            raise self._error(f"is damaged ({problems[0]})")

    def _select_keys(self, table: str, column: str, keys: list[str], order: str = "") -> list[tuple]:
        """``(key, column)`` rows of ``table`` for ``keys`` (duplicates asked once), in chunks under
        SQLite's variable limit; none, without creating the file, when the store does not exist yet."""
        if self._conn is None and not self.path.exists():
            return []
        unique = list(dict.fromkeys(keys))
        rows: list[tuple] = []
        for start in range(0, len(unique), _IN_CHUNK):
            part = unique[start : start + _IN_CHUNK]
            sql = f"SELECT key, {column} FROM {table} WHERE key IN ({','.join('?' * len(part))}) {order}"
            rows += with_retries(lambda: self._db.execute(sql, part).fetchall(), self.path)
        return rows

    def _transaction(self, statements: list[tuple[str, tuple]]) -> None:
        """Run ``statements`` as one transaction: all of them, or (on any error) none."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for sql, params in statements:
                self._db.execute(sql, params)
            self._db.execute("COMMIT")
        except BaseException:
            rollback(self._db)   # a full disk has rolled back already: its one line must not be masked
            raise

    def _tables(self) -> set[str]:
        return {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def _error(self, what: str) -> UserError:
        return UserError(f"score store {self.path} {what}; move the file away, or set {STORE_ENV} "
                         f"to another path (or to 'off' to disable the store)")


def _check_creatable(path: Path) -> None:
    """``path`` can be created later: its nearest existing ancestor is a writable folder."""
    ancestor = next((p for p in path.parents if p.exists()), Path("."))
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        why = "a file" if not ancestor.is_dir() else "not writable"
        raise UserError(f"score store {path} cannot be created: {ancestor} is {why}; set {STORE_ENV} "
                        f"to another path (or to 'off' to disable the store)")


def _runtime_error(exc: sqlite3.DatabaseError, path: Path) -> UserError | None:
    """A one-line error for a store that breaks mid-run (disk full, damage), or None if not one of those."""
    text = " ".join(str(exc).split())
    lowered = text.lower()
    if "full" in lowered or "no space" in lowered:
        return UserError(f"score store {path} could not be written ({text}); free disk space (or set {STORE_ENV} "
                         "to a path on another disk) and rerun the same command: every image finished so far "
                         "is kept in the store and is not scored again")
    if "malformed" in lowered or "not a database" in lowered or "corrupt" in lowered:
        return UserError(f"score store {path} is damaged ({text}); move it away (or set {STORE_ENV} to another "
                         "path or 'off') and rerun: the images it held are scored again")
    return None


def rollback(conn: sqlite3.Connection) -> None:
    """Undo the open transaction, if SQLite has not already: on a full disk (SQLITE_FULL) or I/O
    error it rolls back by itself, and a second ROLLBACK ("cannot rollback - no transaction is
    active") would replace the error the user must see with one they cannot act on."""
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # the error being raised says what went wrong; this one would only mask it


def _one_line(exc: BaseException) -> str:
    return "cannot be opened: " + " ".join(str(exc).split())


def _is_lock_error(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def with_retries(fn: Callable[[], _T], path: Path) -> _T:
    """``fn()``, retried while SQLite reports a lock.

    The busy timeout covers most waits, but SQLite returns SQLITE_BUSY at once in some cases
    (a WAL file being recovered, a journal-mode switch racing another opener), so back off and
    try again until ``LOCK_DEADLINE_S``.
    """
    deadline, delay = time.monotonic() + LOCK_DEADLINE_S, 0.01
    while True:
        try:
            return fn()
        except sqlite3.DatabaseError as exc:
            if not isinstance(exc, sqlite3.OperationalError) or not _is_lock_error(exc):
                error = _runtime_error(exc, path)
                if error is None:
                    raise
                raise error from None
            if time.monotonic() > deadline:
                raise UserError(f"score store {path} stayed locked for over {LOCK_DEADLINE_S:.0f} s "
                                f"({_one_line(exc)}); is it on a network file system without locking? "
                                f"Set {STORE_ENV} to a local path or to 'off'") from None
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def default_store_path(output_json_path: str, environ: Mapping[str, str] = os.environ) -> Path | None:
    """Where the store lives: beside the output JSON, unless ``CLIP_BENCHMARK_DIFFUSION_STORE``
    names a file (or a folder to put it in: an existing one, or any path ending in ``/``), or is ``off``
    (None: no store)."""
    raw = environ.get(STORE_ENV, "").strip()
    if raw.lower() in OFF_VALUES:
        return None
    if raw:
        path = Path(raw).expanduser()
        # Path() drops a trailing slash, so read it from the raw text: "newdir/" means a folder (created
        # with the store), never a file named newdir
        folder = raw.endswith(("/", os.sep)) or path.is_dir()
        return path / FILENAME if folder else path
    return Path(output_json_path).expanduser().parent / FILENAME

