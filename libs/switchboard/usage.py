"""What handlers spend (`task.report_usage(tokens=..., cost=...)`) and what a workflow may spend (its
`budget`): the rules, as pure functions of the records; WorkflowStore applies them in its transactions.

Counted exactly once: a report carries the attempt's running totals and its number n (1, 2, 3, ...), and
the task keeps the newest n of its current attempt. A report is taken only if it is newer; the difference
from the last one taken is what it adds. So a redelivered report adds nothing, and reports that arrive out
of order add up to the same. The attempt's result or error carries its final totals: a report that
reaches the store after the outcome (two aggregators took them) comes too late to count, so the outcome
counts it. Usage reported after a task ended (it was cancelled, say) is not counted.

What a task adds goes to the task, its workflow and each workflow it was delegated from, up to
MAX_DEPTH ancestors: a workflow's usage includes its child workflows'. A workflow's budget is exceeded
when its usage goes over either limit (reaching it is not exceeding it); then it stops, with status
budget_exceeded, and so do its descendants. A workflow that has finished is not stopped: its usage may
show more than its budget.
"""

from __future__ import annotations

import math
from typing import Any

MAX_DEPTH = 32  # ancestors a report is charged to (a delegation chain is rarely more than a few deep)
STOP_LIMIT = 1_000  # workflows one crossing stops in one transaction; others stop when they report usage
_PLACES = 9  # costs are rounded so that sums of small amounts read as typed (0.3, not 0.30000000000000004)


def zero() -> dict:
    return {"tokens": 0, "cost": 0.0}


def parse(report: Any) -> dict:
    """A usage report {tokens, cost, n} as sent, checked; raises ValueError (the message is dead-lettered)."""
    if not isinstance(report, dict):
        raise ValueError("usage is an object {tokens, cost, n}")
    tokens, cost, n = report.get("tokens", 0), report.get("cost", 0.0), report.get("n")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"usage tokens is a non-negative integer, not {tokens!r}")
    if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not math.isfinite(cost) or cost < 0:
        raise ValueError(f"usage cost is a non-negative number, not {cost!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"usage n numbers the attempt's reports from 1, not {n!r}")
    return {"tokens": tokens, "cost": float(cost), "n": n}


def check_amounts(tokens: Any, cost: Any) -> None:
    """What a handler may report (the SDK's side of parse): raises ValueError or TypeError."""
    if isinstance(tokens, bool) or not isinstance(tokens, int):
        raise TypeError("tokens is an integer")
    if isinstance(cost, bool) or not isinstance(cost, (int, float)):
        raise TypeError("cost is a number")
    if tokens < 0 or cost < 0 or not math.isfinite(cost):
        raise ValueError("usage is never negative (report what was spent since the last report)")


def take(task: dict, attempt: int, report: dict) -> dict | None:
    """Records a parsed report of the task's current attempt; returns what it adds, or None if nothing."""
    run = task.get("usage_run") or {}
    if run.get("attempt") != attempt:
        if run.get("attempt", 0) > attempt:
            return None
        run = {"attempt": attempt, "n": 0, "tokens": 0, "cost": 0.0}
    if report["n"] <= run["n"]:
        return None
    # Totals only grow; a lower one (a broken sender) adds nothing rather than taking back.
    delta = {"tokens": max(0, report["tokens"] - run["tokens"]), "cost": max(0.0, report["cost"] - run["cost"])}
    task["usage_run"] = {"attempt": attempt, "n": report["n"], "tokens": max(run["tokens"], report["tokens"]),
                         "cost": max(run["cost"], report["cost"])}
    task["usage"] = add(task.get("usage"), delta)
    return delta if delta["tokens"] or delta["cost"] else None


def add(total: dict | None, delta: dict) -> dict:
    total = total or zero()
    return {"tokens": total["tokens"] + delta["tokens"], "cost": round(total["cost"] + delta["cost"], _PLACES)}


def exceeded(usage: dict | None, budget: dict | None) -> bool:
    if not budget:
        return False
    usage = usage or zero()
    return ((budget.get("tokens") is not None and usage["tokens"] > budget["tokens"])
            or (budget.get("cost") is not None and usage["cost"] > budget["cost"]))


def describe(usage: dict, budget: dict) -> str:
    """Why a workflow stopped: e.g. "budget exceeded: 150 tokens (budget 100), cost 0.02 (budget 1.0)"."""
    parts = [f"{name} {usage[name]:g} (budget {budget[name]:g})" if budget.get(name) is not None
             else f"{name} {usage[name]:g}" for name in ("tokens", "cost")]
    return "budget exceeded: " + ", ".join(parts)
