"""A running task's streamed text and progress, sent to the aggregator coalesced and in order.

One sender per task, one message in flight at a time: what a handler streams while a message is on its
way joins the next one. So at 1,000 chunks a second an agent sends as many messages as confirms come
back (a few hundred a second at most), and each chunk waits for at most one round trip. Progress rides
along with text, or goes alone at most every PROGRESS_EVERY_S. The buffer is bounded: a handler that
streams faster than the broker takes waits in `text()`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from switchboard.tasklog import MESSAGE_CHARS, PROGRESS_EVERY_S

BUFFER_CHARS = 1_000_000


class Reporter:
    def __init__(self, send: Callable[[dict], Awaitable[None]]):
        self._send = send
        self._text: list[str] = []
        self._buffered = 0
        self.offset = 0  # characters sent so far: where the buffer starts in the attempt's stream
        self._progress: dict | None = None
        self._progress_n = 0
        self._progress_sent_at = float("-inf")
        self._flushing = False
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._room = asyncio.Event()
        self._room.set()
        self._sender: asyncio.Task | None = None
        self._error: BaseException | None = None

    async def text(self, text: str) -> None:
        self._check()
        if text:
            self._text.append(text)
            self._buffered += len(text)
            self._kick()
            if self._buffered > BUFFER_CHARS:
                self._room.clear()
                await self._room.wait()
                self._check()

    def progress(self, message: str | None, percent: float | None, data: object) -> None:
        self._check()
        self._progress_n += 1
        self._progress = {"message": message, "percent": percent, "data": data, "n": self._progress_n}
        self._kick()

    async def flush(self) -> int:
        """Sends everything buffered, progress included; returns how much text the attempt streamed."""
        if self._sender is not None:
            self._flushing = True
            try:
                self._kick()
                await self._idle.wait()
            finally:
                self._flushing = False
        self._check()
        return self.offset

    def close(self) -> None:
        if self._sender is not None:
            self._sender.cancel()

    def _check(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"streaming failed: {self._error}") from self._error

    def _kick(self) -> None:
        self._idle.clear()
        self._wake.set()
        if self._sender is None:
            self._sender = asyncio.create_task(self._run())

    def _progress_due_in(self) -> float:
        if self._progress is None:
            return float("inf")
        return 0.0 if self._flushing else self._progress_sent_at + PROGRESS_EVERY_S - time.monotonic()

    async def _run(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._text or self._progress_due_in() <= 0:
                    await self._send_one()
                if self._progress is not None:  # a later progress waits its turn, then goes alone
                    try:
                        await asyncio.wait_for(self._wake.wait(), self._progress_due_in())
                    except TimeoutError:
                        pass
                    self._wake.set()
                    continue
                self._idle.set()
        except Exception as exc:  # noqa: BLE001 (kept, and raised from the handler's next call)
            self._error = exc
            self._idle.set()
            self._room.set()

    async def _send_one(self) -> None:
        payload: dict = {"offset": self.offset}
        text = "".join(self._text)
        head, rest = text[:MESSAGE_CHARS], text[MESSAGE_CHARS:]
        if head:
            payload["text"] = head
        # With text, progress costs nothing more; alone, it waits for its interval.
        if self._progress is not None and (head or self._progress_due_in() <= 0):
            payload["progress"] = self._progress
            self._progress = None
            self._progress_sent_at = time.monotonic()
        self._text, self._buffered = ([rest] if rest else []), len(rest)
        await self._send(payload)
        self.offset += len(head)
        if self._buffered <= BUFFER_CHARS:
            self._room.set()
