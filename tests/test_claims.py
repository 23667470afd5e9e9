"""Leases in the score store: two processes sharing a store split the images instead of both scoring all."""
from __future__ import annotations

import socket
import sqlite3
import subprocess
import threading
import time

import pytest

from clip_benchmark_diffusion.results.leases import Claims, score_shared
from clip_benchmark_diffusion.errors import UserError
from clip_benchmark_diffusion.results.store import ScoreStore


def _dead_owner() -> str:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return f"{socket.gethostname()}-{proc.pid}"


def test_a_key_is_leased_to_one_owner_until_stored_released_or_expired(tmp_path):
    path = tmp_path / "s.sqlite"
    a, b = Claims(path, "a-1"), Claims(path, "b-1", lease_s=0.2)
    assert a.claim(["k1", "k2", "k3"], limit=2) == ["k1", "k2"]
    assert b.claim(["k1", "k2", "k3"], limit=5) == ["k3"]               # a's leases are a's
    with ScoreStore(path) as store:
        store.put("k1", {"v": 1})
    a.release(["k2"])
    assert b.claim(["k1", "k2"], limit=5) == ["k2"]                      # k1 is stored, k2 released
    time.sleep(0.3)
    assert a.claim(["k2", "k3"], limit=5) == ["k2", "k3"]                # b's leases ran out


def test_a_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    path = tmp_path / "s.sqlite"
    assert Claims(path, _dead_owner(), lease_s=3600).claim(["k"], limit=1) == ["k"]
    assert Claims(path, "elsewhere-1", lease_s=3600).claim(["j"], limit=1) == ["j"]
    mine = Claims(path)
    assert mine.claim(["k", "j"], limit=5) == ["k"]                      # another host's lease holds


def test_two_owners_on_one_batch_split_it_and_both_get_every_result(tmp_path):
    path = tmp_path / "s.sqlite"
    keys = [f"img{i}" for i in range(12)]
    scored: dict[str, list[int]] = {}
    results: dict[str, dict] = {}

    def worker(owner: str) -> None:
        store, claims = ScoreStore(path), Claims(path, owner, lease_s=30)
        claims.renew()

        def score(indices: list[int]) -> dict[int, dict]:
            out = {}
            for i in indices:
                time.sleep(0.05)                                         # the compute of one image
                out[i] = {"image": i}
                store.put(keys[i], out[i])
            scored.setdefault(owner, []).extend(indices)
            return out

        barrier.wait()                                                   # both present before either claims
        results[owner] = score_shared(keys, store, claims, score=score, poll_s=0.02)
        claims.leave()
        store.close()
        claims.close()

    barrier = threading.Barrier(2)
    threads = [threading.Thread(target=worker, args=(f"w{n}-1",)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results["w0-1"] == results["w1-1"] == {i: {"image": i} for i in range(12)}
    assert sorted(scored["w0-1"] + scored["w1-1"]) == list(range(12))   # each image scored once
    assert sorted(map(len, scored.values())) == [6, 6]                  # half each: two owners present


def test_alone_a_process_claims_the_whole_batch_in_one_call(tmp_path):
    path = tmp_path / "s.sqlite"
    store, claims, calls = ScoreStore(path), Claims(path), []

    def score(indices):
        calls.append(indices)
        for i in indices:
            store.put(f"k{i}", {"i": i})
        return {i: {"i": i} for i in indices}

    assert score_shared([f"k{i}" for i in range(8)], store, claims, score) == {i: {"i": i} for i in range(8)}
    assert calls == [list(range(8))]                                     # packing as without a store
    assert score_shared([f"k{i}" for i in range(8)], store, claims, score) == {i: {"i": i} for i in range(8)}
    assert len(calls) == 1                                               # stored: nothing scored again


class _FullDisk:
    """A connection whose lease insert hits a full disk: SQLite then rolls the transaction back by
    itself, as it does on SQLITE_FULL, before the error reaches Python."""

    def __init__(self, conn) -> None:
        self.conn = conn

    def execute(self, sql, *args):
        return self.conn.execute(sql, *args)

    def executemany(self, sql, *args):
        if sql.startswith("INSERT OR REPLACE INTO claims"):
            self.conn.execute("ROLLBACK")
            raise sqlite3.OperationalError("database or disk is full")
        return self.conn.executemany(sql, *args)

    @property
    def in_transaction(self) -> bool:
        return self.conn.in_transaction


def test_a_full_disk_while_claiming_is_the_stores_one_line_not_a_rollback_error(tmp_path):
    claims = Claims(tmp_path / "s.sqlite", "a-1")
    claims._conn = _FullDisk(claims._db)
    with pytest.raises(UserError) as err:
        claims.claim(["k1", "k2"], limit=2)
    assert "could not be written (database or disk is full); free disk space" in str(err.value)
    claims._conn = claims._conn.conn
    assert claims.claim(["k1"], limit=1) == ["k1"]        # the connection is usable again


def test_a_lease_renewal_that_fails_ends_quietly(tmp_path, monkeypatch):
    """A full disk in the lease thread is reported by the scoring thread's next write, not as a thread
    traceback."""
    seen = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args.exc_value))

    def full(self):
        raise UserError("score store could not be written (database or disk is full)")

    claims = Claims(tmp_path / "s.sqlite", "a-1", lease_s=0.03)
    claims.claim(["k"], limit=1)
    monkeypatch.setattr(Claims, "renew", full)
    with claims.renewing():
        time.sleep(0.1)
    assert seen == []
