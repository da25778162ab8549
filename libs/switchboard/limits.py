"""Rate and concurrency limits per key: the rules and the store records.

A task's limits come from the task itself (`rate_limit`, `concurrency`) or else from its capability's
defaults (set by an operator through the API, or declared by an agent; the operator's win). Their keys
are templates over the task, rendered when the workflow is created (`"tenant:{payload.tenant}"`), so a
sealed payload is read only where it is plain. The task keeps what was rendered as its `limits` (a
"gate"), and its messages carry it.

The dispatcher parks a task with a gate in that gate's queue (`limited.<gate id>`); its admitter takes
the tasks out one at a time, in turn across the gates of a capability (so one key's burst does not starve
another key's single task), and sends each on only once admit() said yes in a transaction: so the limits
hold across every dispatcher replica, and a crash of any of them loses nothing (the message is acked
after it was sent on).
  rate         GCRA (a token bucket of `burst` tokens refilled at `per_s`), as the time the bucket is
               next empty: admitting a task moves it 1/per_s on. A task that may not go yet waits in its
               queue until its turn, which admit() tells; it never fails.
  concurrency  the admitted attempts that have not ended hold a slot each. Recording an attempt's end
               frees its slot (WorkflowStore), and the dispatcher is told so at once; an admission that
               finds the key full checks each holder's task and frees the slots of attempts that are over
               (timed out, cancelled, lost with their agent and retried), so no slot outlives its holder.
An operator's change of a key's numbers (`PUT /v1/limits/{key}`) is read by the next admission.

Records (fdb.tuple packed):
  (ns, "limit-cap", capability, "operator" | "agent") → {rate_limit, concurrency}   the defaults
  (ns, "limit-set", key) → {per_s, burst} | {max}                                  an operator's change
  (ns, "limit-rate", key) → {tat, per_s, burst}                                    the bucket
  (ns, "limit-hold", key, workflow_id, task_id) → {attempt, at}                    a held slot
  (ns, "limit-gate", capability, gate id) → gate                                   gates that have parked tasks
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import orjson

from switchboard.state import Transaction, pack, prefix_range, unpack

KEY_CHARS = 256
_FIELD = re.compile(r"\{([^{}]*)\}")
_PATH = re.compile(r"^(payload(\.[A-Za-z0-9_-]+)*|capability|priority|agent)$")


class BadTemplate(ValueError):
    pass


def render(template: str, task: dict, *, strict: bool = True) -> str:
    """The key for this task: each `{payload.a.b}`, `{capability}`, `{priority}` or `{agent}` replaced by
    the task's value. A field the task lacks is an error when strict, else renders empty."""

    def field(match: re.Match) -> str:
        path = match.group(1).strip()
        if not _PATH.match(path):
            raise BadTemplate(f"key {template!r}: {{{path}}} is not a field of the task (use payload.<name>, "
                              "capability, priority or agent)")
        value: Any = task
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
            if value is None:
                if strict:
                    raise BadTemplate(f"key {template!r}: the task has no {path}")
                return ""
        if isinstance(value, (dict, list)):
            if strict:
                raise BadTemplate(f"key {template!r}: {path} is not a string or a number")
            return ""
        return str(value).lower() if isinstance(value, bool) else str(value)

    key = _FIELD.sub(field, template)
    if len(key) > KEY_CHARS:
        raise BadTemplate(f"key {template!r} renders to {len(key)} characters, more than {KEY_CHARS}")
    return key


def gate_of(task: dict, defaults: dict | None, *, strict: bool = True) -> dict | None:
    """What limits a task (a TaskSpec as JSON) waits on, with their keys rendered; None without any.
    The task's own limits first; the capability's defaults only where the task sets none."""
    rate = task.get("rate_limit") or (defaults or {}).get("rate_limit")
    concurrency = task.get("concurrency") or (defaults or {}).get("concurrency")
    if not rate and not concurrency:
        return None
    gate: dict = {"capability": task["capability"]}
    if rate:
        own = bool(task.get("rate_limit"))
        gate["rate"] = {"key": render(rate["key"], task, strict=strict and own), "per_s": rate["per_s"],
                        "burst": rate.get("burst") or 1}
    if concurrency:
        own = bool(task.get("concurrency"))
        gate["concurrency"] = {"key": render(concurrency["key"], task, strict=strict and own),
                               "max": concurrency["max"]}
    gate["id"] = hashlib.sha256(orjson.dumps([task["capability"], gate.get("rate", {}).get("key"),
                                              gate.get("concurrency", {}).get("key")])).hexdigest()[:20]
    return gate


