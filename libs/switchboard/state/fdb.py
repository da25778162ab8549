"""The FoundationDB backend: the same Store interface over a FoundationDB cluster.

`transact` is the official bindings' @fdb.transactional retry loop (run fn, commit, on an FDBError let
`tr.on_error(e).wait()` back off and reset, or re-raise if the error is not retryable), bounded and run
in a worker thread because the bindings block on `.wait()`. `fdb` (and so libfdb_c) is imported on first
use, never at import or construction. FoundationDB's own limits apply: keys <= 10,000 bytes, a
transaction <= 10 MB and 5 s. Values are not limited: FoundationDB takes at most 100,000 bytes per value,
so larger ones than _VALUE_LIMIT are stored in chunks (state.base.ChunkedValues). As with
@fdb.transactional, `commit_unknown_result` is retried, so in rare cases fn's writes are applied by an
attempt whose predecessor had in fact committed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from switchboard.state.base import ChunkedValues, Store, StoreUnavailable, Transaction, observed

API_VERSION = 710  # supported by the 7.1, 7.3 and 8.0 client libraries
_MAX_TRIES = 50
_TIMEOUT_MS = 30_000  # whole transaction, across retries (API >= 610 keeps it across on_error)
_TRANSACTION_TIMED_OUT = 1031
_VALUE_LIMIT = 90_000  # below FoundationDB's 100,000 bytes, with room for ChunkedValues' header

_api_lock = threading.Lock()


def _fdb():
    import fdb

    with _api_lock:
        # api_version may be called once per process; another component may already have chosen one.
        if not fdb.is_api_version_selected():
            fdb.api_version(API_VERSION)
    return fdb


class FdbTransaction(Transaction):
    def __init__(self, tr):
        self._tr = tr

    def get(self, key: bytes) -> bytes | None:
        self.reads += 1
        value = self._tr.get(key).wait()
        return value.value if value.present() else None

    def set(self, key: bytes, value: bytes) -> None:
        self.writes += 1
        self.written_bytes += len(key) + len(value)
        self._tr.set(key, value)

    def clear(self, key: bytes) -> None:
        self.writes += 1
        self.written_bytes += len(key)
        self._tr.clear(key)

    def get_range(self, begin, end, *, limit=0, reverse=False):
        self.reads += 1
        return [(kv.key, kv.value) for kv in self._tr.get_range(begin, end, limit=limit, reverse=reverse)]

    def clear_range(self, begin: bytes, end: bytes) -> None:
        self.writes += 1
        self.written_bytes += len(begin) + len(end)
        self._tr.clear_range(begin, end)


class FdbStore(Store):
    def __init__(self, cluster_file: str | None = None, *, max_workers: int = 32):
        self.cluster_file = cluster_file
        self._db = None
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="fdb-store")

    def _database(self):
        with self._lock:
            if self._db is None:
                self._db = _fdb().open(self.cluster_file)
            return self._db

    def _run(self, fn, args, kwargs):
        fdb = _fdb()
        tr = self._database().create_transaction()
        tr.options.set_timeout(_TIMEOUT_MS)
        began = time.perf_counter()
        for attempt in range(_MAX_TRIES):
            try:
                counted = FdbTransaction(tr)
                result = fn(ChunkedValues(counted, _VALUE_LIMIT), *args, **kwargs)
                tr.commit().wait()
                observed(fn, began, attempt, counted)
                return result
            except fdb.FDBError as exc:
                last = exc
                try:
                    tr.on_error(exc).wait()  # retryable: backs off and resets tr; otherwise raises
                except fdb.FDBError as fatal:
                    if fatal.code == _TRANSACTION_TIMED_OUT:
                        raise StoreUnavailable(f"fdb transaction timed out: {fatal}") from fatal
                    raise
        raise StoreUnavailable(f"fdb transaction not committed after {_MAX_TRIES} tries: {last}")

    async def transact(self, fn, /, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run, fn, args, kwargs)

    async def close(self) -> None:
        # The network thread and the cached Database belong to the process (fdb.open caches them).
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)
