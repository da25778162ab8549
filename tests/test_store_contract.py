"""The state store contract: every backend (SQLite, FoundationDB) must pass this one suite.

FoundationDB cases run only when FDB_CLUSTER_FILE names a reachable cluster. Every key is packed under a
per-test unique first element, so tests (and runs sharing a cluster) never see each other's keys.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

import switchboard.state
from switchboard.state import Store, open_store, pack, prefix_range, unpack
from switchboard.state.base import ChunkedValues
from switchboard.state.sqlite import SqliteStore

# The directory holding the `switchboard` package under test: child processes import the same code.
LIBS = Path(switchboard.state.__file__).resolve().parents[2]
FDB_CLUSTER_FILE = os.environ.get("FDB_CLUSTER_FILE")
FDB_SKIP = "FoundationDB backend: set FDB_CLUSTER_FILE to a cluster to run"
FDB_MAX_VALUE = 100_000  # FoundationDB's value size limit: larger values must still round-trip
CHUNK = 1000
DEADLINE_S = 60.0


@dataclass
class Backend:
    name: str
    url: str  # what a child process passes to open_store

    def open(self) -> Store:
        return open_store(self.url)

    @property
    def sqlite_file(self) -> str | None:
        return self.url[len("sqlite:///"):].split("?")[0] if self.url.startswith("sqlite:") else None


@pytest.fixture(
    params=["sqlite", "sqlite-chunked",
            pytest.param("fdb", marks=pytest.mark.skipif(not FDB_CLUSTER_FILE, reason=FDB_SKIP))]
)
def backend(request, tmp_path) -> Backend:
    if request.param == "sqlite":
        return Backend("sqlite", f"sqlite:///{tmp_path / 'store.sqlite3'}")
    if request.param == "sqlite-chunked":
        # The chunking FoundationDB relies on, with tiny chunks, over SQLite: run here on every test run.
        return Backend("sqlite-chunked", f"sqlite:///{tmp_path / 'store.sqlite3'}?max_value_bytes={CHUNK}")
    return Backend("fdb", f"fdb://{os.path.abspath(FDB_CLUSTER_FILE)}")


@pytest.fixture
def ns() -> str:
    return f"contract-{uuid.uuid4().hex}"


@pytest.fixture
async def store(backend, ns):
    store = backend.open()
    yield store
    if backend.name == "fdb":
        await store.transact(lambda tr: tr.clear_range(*prefix_range(ns)))
    await store.close()


def _get(tr, key):
    return tr.get(key)


def _set(tr, key, value):
    tr.set(key, value)


def _set_many(tr, items):
    for key, value in items:
        tr.set(key, value)


def _range(tr, begin, end, limit=0, reverse=False):
    return tr.get_range(begin, end, limit=limit, reverse=reverse)


def _incr(tr, key):
    n = int(tr.get(key) or b"0") + 1
    tr.set(key, str(n).encode())
    return n


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(LIBS)}


async def _readline(stream, deadline: float) -> bytes:
    return await asyncio.wait_for(stream.readline(), timeout=max(0.0, deadline - time.monotonic()))


# --- basics -------------------------------------------------------------------------------------------


async def test_missing_key_is_none(store, ns):
    assert await store.transact(_get, pack(ns, "missing")) is None


async def test_set_get_roundtrip_and_overwrite(store, ns):
    key = pack(ns, "k")
    await store.transact(_set, key, b"one")
    value = await store.transact(_get, key)
    assert value == b"one" and type(value) is bytes
    await store.transact(_set, key, b"two")
    assert await store.transact(_get, key) == b"two"
    assert await store.transact(_set, key, value=b"") is None  # kwargs pass through; fn's result returns
    assert await store.transact(_get, key) == b""  # empty value is present, not missing


async def test_clear(store, ns):
    key, other = pack(ns, "k"), pack(ns, "other")
    await store.transact(_set_many, [(key, b"v"), (other, b"w")])
    await store.transact(lambda tr: tr.clear(key))
    assert await store.transact(_get, key) is None
    assert await store.transact(_get, other) == b"w"
    await store.transact(lambda tr: tr.clear(pack(ns, "never-set")))  # clearing a missing key is fine


async def test_read_your_writes(store, ns):
    a, b = pack(ns, "a"), pack(ns, "b")
    await store.transact(_set, a, b"old")

    def fn(tr):
        seen = [tr.get(a)]
        tr.set(a, b"new")
        seen.append(tr.get(a))
        tr.set(b, b"bee")
        seen.append(tr.get_range(*prefix_range(ns)))
        tr.clear(a)
        seen.append(tr.get(a))
        tr.clear_range(*prefix_range(ns))
        seen.append(tr.get_range(*prefix_range(ns)))
        tr.set(b, b"final")
        return seen

    assert await store.transact(fn) == [b"old", b"new", [(a, b"new"), (b, b"bee")], None, []]
    assert await store.transact(_range, *prefix_range(ns)) == [(b, b"final")]


# --- ranges -------------------------------------------------------------------------------------------

# Each element packs below the next: fdb.tuple order, which is neither Python's order nor string order.
TUPLE_ORDER = [
    None,
    b"",
    b"\x00",
    b"a",
    b"a\x00",
    b"a\x01",
    "",
    "a",
    "aa",
    "b",
    "\u00e9",
    ("a",),
    ("a", None),
    ("a", 1),
    ("b",),
    -(10**20),
    -1000,
    -1,
    0,
    1,
    255,
    256,
    10**20,
    -1.5,
    2.5,
    False,
    True,
]


async def test_range_follows_tuple_order(store, ns):
    shuffled = TUPLE_ORDER[:]
    random.Random(7).shuffle(shuffled)
    await store.transact(_set_many, [(pack(ns, element), repr(element).encode()) for element in shuffled])
    pairs = await store.transact(_range, *prefix_range(ns))
    assert [unpack(k)[1:] for k, _ in pairs] == [(element,) for element in TUPLE_ORDER]
    assert [v for _, v in pairs] == [repr(element).encode() for element in TUPLE_ORDER]
    assert all(type(k) is bytes and type(v) is bytes for k, v in pairs)


async def test_range_limit_and_reverse(store, ns):
    keys = [pack(ns, i) for i in range(10)]
    await store.transact(_set_many, [(k, str(i).encode()) for i, k in enumerate(keys)])
    begin, end = prefix_range(ns)
    assert [k for k, _ in await store.transact(_range, begin, end, limit=3)] == keys[:3]
    assert [k for k, _ in await store.transact(_range, begin, end, reverse=True)] == keys[::-1]
    assert [k for k, _ in await store.transact(_range, begin, end, limit=3, reverse=True)] == keys[:-4:-1]
    assert [k for k, _ in await store.transact(_range, begin, end, limit=100)] == keys
    assert len(await store.transact(_range, begin, end, limit=0)) == 10  # 0 means all


async def test_range_is_begin_inclusive_end_exclusive(store, ns):
    keys = [pack(ns, i) for i in range(5)]
    await store.transact(_set_many, [(k, b"") for k in keys])
    assert [k for k, _ in await store.transact(_range, keys[1], keys[3])] == keys[1:3]
    assert [k for k, _ in await store.transact(_range, keys[1], keys[3], reverse=True)] == [keys[2], keys[1]]
    assert await store.transact(_range, keys[2], keys[2]) == []
    assert await store.transact(_range, keys[3], keys[1]) == []  # begin after end: empty, not an error


async def test_prefix_range_is_a_tuple_prefix_not_a_string_prefix(store, ns):
    inside = [pack(ns, "a", "b", 1), pack(ns, "a", "b", "x"), pack(ns, "a", "b", ("nested",))]
    outside = [
        pack(ns, "a", "b"),  # the tuple itself: prefix_range is the keys that *extend* it
        pack(ns, "a", "bc"),  # shares the string prefix "b" but not the tuple prefix ("a", "b")
        pack(ns, "a", "bc", 1),
        pack(ns, "a", "a", 1),
        pack(ns, "a", "c"),
        pack(ns, "a", b"b", 1),  # bytes b"b" is a different tuple element from the string "b"
    ]
    await store.transact(_set_many, [(k, b"") for k in inside + outside])
    got = [k for k, _ in await store.transact(_range, *prefix_range(ns, "a", "b"))]
    assert got == sorted(inside)
    assert len(await store.transact(_range, *prefix_range(ns, "a"))) == len(inside + outside)


async def test_clear_range(store, ns):
    keys = [pack(ns, "r", i) for i in range(6)]
    neighbours = [pack(ns, "q"), pack(ns, "r"), pack(ns, "s", 0)]
    await store.transact(_set_many, [(k, b"v") for k in keys + neighbours])
    await store.transact(lambda tr: tr.clear_range(keys[1], keys[4]))  # clears 1, 2, 3
    got = [k for k, _ in await store.transact(_range, *prefix_range(ns, "r"))]
    assert got == [keys[0], keys[4], keys[5]]
    await store.transact(lambda tr: tr.clear_range(*prefix_range(ns, "r")))
    assert await store.transact(_range, *prefix_range(ns, "r")) == []
    assert [k for k, _ in await store.transact(_range, *prefix_range(ns))] == sorted(neighbours)


# --- atomicity and isolation --------------------------------------------------------------------------


class Boom(Exception):
    pass


async def test_exception_rolls_back_everything_and_propagates(store, ns):
    kept, cleared = pack(ns, "kept"), pack(ns, "cleared")
    await store.transact(_set_many, [(kept, b"before"), (cleared, b"still here")])

    def fn(tr):
        tr.set(kept, b"after")
        tr.set(pack(ns, "new"), b"new")
        tr.clear(cleared)
        tr.clear_range(*prefix_range(ns, "keep-range"))
        assert tr.get(kept) == b"after"
        raise Boom("inside the transaction")

    await store.transact(_set, pack(ns, "keep-range", 1), b"1")
    with pytest.raises(Boom, match="inside the transaction"):
        await store.transact(fn)
    assert await store.transact(_range, *prefix_range(ns)) == sorted(
        [(kept, b"before"), (cleared, b"still here"), (pack(ns, "keep-range", 1), b"1")]
    )
    # The store is still usable after a failed transaction.
    await store.transact(_set, pack(ns, "new"), b"ok")
    assert await store.transact(_get, pack(ns, "new")) == b"ok"


async def test_concurrent_increments_lose_no_update(backend, store, ns):
    """Many read-modify-write transactions at once, from several store handles: each sees a distinct count."""
    key = pack(ns, "counter")
    handles = [store] + [backend.open() for _ in range(3)]
    per_handle = 50
    try:
        seen = await asyncio.gather(*(h.transact(_incr, key) for h in handles for _ in range(per_handle)))
    finally:
        for h in handles[1:]:
            await h.close()
    total = len(handles) * per_handle
    assert sorted(seen) == list(range(1, total + 1))  # serializable: no two saw the same value
    assert await store.transact(_get, key) == str(total).encode()


CHILD_INCREMENT = """
import asyncio, sys
from switchboard.state import open_store, pack

