"""The state store interface: ordered byte keys and serializable transactions (FoundationDB's model).

Logic is written as plain synchronous functions of a Transaction, like FoundationDB's @transactional:
`await store.transact(fn, *args)` runs `fn(tr, *args)` off the event loop, commits, and retries the
whole function on a conflict. So `fn` must have no side effects other than on `tr`.

Values may be of any size on every backend: one whose own values are limited (FoundationDB: 100,000
bytes) wraps its transactions in ChunkedValues. Keys beginning with byte 0xfe are reserved for it; the
keys of the tuple layer (`pack`) never begin with it.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

import fdb.tuple

from switchboard import telemetry

P = ParamSpec("P")
T = TypeVar("T")


def pack(*parts: Any) -> bytes:
    return fdb.tuple.pack(parts)


def unpack(key: bytes) -> tuple[Any, ...]:
    return fdb.tuple.unpack(key)


def prefix_range(*parts: Any) -> tuple[bytes, bytes]:
    """[begin, end) of every key that extends the tuple `parts`."""
    span = fdb.tuple.range(parts)
    return span.start, span.stop


def operation(fn: Callable) -> str:
    """A transaction's name in metrics: the function that wrote it (WorkflowStore.record's txn: "record")."""
    qualname = getattr(fn, "__qualname__", None) or getattr(getattr(fn, "func", None), "__qualname__", "")
    return qualname.split(".<locals>")[0].rsplit(".", 1)[-1].strip("_") or "transaction"


def observed(fn: Callable, began: float, conflicts: int, tr: Transaction | None = None) -> None:
    """Reports one transaction (its time from `began`, retries included, and what the attempt that
    committed read and wrote, as counted by the backend's `tr`) to the telemetry seam."""
    telemetry.emit("store.transaction", operation=operation(fn), seconds=time.perf_counter() - began,
                   conflicts=conflicts, reads=tr.reads if tr else 0, writes=tr.writes if tr else 0,
                   written_bytes=tr.written_bytes if tr else 0)


class Transaction(abc.ABC):
    # What one attempt did, counted by the backends as FoundationDB sees it (below ChunkedValues, so a
    # chunked value's keys count): reads are get and get_range calls, each one read conflict range if the
    # transaction writes; writes are set, clear and clear_range calls, each a mutation and a write conflict
    # range; written_bytes is their size (key + value of a set, the key or both bounds of a clear).
    reads = 0
    writes = 0
    written_bytes = 0

    @abc.abstractmethod
    def get(self, key: bytes) -> bytes | None: ...

    @abc.abstractmethod
    def set(self, key: bytes, value: bytes) -> None: ...

    @abc.abstractmethod
    def clear(self, key: bytes) -> None: ...

    @abc.abstractmethod
    def get_range(
        self, begin: bytes, end: bytes, *, limit: int = 0, reverse: bool = False
    ) -> list[tuple[bytes, bytes]]:
        """Pairs with begin <= key < end in key order (descending if reverse); limit 0 means all."""

    @abc.abstractmethod
    def clear_range(self, begin: bytes, end: bytes) -> None: ...


_CHUNKS = b"\xfe"  # chunk keys: 0xfe + pack((key, index)), a space of their own
_INLINE, _CHUNKED = 0, 1


class ChunkedValues(Transaction):
    """Values of any size over a transaction that only takes values of up to `limit` bytes.

    Every value gets a one-byte header. A small value follows it inline; a large one is cut into chunks
    stored under 0xfe + pack((key, i)), and the header gives their count. Packing the key as a tuple
    element keeps each key's chunks apart from every other key's, and in the same order as the keys, so a
    range of keys maps to one range of chunks.
    """

    def __init__(self, tr: Transaction, limit: int):
        self._tr, self._limit = tr, limit
        # What this transaction has seen of keys' stored form, so that a set or clear of a key that holds
        # no chunks skips the range clear of its chunks (half of all mutations otherwise). Per key: True
        # if it holds none (absent or inline), False if chunked; and key ranges read whole or cleared,
        # whose keys hold none unless said otherwise. A read in this transaction is enough to rely on:
        # the transaction is serializable, so one that changed the key meanwhile makes it conflict.
        self._unchunked: dict[bytes, bool] = {}
        self._bare_ranges: list[tuple[bytes, bytes]] = []

    def _holds_no_chunks(self, key: bytes) -> bool:
        known = self._unchunked.get(key)
        if known is not None:
            return known
        return any(begin <= key < end for begin, end in self._bare_ranges)

    @staticmethod
    def _chunk_range(begin: bytes, end: bytes) -> tuple[bytes, bytes]:
        return _CHUNKS + fdb.tuple.pack((begin,)), _CHUNKS + fdb.tuple.pack((end,))

    @staticmethod
    def _chunks_of(key: bytes) -> tuple[bytes, bytes]:
        span = fdb.tuple.range((key,))
        return _CHUNKS + span.start, _CHUNKS + span.stop

    def _decode(self, key: bytes, stored: bytes) -> bytes:
        if stored[0] == _INLINE:
            return stored[1:]
        count = int.from_bytes(stored[1:5], "big")
        chunks = self._tr.get_range(*self._chunks_of(key), limit=count)
        if len(chunks) != count:
            raise RuntimeError(f"value of key {key!r}: {len(chunks)} of its {count} chunks found")
        return b"".join(value for _, value in chunks)

    def get(self, key: bytes) -> bytes | None:
        stored = self._tr.get(key)
        self._unchunked[key] = stored is None or stored[0] == _INLINE
        return None if stored is None else self._decode(key, stored)

    def set(self, key: bytes, value: bytes) -> None:
        if not self._holds_no_chunks(key):
            self._tr.clear_range(*self._chunks_of(key))  # blind: what was there is not known
        if len(value) < self._limit:
            self._tr.set(key, bytes([_INLINE]) + value)
            self._unchunked[key] = True
            return
        count = -(-len(value) // self._limit)
        for i in range(count):
            self._tr.set(_CHUNKS + fdb.tuple.pack((key, i)), value[i * self._limit:(i + 1) * self._limit])
        self._tr.set(key, bytes([_CHUNKED]) + count.to_bytes(4, "big"))
        self._unchunked[key] = False

    def clear(self, key: bytes) -> None:
        self._tr.clear(key)
        if not self._holds_no_chunks(key):
            self._tr.clear_range(*self._chunks_of(key))
        self._unchunked[key] = True

    def get_range(self, begin, end, *, limit=0, reverse=False):
        rows = self._tr.get_range(begin, end, limit=limit, reverse=reverse)
        for key, stored in rows:
            self._unchunked[key] = stored[0] == _INLINE
        if not limit or len(rows) < limit:  # read whole: a key of the range it did not return is absent
            self._bare_ranges.append((begin, end))
        return [(key, self._decode(key, stored)) for key, stored in rows]

    def clear_range(self, begin: bytes, end: bytes) -> None:
        self._tr.clear_range(begin, end)
        self._tr.clear_range(*self._chunk_range(begin, end))
        self._bare_ranges.append((begin, end))
        for key in [k for k, bare in self._unchunked.items() if not bare and begin <= k < end]:
            self._unchunked[key] = True


class Store(abc.ABC):
    @abc.abstractmethod
    async def transact(
        self, fn: Callable[Concatenate[Transaction, P], T], /, *args: P.args, **kwargs: P.kwargs
    ) -> T: ...

    async def read(self, fn: Callable[Concatenate[Transaction, P], T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """A transaction that only reads: a consistent snapshot that never holds up writers.
        `fn` must not write. Backends without a cheaper path run it as a normal transaction."""
        return await self.transact(fn, *args, **kwargs)

    @abc.abstractmethod
    async def close(self) -> None: ...


class StoreUnavailable(RuntimeError):
    """The store did not commit after its bounded retries; the caller should retry the message later."""