def describe(gate: dict) -> str:
    """Why a task of this gate waits, for people: "rate limit 'openai' 5/s", "concurrency limit ..."."""
    parts = []
    if "rate" in gate:
        parts.append(f"rate limit {gate['rate']['key']!r} {gate['rate']['per_s']:g}/s")
    if "concurrency" in gate:
        parts.append(f"concurrency limit {gate['concurrency']['key']!r} max {gate['concurrency']['max']}")
    return "waiting for " + " and ".join(parts)


# ---- the store --------------------------------------------------------------------------------------
def defaults(tr: Transaction, ns: str, capability: str) -> dict | None:
    """The capability's default limits: the operator's, else an agent's, else None."""
    rows = dict(tr.get_range(*prefix_range(ns, "limit-cap", capability)))
    raw = rows.get(pack(ns, "limit-cap", capability, "operator")) or rows.get(
        pack(ns, "limit-cap", capability, "agent"))
    return orjson.loads(raw) if raw else None


def set_defaults(tr: Transaction, ns: str, capability: str, by: str, value: dict | None) -> None:
    key = pack(ns, "limit-cap", capability, by)
    if value:
        tr.set(key, orjson.dumps(value))
    else:
        tr.clear(key)


def all_defaults(tr: Transaction, ns: str) -> dict[str, dict]:
    """capability → {"operator": ..., "agent": ...}."""
    out: dict[str, dict] = {}
    for key, raw in tr.get_range(*prefix_range(ns, "limit-cap")):
        *_, capability, by = unpack(key)
        out.setdefault(capability, {})[by] = orjson.loads(raw)
    return out


def override(tr: Transaction, ns: str, key: str) -> dict:
    raw = tr.get(pack(ns, "limit-set", key))
    return orjson.loads(raw) if raw else {}


def set_override(tr: Transaction, ns: str, key: str, value: dict | None) -> None:
    if value:
        tr.set(pack(ns, "limit-set", key), orjson.dumps(value))
    else:
        tr.clear(pack(ns, "limit-set", key))


def note_gate(tr: Transaction, ns: str, gate: dict) -> None:
    tr.set(pack(ns, "limit-gate", gate["capability"], gate["id"]), orjson.dumps(gate))


def gates(tr: Transaction, ns: str) -> list[dict]:
    return [orjson.loads(raw) for _, raw in tr.get_range(*prefix_range(ns, "limit-gate"))]


def rate_numbers(gate_rate: dict, changed: dict) -> tuple[float, int]:
    return float(changed.get("per_s", gate_rate["per_s"])), int(changed.get("burst", gate_rate["burst"]))


def holders(tr: Transaction, ns: str, key: str) -> list[tuple[str, str, int]]:
    return [(*unpack(k)[-2:], orjson.loads(v)["attempt"]) for k, v in
            tr.get_range(*prefix_range(ns, "limit-hold", key))]


def hold(tr: Transaction, ns: str, key: str, wf_id: str, task_id: str, attempt: int, now: float,
         parked: str | None = None) -> None:
    tr.set(pack(ns, "limit-hold", key, wf_id, task_id),
           orjson.dumps({"attempt": attempt, "at": now, "parked": parked}))


def carry(tr: Transaction, ns: str, key: str, wf_id: str, task_id: str, attempt: int, now: float) -> None:
    """A slot the task holds passes to its next attempt (a redelivered task runs as one)."""
    if tr.get(pack(ns, "limit-hold", key, wf_id, task_id)) is not None:
        hold(tr, ns, key, wf_id, task_id, attempt, now)


def release(tr: Transaction, ns: str, key: str, wf_id: str, task_id: str) -> bool:
    """Frees the task's slot under key; True if it held one."""
    slot = pack(ns, "limit-hold", key, wf_id, task_id)
    if tr.get(slot) is None:
        return False
    tr.clear(slot)
    return True


