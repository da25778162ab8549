"""The source of truth: workflows, tasks, attempts, results and dead letters, behind one interface."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

from switchboard.state.base import Store, StoreUnavailable, Transaction, pack, prefix_range, unpack

__all__ = ["Store", "StoreUnavailable", "Transaction", "open_store", "pack", "prefix_range", "unpack"]


def open_store(url: str) -> Store:
    """`sqlite:///relative/path`, `sqlite:////absolute/path`, `fdb://` (default cluster file) or `fdb:///path`.
    A sqlite url takes `?max_value_bytes=N` (values over N bytes in chunks, as on FoundationDB)."""
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        from switchboard.state.sqlite import SqliteStore

        path = url[len("sqlite:///"):].split("?", 1)[0]
        if not path:
            raise ValueError(f"store url {url!r} names no file")
        limit = parse_qs(parsed.query).get("max_value_bytes")
        return SqliteStore(path, max_value_bytes=int(limit[0]) if limit else None)
    if parsed.scheme == "fdb":
        from switchboard.state.fdb import FdbStore

        return FdbStore(parsed.path or None)
    raise ValueError(f"unknown store url {url!r}: use sqlite:///path or fdb://[/cluster-file]")
