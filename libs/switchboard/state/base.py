"""The state store interface: ordered byte keys and serializable transactions (FoundationDB's model).

Logic is written as plain synchronous functions of a Transaction, like FoundationDB's @transactional:
`await store.transact(fn, *args)` runs `fn(tr, *args)` off the event loop, commits, and retries the
whole function on a conflict. So `fn` must have no side effects other than on `tr`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

import fdb.tuple

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


class Transaction(abc.ABC):
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
