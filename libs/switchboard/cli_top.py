"""`switchboard top`: a full-screen live view of the platform, like htop or k9s, drawn with rich.

Everything comes from the REST API, so it needs no Prometheus: agents (GET /v1/agents), the control
state (GET /v1/control), the newest workflows (GET /v1/workflows) and the views of those still active or
finished within the last minute. The capability columns are computed from those views: queued and
running count their tasks now; rate is tasks finished a second over the last minute; p95 wait is the
95th percentile of queued -> started over tasks started in the last minute. They cover the --scan newest
workflows only, which is what a terminal view of a busy platform can honestly afford per refresh.

Keys: q quit; s cycle the sort order; / or f type a filter (Enter keeps it, Esc clears it).
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time

from switchboard.cli_client import UNREACHABLE, Api, CliError, options
from switchboard.cli_commands import all_agents
from switchboard.cli_watch import TERMINAL, styled

WINDOW_S = 60.0
SORTS = ("name", "status", "busy")  # agents by name/status/in-flight; workflows by newest/status/name


def add_parser(sub) -> None:
    top = sub.add_parser("top", help="a full-screen live view: agents, capabilities, workflows, controls",
                         description=__doc__, parents=[options()],
                         formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    top.add_argument("--scan", type=int, default=25, help="how many of the newest workflows to read")


def fetch(api: Api, scan: int) -> dict:
    now = time.time()
    listed = api.get("/v1/workflows", limit=scan)["workflows"]
    recent = [w for w in listed if w["status"] not in TERMINAL or (w.get("finished_at") or 0) > now - WINDOW_S]
    views = {w["workflow_id"]: api.get(f"/v1/workflows/{w['workflow_id']}") for w in recent}
    return {"agents": all_agents(api), "control": api.get("/v1/control"), "workflows": listed,
            "views": views, "at": now}


def capability_stats(data: dict) -> dict[str, dict]:
    now = data["at"]
    stats: dict[str, dict] = {c: {"queued": 0, "running": 0, "done": 0, "waits": []}
                              for c in data["agents"].get("capabilities", {})}
    for view in data["views"].values():
        for task in view["tasks"]:
            s = stats.setdefault(task["capability"], {"queued": 0, "running": 0, "done": 0, "waits": []})
            if task["status"] in ("queued", "running"):
                s[task["status"]] += 1
            if task.get("finished_at") and task["finished_at"] > now - WINDOW_S:
                s["done"] += 1
            if task.get("started_at") and task.get("queued_at") and task["started_at"] > now - WINDOW_S:
                s["waits"].append(max(0.0, task["started_at"] - task["queued_at"]))
    for s in stats.values():
        waits = sorted(s.pop("waits"))
        s["rate"] = s.pop("done") / WINDOW_S
        s["p95_wait"] = waits[min(len(waits) - 1, int(0.95 * len(waits)))] if waits else None
    return stats


class View:
    """What the keys change: the sort order and the filter (typed after / or f)."""

    def __init__(self):
        self.sort = 0
        self.filter = ""
        self.typing = False

    def key(self, char: str) -> bool:
        """Applies one key; False means quit."""
        if self.typing:
            if char in ("\r", "\n"):
                self.typing = False
            elif char == "\x1b":
                self.typing, self.filter = False, ""
            elif char in ("\x7f", "\b"):
                self.filter = self.filter[:-1]
            elif char.isprintable():
                self.filter += char
            return True
        if char in ("q", "Q", "\x03"):
            return False
        if char == "s":
            self.sort = (self.sort + 1) % len(SORTS)
        elif char in ("/", "f"):
            self.typing, self.filter = True, ""
        elif char == "\x1b":
            self.filter = ""
        return True

    def keep(self, *texts) -> bool:
        return not self.filter or any(self.filter.lower() in str(t).lower() for t in texts)


def render(data: dict | None, view: View, problem: str | None):
    from rich.layout import Layout
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    layout = Layout()
    layout.split_column(Layout(name="header", size=3), Layout(name="middle", ratio=1),
                        Layout(name="workflows", ratio=1))
    layout["middle"].split_row(Layout(name="agents"), Layout(name="capabilities"))
    control = (data or {}).get("control") or {}
    if control.get("stopped"):
        state = "[bold red]STOP-ALL ON[/]"
    elif control.get("paused"):
        state = "[yellow]all paused[/]"
    else:
        state = "[green]dispatching[/]"
    if control.get("paused_capabilities"):
        state += f"  paused: {', '.join(control['paused_capabilities'])}"
    filt = f"  filter: [reverse]{view.filter}{'_' if view.typing else ''}[/]" if view.filter or view.typing else ""
    title = f"[bold]switchboard top[/]  {time.strftime('%H:%M:%S')}  {state}  sort: {SORTS[view.sort]}{filt}"
    if problem:
        title += f"  [red]{problem}[/]"
    layout["header"].update(Panel(Text.from_markup(title), subtitle="q quit  s sort  / filter"))
    if data is None:
        return layout

    agents = [a for a in data["agents"]["agents"] if view.keep(a["name"], a["status"], *a["capabilities"])]
    agent_order = {"name": lambda a: a["name"], "status": lambda a: (a["status"], a["name"]),
                   "busy": lambda a: (-(a.get("in_flight") or 0), a["name"])}[SORTS[view.sort]]
    table = Table("agent", "status", "in flight", "breaker", "heartbeat", box=None, expand=True)
    for a in sorted(agents, key=agent_order):
        breaker = a.get("breaker")
        breaker = breaker.get("state") if isinstance(breaker, dict) else breaker
        beat = f"{data['at'] - a['last_heartbeat']:.1f}s" if a.get("last_heartbeat") else ""
        table.add_row(a["name"], styled(a["status"]) if a["status"] != "alive" else "[green]alive[/]",
                      str(a.get("in_flight", 0)), str(breaker or ""), beat)
    layout["agents"].update(Panel(table, title=f"agents ({len(agents)})"))

    caps = Table("capability", "queued", "running", "rate/s", "p95 wait", box=None, expand=True)
    for name, s in sorted(capability_stats(data).items()):
        if view.keep(name):
            wait = f"{s['p95_wait']:.2f}s" if s["p95_wait"] is not None else "-"
            caps.add_row(name, str(s["queued"]), str(s["running"]), f"{s['rate']:.2f}", wait)
    layout["capabilities"].update(Panel(caps, title=f"capabilities (last {WINDOW_S:.0f}s)"))

    wfs = [w for w in data["workflows"] if view.keep(w["workflow_id"], w.get("name"), w["status"])]
    wf_order = {"name": None, "status": lambda w: w["status"], "busy": lambda w: w.get("name") or ""}[SORTS[view.sort]]
    if wf_order:
        wfs = sorted(wfs, key=wf_order)
    recent = Table("workflow", "name", "status", "done", "age", box=None, expand=True)
    recent.columns[0].no_wrap = True
    recent.columns[0].min_width = 32
    for w in wfs:
        v = data["views"].get(w["workflow_id"])
        done = f"{sum(t['status'] in TERMINAL for t in v['tasks'])}/{len(v['tasks'])}" if v else str(w.get("tasks", ""))
        age = f"{data['at'] - w['created_at']:.0f}s" if w.get("created_at") else ""
        recent.add_row(w["workflow_id"], w.get("name") or "", styled(w["status"]), done, age)
    layout["workflows"].update(Panel(recent, title=f"recent workflows ({len(wfs)})"))
    return layout


def top(api: Api, args) -> int:
    from rich.live import Live

    from switchboard.cli_client import console

    view = View()
    data = fetch(api, args.scan)  # fails fast (exit 3) if there is no API at all
    fd = sys.stdin.fileno()
    saved = None
    if os.isatty(fd):
        import termios
        import tty

        saved = termios.tcgetattr(fd)
        tty.setcbreak(fd)  # keys arrive one at a time, unechoed; Ctrl-C still interrupts
    previous = signal.signal(signal.SIGTERM, _terminate)
    keys_open = True
    try:
        with Live(render(data, view, None), console=console(), screen=True, auto_refresh=False) as live:
            while True:
                problem = None
                try:
                    data = fetch(api, args.scan)
                except CliError as exc:  # keep the last picture and say why it is stale
                    problem = str(exc) if exc.code == UNREACHABLE else f"API: {exc}"
                live.update(render(data, view, problem), refresh=True)
                deadline = time.monotonic() + args.interval
                while (left := deadline - time.monotonic()) > 0:
                    if not keys_open:
                        time.sleep(left)
                        break
                    ready, _, _ = select.select([fd], [], [], left)
                    if not ready:
                        continue
                    chars = os.read(fd, 64).decode(errors="ignore")
                    if not chars:  # stdin closed (not a terminal): refresh only
                        keys_open = False
                        continue
                    for char in chars:
                        if not view.key(char):
                            return 0
                    live.update(render(data, view, problem), refresh=True)
    except KeyboardInterrupt:
        return 0
    finally:
        if saved is not None:
            import termios

            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        signal.signal(signal.SIGTERM, previous)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through `finally`, which restores the terminal
