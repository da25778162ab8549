"""A server-sent-events client for the tests: reads one stream in the background."""

from __future__ import annotations

import asyncio
import contextlib

import orjson


class Reader:
    """Reads one event stream in the background into `events`: (id or None, event, data), in order;
    `comments` counts comment lines (heartbeats). A non-200 answer's body is in `body`."""

    def __init__(self, client, path: str = "/v1/events", params: dict | None = None, headers: dict | None = None):
        self.client, self.path, self.params, self.headers = client, path, params or {}, headers
        self.events: list[tuple[int | None, str, dict]] = []
        self.comments = 0
        self.opened, self.ended = asyncio.Event(), asyncio.Event()
        self.status: int | None = None
        self.body: bytes = b""

    async def __aenter__(self) -> Reader:
        self.task = asyncio.create_task(self._read())
        await asyncio.wait_for(self.opened.wait(), 10)
        return self

    async def __aexit__(self, *exc) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    async def _read(self) -> None:
        try:
            async with self.client.stream("GET", self.path, params=self.params, headers=self.headers,
                                          timeout=None) as response:
                self.status = response.status_code
                if response.status_code != 200:
                    self.body = await response.aread()
                    return
                self.opened.set()
                fields: dict = {}
                async for line in response.aiter_lines():
                    if line.startswith(":"):
                        self.comments += 1
                    elif line == "" and "event" in fields:
                        seq = int(fields["id"]) if "id" in fields else None
                        self.events.append((seq, fields["event"], orjson.loads(fields["data"])))
                        fields = {}
                    elif line:
                        key, _, value = line.partition(":")
                        fields[key] = value.lstrip(" ")
        finally:
            self.opened.set()
            self.ended.set()

    def of(self, event: str, **match) -> list[dict]:
        return [d for _, e, d in self.events if e == event and all(d.get(k) == v for k, v in match.items())]

    def entries(self) -> list[dict]:
        """The log's entries received (those with a seq)."""
        return [d for _, _, d in self.events if "seq" in d]

    def last_id(self) -> int:
        return max((i for i, _, _ in self.events if i is not None), default=0)

    def text(self, task_id: str) -> str:
        return "".join(d["text"] for d in self.of("chunk", task_id=task_id))