def admit(tr: Transaction, ns: str, gate: dict, wf_id: str, task_id: str, attempt: int, now: float,
          is_over, parked: str | None) -> tuple[str, float | None]:
    """Takes a slot and a token for this attempt if both are free. Returns ("admitted", None); or
    ("wait", when to try again: a time, or None for when a slot is freed); or ("copy", None) for another
    copy of a task that was admitted already. `parked` names the parking of this copy: a dispatcher that
    died before it acked the message it parked leaves two, parked twice. `is_over(tr, wf_id, task_id,
    attempt)` says whether a holder's attempt has ended, for slots whose release was missed."""
    conc = gate.get("concurrency")
    if conc:
        key = conc["key"]
        raw = tr.get(pack(ns, "limit-hold", key, wf_id, task_id))
        mine = orjson.loads(raw) if raw is not None else None
        if mine is not None and mine["attempt"] == attempt:
            # Admitted already. This very copy: the dispatcher that admitted it died, maybe before it
            # sent it on, so it is sent (again). Another copy: the one admitted went on.
            return ("admitted" if mine.get("parked") == parked else "copy"), None
        limit = int(override(tr, ns, key).get("max", conc["max"]))
        held = [h for h in holders(tr, ns, key) if h[:2] != (wf_id, task_id)]
        if len(held) >= limit:
            for holder in held:
                if is_over(tr, *holder):
                    release(tr, ns, key, holder[0], holder[1])
                    held.remove(holder)
            if len(held) >= limit:
                return "wait", None
    rate = gate.get("rate")
    if rate:
        key = rate["key"]
        per_s, burst = rate_numbers(rate, override(tr, ns, key))
        raw = tr.get(pack(ns, "limit-rate", key))
        tat = max(orjson.loads(raw)["tat"] if raw else 0.0, now)
        interval = 1.0 / per_s
        if tat - now > (burst - 1) * interval + 1e-9:
            return "wait", tat - (burst - 1) * interval
        tr.set(pack(ns, "limit-rate", key), orjson.dumps({"tat": tat + interval, "per_s": per_s, "burst": burst}))
    if conc:
        hold(tr, ns, conc["key"], wf_id, task_id, attempt, now, parked)
    return "admitted", None


def usage(tr: Transaction, ns: str, now: float, limit: int = 1000, only: str | None = None) -> list[dict]:
    """Each key's numbers and current use, for GET /v1/limits: what its gates, buckets, slots and an
    operator's changes say. At most `limit` keys; with `only`, that key alone (if it is known)."""
    keys: dict[str, dict] = {}

    def entry(key: str) -> dict:
        return keys.setdefault(key, {"key": key, "rate": None, "concurrency": None, "changed": None,
                                     "capabilities": set(), "gates": set()})

    for gate in gates(tr, ns):
        for kind in ("rate", "concurrency"):
            if kind in gate:
                e = entry(gate[kind]["key"])
                e["capabilities"].add(gate["capability"])
                e["gates"].add(gate["id"])
                if kind == "rate":
                    e["rate"] = {"per_s": gate["rate"]["per_s"], "burst": gate["rate"]["burst"]}
                else:
                    e["concurrency"] = {"max": gate["concurrency"]["max"]}
    for key, raw in tr.get_range(*prefix_range(ns, "limit-set")):
        entry(unpack(key)[-1])["changed"] = orjson.loads(raw)
    out = []
    for key in ([only] if only in keys else []) if only is not None else sorted(keys)[:limit]:
        e = keys[key]
        changed = e["changed"] or {}
        if e["rate"] is not None or "per_s" in changed:
            per_s, burst = rate_numbers(e["rate"] or {"per_s": changed["per_s"], "burst": 1}, changed)
            raw = tr.get(pack(ns, "limit-rate", key))
            tat = max(orjson.loads(raw)["tat"] if raw else 0.0, now)
            e["rate"] = {"per_s": per_s, "burst": burst,
                         "available": max(0.0, round(burst - (tat - now) * per_s, 3))}
        if e["concurrency"] is not None or "max" in changed:
            e["concurrency"] = {"max": int(changed.get("max", (e["concurrency"] or {}).get("max", 0))),
                                "running": len(holders(tr, ns, key))}
        e["capabilities"], e["gates"] = sorted(e["capabilities"]), sorted(e["gates"])
        out.append(e)
    return out