url, ns, n = sys.argv[1], sys.argv[2], int(sys.argv[3])

def incr(tr, key):
    value = int(tr.get(key) or b"0") + 1
    tr.set(key, str(value).encode())
    return value

async def main():
    store = open_store(url)
    await store.transact(lambda tr: tr.get(pack(ns, "warm-up")))
    print("ready", flush=True)
    sys.stdin.readline()  # start together, so the processes contend
    seen = [await store.transact(incr, pack(ns, "counter")) for _ in range(n)]
    await store.close()
    print(" ".join(map(str, seen)), flush=True)

asyncio.run(main())
"""


async def test_concurrent_increments_from_processes_lose_no_update(backend, store, ns):
    """Several OS processes, each with its own store handle, plus this process, increment one counter."""
    key = pack(ns, "counter")
    n_procs, per_proc, in_process = 4, 150, 100
    deadline = time.monotonic() + DEADLINE_S
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", CHILD_INCREMENT, backend.url, ns, str(per_proc),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_child_env(),
        )
        for _ in range(n_procs)
    ]
    try:
        for proc in procs:
            assert await _readline(proc.stdout, deadline) == b"ready\n"
        for proc in procs:
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
        mine = await asyncio.gather(*(store.transact(_incr, key) for _ in range(in_process)))
        seen = list(mine)
        for proc in procs:
            line = await _readline(proc.stdout, deadline)
            assert await asyncio.wait_for(proc.wait(), max(0.0, deadline - time.monotonic())) == 0
            seen += [int(x) for x in line.split()]
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    total = n_procs * per_proc + in_process
    assert sorted(seen) == list(range(1, total + 1))
    assert await store.transact(_get, key) == str(total).encode()


# --- durability ---------------------------------------------------------------------------------------

CHILD_COMMIT_LOOP = """
import asyncio, sys
from switchboard.state import open_store, pack

