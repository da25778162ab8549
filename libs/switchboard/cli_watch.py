"""Waiting for workflows, with a live per-task table and progress bar on the terminal (stderr).

The wait itself is the API's long-poll (GET /v1/workflows/{id}?wait=S): while a display is shown the
polls are short (1 s) so the table moves; without one (--output json, or stderr not a terminal) a poll
lasts until the workflow ends or the --timeout is spent.
"""

from __future__ import annotations

import sys
import time

from switchboard.cli_client import Api
from switchboard.workflows import TERMINAL_WORKFLOW as TERMINAL  # a task's terminal statuses are among them
STATUS_STYLES = {"pending": "dim", "queued": "blue", "running": "yellow", "waiting_input": "cyan",
                 "succeeded": "green", "failed": "red", "cancelled": "magenta",
                 "budget_exceeded": "red"}
LONG_POLL_S = 30.0  # below the API's 300 s cap and the client's timeout


class Printer:
    """Streamed text on `stream` (stdout; None prints none) and remarks on stderr, each remark on a line
    of its own even when the text stopped mid-line, since both usually reach the same terminal."""

    def __init__(self, stream):
        self.stream, self.mid_line = stream, False

    def write(self, text: str) -> None:
        if self.stream is not None and text:
            self.stream.write(text)
            self.stream.flush()  # a token at a time: that is the point of streaming it
            self.mid_line = not text.endswith("\n")

    def say(self, message: str) -> None:
        if self.mid_line:
            self.stream.write("\n")
            self.stream.flush()
            self.mid_line = False
        print(message, file=sys.stderr, flush=True)


def styled(status: str) -> str:
    return f"[{STATUS_STYLES.get(status, 'white')}]{status}[/]"


def view_table(view: dict):
    """A workflow's header, progress bar and per-task table, as one rich renderable."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    tasks = view["tasks"]
    done = sum(t["status"] in TERMINAL for t in tasks)
    name = f" ({view['name']})" if view.get("name") else ""
    header = Text.from_markup(f"workflow [bold]{view['workflow_id']}[/]{name}: {styled(view['status'])}  "
                              f"{done}/{len(tasks)} tasks done")
    table = Table(box=None, pad_edge=False, show_edge=False)
    for column in ("task", "capability", "status", "attempts", "ran on", "error"):
        table.add_column(column, no_wrap=column != "error", overflow="fold")
    for task in tasks:
        error = task.get("error")
        message = (error.get("message") if isinstance(error, dict) else error) or task.get("reason") or ""
        table.add_row(task["id"], task["capability"], styled(task["status"]), str(task.get("attempts") or 0),
                      str(task.get("ran_on") or task.get("agent") or ""), str(message))
    # A grid row, so that the bar ends its line (a bare ProgressBar does not end one when piped).
    top = Table.grid(padding=(0, 2))
    top.add_row(header, ProgressBar(total=max(1, len(tasks)), completed=done, width=30))
    return Group(top, table)


def wait_all(api: Api, ids: list[str], *, live: bool, timeout: float | None) -> list[dict]:
    """The views of `ids` once each is terminal (or as they are when `timeout` runs out)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    views: dict[str, dict] = {}

    def poll(wf_id: str, most: float) -> dict:
        left = most if deadline is None else max(0.0, min(most, deadline - time.monotonic()))
        return api.call("GET", f"/v1/workflows/{wf_id}", params={"wait": round(left, 2)}, timeout=left + 30)

    def pending() -> list[str]:
        return [i for i in ids if views.get(i, {}).get("status") not in TERMINAL]

    def expired() -> bool:
        return deadline is not None and time.monotonic() >= deadline

    if not live:
        while pending() and not expired():
            for wf_id in pending():
                views[wf_id] = poll(wf_id, LONG_POLL_S)
        for wf_id in ids:  # a timeout of 0: still report each one as it is
            views.setdefault(wf_id, poll(wf_id, 0))
        return [views[i] for i in ids]

    from rich.console import Group
    from rich.live import Live

    from switchboard.cli_client import console

    for wf_id in ids:
        views[wf_id] = poll(wf_id, 0)
    with Live(Group(*(view_table(views[i]) for i in ids)), console=console(stderr=True),
              refresh_per_second=4, transient=False) as screen:
        while pending() and not expired():
            for wf_id in pending():
                views[wf_id] = poll(wf_id, 1.0 if len(ids) == 1 else 0.2)
            screen.update(Group(*(view_table(views[i]) for i in ids)))
    return [views[i] for i in ids]


def follow_family(api: Api, wf_id: str, *, live: bool, timeout: float) -> list[dict]:
    """Follows a workflow and the child workflows its tasks start (found by their `parent`) until the
    parent ends; returns [parent view, *child views]. Without a live display it prints each task's
    status change, one line each, to stderr."""
    deadline = time.monotonic() + timeout
    seen: dict[tuple[str, str], str] = {}

    def family() -> list[dict]:
        parent = api.call("GET", f"/v1/workflows/{wf_id}", params={"wait": 0.5}, timeout=30)
        listed = api.get("/v1/workflows", limit=50)["workflows"]
        children = [api.get(f"/v1/workflows/{w['workflow_id']}") for w in reversed(listed)
                    if (w.get("parent") or {}).get("workflow_id") == wf_id]
        return [parent, *children]

    def report(views: list[dict]) -> None:
        import sys

        for view in views:
            for task in view["tasks"]:
                key = (view["workflow_id"], task["id"])
                if seen.get(key) != task["status"]:
                    seen[key] = task["status"]
                    where = "" if view["workflow_id"] == wf_id else f"{view.get('name') or view['workflow_id']}: "
                    why = f" ({task['reason']})" if task.get("reason") else ""
                    print(f"  {where}{task['id']:8} {task['status']}{why}", file=sys.stderr)

    def done(views: list[dict]) -> bool:
        return views[0]["status"] in TERMINAL or time.monotonic() >= deadline

    views = family()
    if not live:
        report(views)
        while not done(views):
            views = family()
            report(views)
        return views

    from rich.console import Group
    from rich.live import Live

    from switchboard.cli_client import console

    with Live(Group(*map(view_table, views)), console=console(stderr=True), refresh_per_second=4) as screen:
        while not done(views):
            views = family()
            screen.update(Group(*map(view_table, views)))
    return views
