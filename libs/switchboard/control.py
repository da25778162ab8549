"""The operator's controls, kept in the state store so they survive a restart of every service:
stop-all (no dispatching, and agents take no new work), and pause / resume, globally or per capability
(tasks wait, queued, until resumed; agents finish what they hold)."""

from __future__ import annotations

import orjson

from switchboard.protocol import Envelope, MessageType
from switchboard.state import Store, Transaction, pack

DEFAULT = {"stopped": False, "paused": False, "paused_capabilities": []}


def dispatch_blocked(state: dict, capability: str) -> str | None:
    """Why tasks of this capability must wait, or None."""
    if state["stopped"]:
        return "emergency stop: all dispatching is halted"
    if state["paused"]:
        return "dispatching is paused"
    if capability in state["paused_capabilities"]:
        return f"capability {capability!r} is paused"
    return None


def message(state: dict, source: str) -> Envelope:
    return Envelope(type=MessageType.CONTROL, subject="control.state", source=source, payload=state)


class Controls:
    def __init__(self, store: Store, namespace: str):
        self.store = store
        self.key = pack(namespace, "control")

    def _read(self, tr: Transaction) -> dict:
        raw = tr.get(self.key)
        return {**DEFAULT, **orjson.loads(raw)} if raw else dict(DEFAULT)

    async def get(self) -> dict:
        return await self.store.read(self._read)

    async def change(self, action: str, capability: str | None = None) -> dict:
        """action: stop-all, pause or resume (capability None means every capability)."""

        def txn(tr: Transaction) -> dict:
            state = self._read(tr)
            paused = set(state["paused_capabilities"])
            if action == "stop-all":
                state["stopped"] = True
            elif action == "pause" and capability:
                paused.add(capability)
            elif action == "pause":
                state["paused"] = True
            elif action == "resume" and capability:
                paused.discard(capability)
            elif action == "resume":
                state.update(stopped=False, paused=False)
                paused.clear()
            else:
                raise ValueError(f"unknown control action {action!r}")
            state["paused_capabilities"] = sorted(paused)
            tr.set(self.key, orjson.dumps(state))
            return state

        return await self.store.transact(txn)
