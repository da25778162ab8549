"""The source of truth: workflows, tasks, attempts, results and dead letters, behind one interface."""

from __future__ import annotations

from urllib.parse import urlparse

from switchboard.state.base import Store, StoreUnavailable, Transaction, pack, prefix_range, unpack

__all__ = ["Store", "StoreUnavailable", "Transaction", "open_store", "pack", "prefix_range", "unpack"]


def open_store(url: str) -> Store:
    """`sqlite:///relative/path`, `sqlite:////absolute/path`, `fdb://` (default cluster file) or `fdb:///path`."""
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        from switchboard.state.sqlite import SqliteStore

        path = url[len("sqlite:///"):]
        if not path:
            raise ValueError(f"store url {url!r} names no file")
        return SqliteStore(path)
    if parsed.scheme == "fdb":
        from switchboard.state.fdb import FdbStore

        return FdbStore(parsed.path or None)
    raise ValueError(f"unknown store url {url!r}: use sqlite:///path or fdb://[/cluster-file]")
