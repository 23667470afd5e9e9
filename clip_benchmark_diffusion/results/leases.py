"""Leases on images in a score store, so that commands sharing one store split the images.

Two identical commands started on one store (two jobs, two machines on a shared disk) would
otherwise both score every image and the second ``put`` would just overwrite the first. Before
scoring, a process claims a few image keys that are neither stored nor leased by another live
process; it renews its leases while it computes and drops them once the results are stored. A
process that waits for images another one claimed takes them over when that lease runs out
(the owner was killed or lost its disk) or, on the same host, as soon as the owner's process is
gone. torchrun ranks split each batch among themselves already (``distributed.py``); this is the
same idea across independent commands, through the store file itself.
"""
from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from clip_benchmark_diffusion.partial_files import process_alive
from clip_benchmark_diffusion.errors import UserError
from clip_benchmark_diffusion.results.store import (BUSY_TIMEOUT_S, ScoreStore, register_connection, release_connection,
                                          rollback, with_retries)

LEASE_S = 120.0       # a lease not renewed for this long is free to take over
POLL_S = 0.5          # how often a process waiting on another's images looks again
_TABLES = ("CREATE TABLE IF NOT EXISTS claims(key TEXT PRIMARY KEY, owner TEXT NOT NULL, expires REAL NOT NULL)",
           # who is scoring from this store now: the share each one claims is 1 / (number present)
           "CREATE TABLE IF NOT EXISTS owners(owner TEXT PRIMARY KEY, expires REAL NOT NULL)")


def this_owner() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Claims:
    """This process's leases in the store file at ``path`` (its own connection: any thread may own one)."""

    def __init__(self, path: str | Path, owner: str | None = None, lease_s: float = LEASE_S) -> None:
        self.path, self.owner, self.lease_s = Path(path), owner or this_owner(), lease_s
        self._conn: sqlite3.Connection | None = None
        self._live: str | None = None

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            with ScoreStore(self.path) as store:  # refuses a foreign file; creates the store if missing
                store.create()
            self._live = register_connection(self.path)   # see store._LIVE: a header read would drop its locks
            self._conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                         check_same_thread=False)
            for table in _TABLES:
                with_retries(lambda: self._conn.execute(table), self.path)
        return self._conn

    def claim(self, keys: list[str], limit: int) -> list[str]:
        """Lease up to ``limit`` of ``keys`` that are not stored and not leased by a live other owner."""
        return with_retries(lambda: self._claim(list(dict.fromkeys(keys)), limit), self.path)

    def _claim(self, keys: list[str], limit: int) -> list[str]:
        db, now = self._db, time.time()
        db.execute("BEGIN IMMEDIATE")  # one claimer at a time: no key is leased twice
        try:
            marks = ",".join("?" * len(keys))
            done = {k for (k,) in db.execute(f"SELECT key FROM scores WHERE key IN ({marks})", keys)}
            leased = {k: (o, e) for k, o, e in
                      db.execute(f"SELECT key, owner, expires FROM claims WHERE key IN ({marks})", keys)}
            free = [k for k in keys if k not in done and (k not in leased or self._free(*leased[k], now))]
            mine = free[:limit]
            db.executemany("INSERT OR REPLACE INTO claims(key, owner, expires) VALUES (?, ?, ?)",
                           [(k, self.owner, now + self.lease_s) for k in mine])
            db.execute("COMMIT")
        except BaseException:
            rollback(db)
            raise
        return mine

    def _free(self, owner: str, expires: float, now: float) -> bool:
        if owner == self.owner or expires < now:
            return True
        host, _, pid = owner.rpartition("-")
        return host == socket.gethostname() and pid.isdigit() and not process_alive(int(pid))

    def renew(self) -> None:
        """Extend this owner's leases and its presence by one lease."""
        expires = time.time() + self.lease_s
        with_retries(lambda: self._db.execute("UPDATE claims SET expires = ? WHERE owner = ?", (expires, self.owner)),
               self.path)
        with_retries(lambda: self._db.execute("INSERT OR REPLACE INTO owners(owner, expires) VALUES (?, ?)",
                                        (self.owner, expires)), self.path)

    def owners_present(self) -> int:
        """Live owners scoring from this store, this one included (after :meth:`renew`)."""
        now = time.time()
        rows = with_retries(lambda: self._db.execute("SELECT owner, expires FROM owners").fetchall(), self.path)
        return 1 + sum(1 for owner, expires in rows if owner != self.owner and not self._free(owner, expires, now))

    def release(self, keys: list[str]) -> None:
        with_retries(lambda: self._db.executemany("DELETE FROM claims WHERE key = ? AND owner = ?",
                                            [(k, self.owner) for k in keys]), self.path)

    @contextmanager
    def renewing(self) -> Iterator[None]:
        """Renew this owner's leases every third of a lease while the body runs (a thread of its own)."""
        stop = threading.Event()
        renewer = Claims(self.path, self.owner, self.lease_s)

        def loop() -> None:
            while not stop.wait(self.lease_s / 3):
                try:
                    renewer.renew()
                except (UserError, sqlite3.Error):
                    # a full disk or a damaged store: the scoring thread's own next write reports it
                    # in one line; raised here it would be a thread traceback on stderr
                    return

        thread = threading.Thread(target=loop, name="clip_benchmark_diffusion-lease", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            renewer.close()

    def leave(self) -> None:
        """No longer present: the others stop leaving a share for this owner."""
        if self._conn is not None:
            with_retries(lambda: self._db.execute("DELETE FROM owners WHERE owner = ?", (self.owner,)), self.path)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._live is not None:
            release_connection(self._live)
            self._live = None


def score_shared(keys: list[str], store: ScoreStore, claims: Claims,
                 score: Callable[[list[int]], dict[int, dict]], poll_s: float = POLL_S) -> dict[int, dict]:
    """The payload of every key: read from ``store``, scored here, or scored by another process.

    ``score(indices)`` scores those keys and returns ``{index: payload}``; it must ``put`` each
    payload into ``store`` (as the model does the moment an image is decided). Alone, a process
    claims all missing keys at once (one packed engine call, as without a store); with ``n``
    owners present it claims ``1/n`` of them, so processes on one batch each take a share.
    """
    claims.renew()
    results: dict[int, dict] = {}
    while missing := [i for i in range(len(keys)) if i not in results]:
        found = store.get_many([keys[i] for i in missing])
        results.update({i: found[keys[i]] for i in missing if keys[i] in found})
        missing = [i for i in missing if i not in results]
        if not missing:
            break
        share = -(-len(missing) // claims.owners_present())
        mine = set(claims.claim([keys[i] for i in missing], share))
        if not mine:
            time.sleep(poll_s)  # all of them leased by others who are alive: wait for their results
            claims.renew()      # still present: the next batch is shared with this process too
            continue
        with claims.renewing():
            try:
                results.update(score([i for i in missing if keys[i] in mine]))
            finally:
                claims.release(sorted(mine))
    return results
