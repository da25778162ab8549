"""The embedded backend: one SQLite file in WAL mode, shared by every local service process.

Every read-write transaction starts with BEGIN IMMEDIATE, so writers are serialized across processes:
that is serializable isolation. With WAL, a commit is in the log before COMMIT returns, so killing a
process with SIGKILL never loses a committed transaction (synchronous=FULL also survives power loss).
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from switchboard.state.base import ChunkedValues, Store, StoreUnavailable, Transaction, observed

_SCHEMA = "CREATE TABLE IF NOT EXISTS kv (k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID"
_MAX_TRIES = 10
# Each try waits up to this long for another process's write lock: at most ~50 s before StoreUnavailable.
_LOCK_WAIT_S = 5.0
# How often a transaction asks again for a lock another process holds. SQLite's own busy handler sleeps
# 1, 2, 5, 10, 15... ms between its tries, while a transaction here mostly holds the lock for a fraction
# of a millisecond: at 200 tasks/s, about one api transaction in ten waited a millisecond or more for the
# aggregator's (and the other way round). Asking from 50 us up to every 2 ms takes the lock soon after
# it is free (bench/sqlite_locks.py).
_FIRST_PAUSE_S = 0.00005
_MAX_PAUSE_S = 0.002


def _backoff(attempt: int) -> None:
    time.sleep(min(0.5, 0.005 * 2**attempt) * random.random())


def _busy(exc: sqlite3.OperationalError) -> bool:
    return exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _begin(db: sqlite3.Connection, begin: str) -> None:
    """Begins a transaction, waiting up to _LOCK_WAIT_S for a lock another process holds."""
    deadline = time.monotonic() + _LOCK_WAIT_S
    pause = _FIRST_PAUSE_S
    while True:
        try:
            db.execute(begin)
            return
        except sqlite3.OperationalError as exc:
            if not _busy(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, _MAX_PAUSE_S)


class SqliteTransaction(Transaction):
    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def get(self, key: bytes) -> bytes | None:
        self.reads += 1
        row = self._db.execute("SELECT v FROM kv WHERE k = ?", (key,)).fetchone()
        return row[0] if row else None

    def set(self, key: bytes, value: bytes) -> None:
        self.writes += 1
        self.written_bytes += len(key) + len(value)
        self._db.execute("INSERT OR REPLACE INTO kv (k, v) VALUES (?, ?)", (key, value))

    def clear(self, key: bytes) -> None:
        self.writes += 1
        self.written_bytes += len(key)
        self._db.execute("DELETE FROM kv WHERE k = ?", (key,))

    def get_range(self, begin, end, *, limit=0, reverse=False):
        self.reads += 1
        order = "DESC" if reverse else "ASC"
        rows = self._db.execute(
            f"SELECT k, v FROM kv WHERE k >= ? AND k < ? ORDER BY k {order} LIMIT ?",
            (begin, end, limit or -1),
        )
        return rows.fetchall()

    def clear_range(self, begin: bytes, end: bytes) -> None:
        self.writes += 1
        self.written_bytes += len(begin) + len(end)
        self._db.execute("DELETE FROM kv WHERE k >= ? AND k < ?", (begin, end))


class SqliteStore(Store):
    def __init__(self, path: str | Path, *, synchronous: str = "NORMAL", max_value_bytes: int | None = None):
        """max_value_bytes: store larger values in chunks, as the FoundationDB backend must (SQLite itself
        needs no limit; the contract tests use it to run the chunking on SQLite)."""
        self.path = Path(path)
        self._max_value_bytes = max_value_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._synchronous = synchronous
        # One thread owns the connection: sqlite3 connections are not shared across threads, and one
        # writer per process is all SQLite allows anyway.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        self._local = threading.local()

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._open()
        return db

    def _open(self) -> sqlite3.Connection:
        # Switching a new file to WAL needs an exclusive lock, and SQLite answers SQLITE_BUSY at once there
        # instead of calling the busy handler: processes opening a fresh file together must retry.
        for attempt in range(_MAX_TRIES):
            db = sqlite3.connect(self.path, isolation_level=None, timeout=_LOCK_WAIT_S)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(f"PRAGMA synchronous={self._synchronous}")
                db.execute(_SCHEMA)
                db.execute("PRAGMA busy_timeout=0")  # from now on, _begin and _run wait for locks
                return db
            except sqlite3.OperationalError as exc:
                db.close()
                if not _busy(exc):
                    raise
                last = exc
                _backoff(attempt)
        raise StoreUnavailable(f"sqlite store busy after {_MAX_TRIES} tries to open: {last}")

    def _run(self, fn, args, kwargs, begin="BEGIN IMMEDIATE"):
        db = self._connection()
        last: Exception | None = None
        began = time.perf_counter()
        for attempt in range(_MAX_TRIES):
            try:
                _begin(db, begin)
            except sqlite3.OperationalError as exc:  # another process holds the write lock past _LOCK_WAIT_S
                if not _busy(exc):
                    raise
                last = exc
                _backoff(attempt)
                continue
            try:
                tr = counted = SqliteTransaction(db)
                if self._max_value_bytes:
                    tr = ChunkedValues(tr, self._max_value_bytes)
                result = fn(tr, *args, **kwargs)
                db.execute("COMMIT")
                observed(fn, began, attempt, counted)
                return result
            except BaseException as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                if not (isinstance(exc, sqlite3.OperationalError) and _busy(exc)):
                    raise
                # A read that found the file busy (a reader in WAL mode, rarely): the transaction runs
                # again, as a transaction function may (the FoundationDB backend's retry loop does too).
                last = exc
                _backoff(attempt)
        raise StoreUnavailable(f"sqlite store busy after {_MAX_TRIES} tries: {last}")

    async def transact(self, fn, /, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run, fn, args, kwargs)

    async def read(self, fn, /, *args, **kwargs):
        # A deferred transaction that only reads takes no write lock: in WAL mode it reads a snapshot
        # while other processes commit.
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run, fn, args, kwargs, "BEGIN DEFERRED")

    def _close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._close)
        self._executor.shutdown(wait=True)
