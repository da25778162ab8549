"""How long SQLite store transactions wait for each other across processes (the embedded backend).

    python bench/sqlite_locks.py [--processes 3] [--transactions 2000]

Each process commits small transactions (8 keys of 300 bytes) on one shared file, 0.5 ms apart, the way
the api, the aggregator and the coordinator share the store, and the run prints the distribution of a
transaction's time (waiting for the write lock included) over all of them.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import tempfile
import time

from switchboard.state.sqlite import SqliteStore


def _worker(path: str, n: int, results: multiprocessing.Queue) -> None:
    store = SqliteStore(path)

    def txn(tr) -> None:
        for i in range(8):
            tr.set(f"k{os.getpid()}-{i}".encode(), b"x" * 300)

    async def main() -> list[float]:
        times = []
        for _ in range(n):
            began = time.perf_counter()
            await store.transact(txn)
            times.append(time.perf_counter() - began)
            await asyncio.sleep(0.0005)
        await store.close()
        return times

    results.put(asyncio.run(main()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--transactions", type=int, default=2000, help="per process")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sb-locks-") as folder:
        path = os.path.join(folder, "store.sqlite3")
        results: multiprocessing.Queue = multiprocessing.Queue()
        workers = [multiprocessing.Process(target=_worker, args=(path, args.transactions, results))
                   for _ in range(args.processes)]
        for w in workers:
            w.start()
        times = sorted(t for _ in workers for t in results.get())
        for w in workers:
            w.join()
    n = len(times)
    print(f"{n} transactions in {args.processes} processes: ms p50 {times[n // 2] * 1e3:.3f}, "
          f"p90 {times[int(n * 0.9)] * 1e3:.3f}, p99 {times[int(n * 0.99)] * 1e3:.3f}, max {times[-1] * 1e3:.2f}; "
          f"over 1 ms: {sum(t > 0.001 for t in times) / n * 100:.1f}%")


if __name__ == "__main__":
    main()