url, ns = sys.argv[1], sys.argv[2]

def step(tr):
    n = int(tr.get(pack(ns, "counter")) or b"0") + 1
    tr.set(pack(ns, "counter"), str(n).encode())
    tr.set(pack(ns, "log", n), b"x" * 512)  # a second key in the same transaction: commits are atomic
    return n

async def main():
    store = open_store(url)
    while True:
        n = await store.transact(step)
        print(n, flush=True)  # only after transact() returned, i.e. committed

asyncio.run(main())
"""


async def test_committed_transactions_survive_sigkill(backend, store, ns):
    wanted = 200
    deadline = time.monotonic() + DEADLINE_S
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD_COMMIT_LOOP, backend.url, ns, stdout=subprocess.PIPE, env=_child_env()
    )
    reported, killed = 0, False
    try:
        while reported < wanted:
            line = await _readline(proc.stdout, deadline)
            assert line.endswith(b"\n"), "the child exited before committing enough"
            reported = int(line)
        proc.send_signal(signal.SIGKILL)
        killed = True
        # Whatever the child managed to report before dying was committed too.
        while line := await _readline(proc.stdout, deadline):
            if line.endswith(b"\n"):
                reported = int(line)
    finally:
        # Signal only once: Popen.send_signal polls, and could reap the child before asyncio's watcher.
        if not killed:
            proc.kill()
        await asyncio.wait_for(proc.wait(), max(1.0, deadline - time.monotonic()))
    assert proc.returncode == -signal.SIGKILL
    assert reported >= wanted

    reopened = backend.open()
    try:
        counter = int(await reopened.transact(_get, pack(ns, "counter")))
        log = await reopened.transact(_range, *prefix_range(ns, "log"))
    finally:
        await reopened.close()
    assert counter >= reported  # nothing the child saw committed is lost
    assert counter <= reported + 1  # at most the one commit in flight when it died
    assert [unpack(k)[-1] for k, _ in log] == list(range(1, counter + 1))  # no torn transaction
    if backend.sqlite_file:
        with sqlite3.connect(backend.sqlite_file) as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


# --- sizes and bytes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [CHUNK - 1, CHUNK, FDB_MAX_VALUE, 1 << 20])
async def test_large_values_roundtrip(store, ns, size):
    value = random.Random(size).randbytes(size)
    key = pack(ns, "big")
    await store.transact(_set, key, value)
    assert await store.transact(_get, key) == value
    assert await store.transact(_range, *prefix_range(ns)) == [(key, value)]


async def test_large_values_overwrite_clear_and_range(store, ns):
    """Big and small values side by side: overwritten either way, cleared, read in ranges forwards and
    backwards with limits, and cleared by a range that holds a key and the keys it prefixes."""
    rng = random.Random(7)
    sizes = [10, 5 * CHUNK + 1, 0, 3 * CHUNK, 2 * FDB_MAX_VALUE, CHUNK]
    items = [(pack(ns, "v", i), rng.randbytes(size)) for i, size in enumerate(sizes)]
    await store.transact(_set_many, items)
    span = prefix_range(ns, "v")
    assert await store.transact(_range, *span) == items
    assert await store.transact(_range, *span, 2, True) == items[::-1][:2]
    # Small over big and big over small, then read back the same way.
    items[1], items[2] = (items[1][0], b"small"), (items[2][0], rng.randbytes(4 * CHUNK))
    await store.transact(_set_many, items[1:3])
    assert await store.transact(_range, *span) == items
    await store.transact(lambda tr: tr.clear(items[3][0]))
    assert await store.transact(_get, items[3][0]) is None
    # A key and keys that extend it (tuple prefixes) keep their values apart; a range clear takes them all.
    parent, child = pack(ns, "p"), pack(ns, "p", "child")
    await store.transact(_set_many, [(parent, rng.randbytes(3 * CHUNK)), (child, b"c" * (2 * CHUNK))])
    assert await store.transact(_get, child) == b"c" * (2 * CHUNK)
    await store.transact(lambda tr: tr.clear(parent))
    assert await store.transact(_get, child) == b"c" * (2 * CHUNK)
    await store.transact(lambda tr: tr.clear_range(*prefix_range(ns)))
    assert await store.transact(_range, *prefix_range(ns)) == []
    # No chunk is left behind (where a backend chunks, this range holds the namespace's chunks).
    assert await store.transact(_range, *ChunkedValues._chunk_range(*prefix_range(ns))) == []


async def test_binary_keys_and_values_with_nul_bytes(store, ns):
    every_byte = bytes(range(256))
    parts = [b"\x00", b"\x00\x00", b"a\x00b", b"\xff\x00\xff", every_byte, "nul\x00in a string", (b"\x00", None)]
    items = [(pack(ns, part), every_byte + bytes([i])) for i, part in enumerate(parts)]
    await store.transact(_set_many, items)
    for key, value in items:
        assert await store.transact(_get, key) == value
    pairs = await store.transact(_range, *prefix_range(ns))
    assert pairs == sorted(items)
    assert [unpack(k)[1] for k, _ in pairs] == sorted(parts, key=pack)
    # A key that differs only after a NUL byte is a different key.
    assert await store.transact(_get, pack(ns, b"a\x00c")) is None


# --- open_store ---------------------------------------------------------------------------------------


async def test_open_store_sqlite(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'sub' / 'x.sqlite3'}")
    try:
        assert isinstance(store, SqliteStore)
        await store.transact(_set, pack("open-store"), b"v")
        assert await store.transact(_get, pack("open-store")) == b"v"
    finally:
        await store.close()
    assert (tmp_path / "sub" / "x.sqlite3").exists()


@pytest.mark.parametrize("url", ["bogus://x", "sqlite:///", "redis://localhost/0"])
def test_open_store_rejects_unknown_urls(url):
    with pytest.raises(ValueError):
        open_store(url)


def test_open_store_fdb_is_lazy():
    """Constructing an FdbStore touches neither the network nor libfdb_c (absent on most machines)."""
    script = (
        "import sys\n"
        "from switchboard.state import open_store\n"
        "from switchboard.state.fdb import FdbStore\n"
        "a, b = open_store('fdb://'), open_store('fdb:///etc/foundationdb/fdb.cluster')\n"
        "assert isinstance(a, FdbStore) and isinstance(b, FdbStore), (a, b)\n"
        "assert (a.cluster_file, b.cluster_file) == (None, '/etc/foundationdb/fdb.cluster')\n"
        "assert 'fdb.impl' not in sys.modules, 'libfdb_c was loaded'\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], env=_child_env(), capture_output=True, text=True, timeout=DEADLINE_S
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "ok\n"


async def test_read_transactions_see_committed_state(store):
    key = pack(f"read-{uuid.uuid4().hex}", "k")
    await store.transact(lambda tr: tr.set(key, b"v1"))
    assert await store.read(lambda tr: tr.get(key)) == b"v1"
    await store.transact(lambda tr: tr.set(key, b"v2"))
    assert await store.read(lambda tr: tr.get_range(key, key + b"\x00")) == [(key, b"v2")]


def _counted(tr, ns, key, other):
    tr.get(key)
    tr.get_range(*prefix_range(ns))
    tr.set(key, b"value")
    tr.clear(other)
    tr.clear_range(*prefix_range(ns, "none"))


async def test_transactions_report_what_they_read_and_wrote(backend, store, ns):
    """Every backend counts, for the store.transaction event, the reads and the mutations of the attempt
    that committed, below the chunking (a chunked value's keys count as FoundationDB stores them)."""
    from switchboard import telemetry

    recorder = telemetry.install(telemetry.Recorder())
    key, other = pack(ns, "k"), pack(ns, "other")
    try:
        await store.transact(_counted, ns, key, other)
        await store.read(lambda tr: tr.get(key))
    finally:
        telemetry.uninstall(recorder)
    writer, reader = [e for e in recorder.named("store.transaction")]
    assert writer["operation"] == "counted" and writer["reads"] >= 2
    begin, end = prefix_range(ns, "none")
    if backend.name == "sqlite":  # no chunking: exactly what fn did
        assert writer["reads"] == 2 and writer["writes"] == 3
        assert writer["written_bytes"] == len(key) + len(b"value") + len(other) + len(begin) + len(end)
    else:  # ChunkedValues adds a range clear (of chunks) to the range clear, and a header byte to the value;
        # the set and the clear are of keys the transaction read, none chunked, so no chunks of theirs to clear
        assert writer["writes"] == 4 and writer["written_bytes"] > len(key) + len(b"value") + len(other)
    assert reader["writes"] == 0 and reader["reads"] >= 1


async def test_chunks_are_cleared_whenever_a_transaction_cannot_know_there_are_none(store, ns):
    """Where a backend chunks, a set or clear skips the range clear of the key's chunks only for a key the
    same transaction saw holding none. Keys written chunked in an earlier transaction, and not read in
    this one, lose their old chunks on a small overwrite or a clear; read-then-written keys, a chunked
    value shrinking and growing within one transaction, and keys of a range read whole come out right."""
    rng = random.Random(11)
    big, bigger = rng.randbytes(3 * CHUNK), rng.randbytes(5 * CHUNK)
    blind, read_first, in_range, cleared = (pack(ns, "k", name) for name in ("blind", "read", "range", "cleared"))
    await store.transact(_set_many, [(blind, bigger), (read_first, bigger), (in_range, big), (cleared, big)])

    def overwrite(tr):
        tr.set(blind, b"small")  # never read here: its 5 chunks must go
        assert tr.get(read_first) == bigger
        tr.set(read_first, b"small")
        tr.set(read_first, big)  # chunked again, then small again, within the one transaction
        tr.set(read_first, b"tiny")
        assert dict(tr.get_range(*prefix_range(ns, "k")))[in_range] == big
        tr.set(in_range, b"small")
        tr.clear(cleared)
        tr.set(pack(ns, "k", "new"), b"n")  # in the range read whole, so known to hold no chunks

    await store.transact(overwrite)
    assert await store.transact(_range, *prefix_range(ns, "k")) == sorted(
        [(blind, b"small"), (read_first, b"tiny"), (in_range, b"small"), (pack(ns, "k", "new"), b"n")])
    assert await store.transact(_range, *ChunkedValues._chunk_range(*prefix_range(ns))) == []
