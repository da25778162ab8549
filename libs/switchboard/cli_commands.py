"""The REST commands of `switchboard`: submit, workflows, show, wait, cancel, dag, agents, dlq, control.

Each is a function (api, args) -> exit status, run by cli_client.run. With `--output json` each prints
the API's body, except: `submit --wait` and `wait` print the final view (or {"workflows": [views]} for
several), `dag --format ascii|mermaid|svg` prints the drawing (json: the view), `dlq delete` prints
{"deleted": ID}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from switchboard import cli_dag, cli_watch
from switchboard.cli_client import OK, FAILED, USAGE, EXIT_CODES_HELP, Api, CliError, emit, options, say
from switchboard.cli_watch import styled

WORKFLOW_STATUSES = ["pending", "running", "succeeded", "failed", "cancelled", "budget_exceeded"]


def add_parsers(sub) -> None:
    common = [options()]
    leaf = [options(nested=True)]

    def command(name: str, help: str, parents=common, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=f"{help}.", epilog=EXIT_CODES_HELP, parents=parents, **kw)

    submit = command("submit", "submit one workflow or many from a JSON or YAML file")
    submit.add_argument("file", help="a workflow {name?, tasks: [...]}, a list of them, or {workflows: [...]}; "
                                     "'-' reads stdin")
    submit.add_argument("--wait", action="store_true", help="follow it live until it ends; exit 0 only if all succeed")
    submit.add_argument("--timeout", type=float, default=None, metavar="S", help="with --wait: give up after S s")
    workflows = command("workflows", "list workflows, newest first")
    workflows.add_argument("--status", choices=WORKFLOW_STATUSES)
    workflows.add_argument("--limit", type=int, default=50)
    workflows.add_argument("--after", default=None, help="the last workflow id of the previous page")
    show = command("show", "a workflow's view: status and every task")
    show.add_argument("id")
    wait = command("wait", "wait until a workflow ends (long-polls the API); exit 0 if it succeeded")
    wait.add_argument("id")
    wait.add_argument("--timeout", type=float, default=None, metavar="S")
    cancel = command("cancel", "cancel a workflow")
    cancel.add_argument("id")
    dag = command("dag", "a workflow's DAG with task statuses: ascii, mermaid or svg")
    dag.add_argument("id")
    dag.add_argument("--format", choices=list(cli_dag.RENDERERS), default="ascii")
    dag.add_argument("--out", default=None, metavar="FILE", help="write it to FILE instead of stdout")
    demo = command("demo", "follow live a planner that delegates to other agents, then a writer that streams "
                           "a draft, asks for approval and publishes it")
    demo.add_argument("--url", dest="api", default=argparse.SUPPRESS, help="the same as --api (older spelling)")
    demo.add_argument("--goal", default="why the sky is blue")
    demo.add_argument("--topic", default="tides", help="what the writer writes about")
    demo.add_argument("--only", choices=["planner", "writer"], default=None, help="run one of the two demos")
    demo.add_argument("--ask", action="store_true",
                      help="on a terminal, ask you to approve the draft (otherwise it is approved for you)")
    demo.add_argument("--timeout", type=float, default=120.0, metavar="S", help="for each of the two demos")
    agents_cmd = command("agents", "agents with status, in-flight work and breakers; capability breakers")
    agents_cmd.add_argument("--capability", default=None, help="only the agents serving it")
    agents_cmd.add_argument("--status", choices=["alive", "lost"], default=None)
    agents_cmd.add_argument("--limit", type=int, default=None,
                            help="one page of at most this many (1..1000; its `next` goes to --after); "
                                 "without it, every agent")
    agents_cmd.add_argument("--after", default=None, help="the last agent name of the previous page")

    dlq = command("dlq", "dead letters: list, show, replay, delete")
    dlq_actions = dlq.add_subparsers(dest="action", required=True)
    dlq_list = dlq_actions.add_parser("list", help="dead letters, oldest first", parents=leaf)
    for name in ("capability", "reason", "workflow-id"):
        dlq_list.add_argument(f"--{name}", default=None)
    dlq_list.add_argument("--status", choices=["dead", "replayed"], default=None)
    dlq_list.add_argument("--limit", type=int, default=100)
    dlq_list.add_argument("--after", default=None)
    dlq_show = dlq_actions.add_parser("show", help="one dead letter", parents=leaf)
    dlq_show.add_argument("id")
    replay = dlq_actions.add_parser("replay", help="replay one dead letter (ID) or every match of the filters",
                                    parents=leaf)
    replay.add_argument("id", nargs="?", default=None)
    for name in ("capability", "reason", "workflow-id"):
        replay.add_argument(f"--{name}", default=None)
    replay.add_argument("--limit", type=int, default=None)
    replay.add_argument("--rate", type=float, default=None, metavar="PER_S", help="replays a second")
    delete = dlq_actions.add_parser("delete", help="delete a dead letter", parents=leaf)
    delete.add_argument("id")

    control = command("control", "the emergency stop and pausing: show, stop-all, pause, resume")
    control_actions = control.add_subparsers(dest="action", required=True)
    control_actions.add_parser("show", help="the control state", parents=leaf)
    control_actions.add_parser("stop-all", help="dispatch nothing until resume", parents=leaf)
    for action in ("pause", "resume"):
        p = control_actions.add_parser(action, help=f"{action} one capability, or everything", parents=leaf)
        p.add_argument("--capability", default=None)


# -- reading workflow files --------------------------------------------------------------------------

def read_workflows(path: str) -> list[dict]:
    """The workflows in a JSON or YAML file (YAML is a superset of JSON, but JSON's own parser gives the
    better error for .json files). CliError(USAGE) for anything that is not one workflow or a list."""
    import yaml

    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}", USAGE) from exc
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise CliError(f"{path} is neither JSON nor YAML: {exc}", USAGE) from exc
    if isinstance(data, dict) and isinstance(data.get("workflows"), list):
        data = data["workflows"]
    items = data if isinstance(data, list) else [data]
    if not items or not all(isinstance(w, dict) and isinstance(w.get("tasks"), list) for w in items):
        raise CliError(f"{path}: expected a workflow {{name?, tasks: [...]}}, a list of them, "
                       "or {workflows: [...]}", USAGE)
    return items


# -- commands ----------------------------------------------------------------------------------------

def submit(api: Api, args) -> int:
    specs = read_workflows(args.file)
    if len(specs) == 1:
        answer = api.post("/v1/workflows", specs[0])
        ids = [answer["workflow_id"]]
    else:
        answer = api.post("/v1/workflows/batch", {"workflows": specs})
        ids = answer["workflow_ids"]
    if not args.wait:
        emit(args, answer, lambda a: "\n".join(f"submitted {i}" for i in ids))
        return OK
    say("submitted " + ", ".join(ids))
    return _finish(api, args, ids)


def wait(api: Api, args) -> int:
    return _finish(api, args, [args.id])


def _finish(api: Api, args, ids: list[str]) -> int:
    live = args.output != "json" and sys.stderr.isatty()
    views = cli_watch.wait_all(api, ids, live=live, timeout=args.timeout)
    document = views[0] if len(views) == 1 else {"workflows": views}
    if args.output == "json":
        emit(args, document)
    elif not live:  # the live display already showed the final state
        emit(args, views, lambda vs: _group(cli_watch.view_table(v) for v in vs))
    unfinished = [v["workflow_id"] for v in views if v["status"] not in cli_watch.TERMINAL]
    if unfinished:
        say(f"still not finished after {args.timeout:g}s: {', '.join(unfinished)}")
    return OK if all(v["status"] == "succeeded" for v in views) else FAILED


def _group(renderables):
    from rich.console import Group

    return Group(*renderables)


def workflows(api: Api, args) -> int:
    body = api.get("/v1/workflows", status=args.status, limit=args.limit, after=args.after)
    emit(args, body, _workflows_table)
    return OK


def _workflows_table(body: dict):
    from rich.table import Table

    table = Table("workflow", "name", "status", "tasks", "created", "parent", box=None)
    for wf in body["workflows"]:
        parent = wf.get("parent") or {}
        table.add_row(wf["workflow_id"], wf.get("name") or "", styled(wf["status"]), str(wf.get("tasks", "")),
                      _when(wf.get("created_at")), parent.get("workflow_id", ""))
    if body.get("next"):
        table.caption = f"more: --after {body['next']}"
    return table


def _when(stamp) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) if stamp else ""


def show(api: Api, args) -> int:
    emit(args, api.get(f"/v1/workflows/{args.id}"), cli_watch.view_table)
    return OK


def cancel(api: Api, args) -> int:
    emit(args, api.post(f"/v1/workflows/{args.id}/cancel"), cli_watch.view_table)
    return OK


def dag(api: Api, args) -> int:
    view = api.get(f"/v1/workflows/{args.id}")
    if args.output == "json":
        emit(args, view)
        return OK
    drawing = cli_dag.RENDERERS[args.format](view)
    if args.out:
        Path(args.out).write_text(drawing if drawing.endswith("\n") else drawing + "\n")
        say(f"wrote {args.out}")
    else:
        sys.stdout.write(drawing if drawing.endswith("\n") else drawing + "\n")
    return OK


def agents(api: Api, args) -> int:
    filters = {"capability": args.capability, "status": args.status}
    if args.limit is None and args.after is None:
        body = all_agents(api, **filters)
    else:
        body = api.get("/v1/agents", **filters, limit=args.limit, after=args.after)
    emit(args, body, agents_tables)
    if body.get("next") and getattr(args, "output", "text") != "json":
        say(f"more: --after {body['next']}")
    return OK


def all_agents(api: Api, **filters) -> dict:
    """GET /v1/agents page after page: every agent (by name) and the breakers of their capabilities, in the
    API's shape, with `next` null."""
    body = {"agents": [], "capabilities": {}, "next": None}
    after = None
    while True:
        page = api.get("/v1/agents", **filters, limit=1000, after=after)
        body["agents"] += page["agents"]
        body["capabilities"].update(page.get("capabilities", {}))
        after = page.get("next")
        if not after:
            return body


def agents_tables(body: dict):
    from rich.table import Table

    table = Table("agent", "status", "capabilities", "in flight", "heartbeat", "breaker", box=None)
    for agent in body["agents"]:
        beat = agent.get("last_heartbeat")
        table.add_row(agent["name"], styled(agent["status"]) if agent["status"] != "alive" else "[green]alive[/]",
                      ", ".join(agent["capabilities"]), str(agent.get("in_flight", "")),
                      f"{time.time() - beat:.0f}s ago" if beat else "", _breaker(agent.get("breaker")))
    caps = Table("capability", "breaker", box=None)
    for name, info in sorted(body.get("capabilities", {}).items()):
        caps.add_row(name, _breaker(info.get("breaker")))
    return _group([table, caps])


def _breaker(breaker) -> str:
    state = breaker.get("state") if isinstance(breaker, dict) else breaker
    return {"closed": "[green]closed[/]", "open": "[red]open[/]"}.get(state, str(state or ""))


def dlq(api: Api, args) -> int:
    if args.action == "list":
        body = api.get("/v1/dlq", capability=args.capability, reason=args.reason, workflow_id=args.workflow_id,
                       status=args.status, limit=args.limit, after=args.after)
        emit(args, body, _dead_letters_table)
    elif args.action == "show":
        emit(args, api.get(f"/v1/dlq/{args.id}"), lambda r: json.dumps(r, indent=2, default=str))
    elif args.action == "replay" and args.id:
        emit(args, api.post(f"/v1/dlq/{args.id}/replay"), lambda r: f"replayed {r['id']}: {r.get('status')}")
    elif args.action == "replay":
        body = {"capability": args.capability, "reason": args.reason, "workflow_id": args.workflow_id,
                "limit": args.limit, "rate_per_s": args.rate}
        emit(args, api.post("/v1/dlq/replay", {k: v for k, v in body.items() if v is not None}),
             lambda r: f"replaying {r['matched']} dead letters at {r['rate_per_s']}/s")
    else:
        api.call("DELETE", f"/v1/dlq/{args.id}")
        emit(args, {"deleted": args.id}, lambda r: f"deleted {r['deleted']}")
    return OK


def _dead_letters_table(body: dict):
    from rich.table import Table

    table = Table("id", "workflow", "task", "capability", "reason", "status", "when", box=None)
    for r in body["dead_letters"]:
        table.add_row(str(r.get("id")), str(r.get("workflow_id", "")), str(r.get("task_id", "")),
                      str(r.get("capability", "")), str(r.get("reason", "")), str(r.get("status", "")),
                      _when(r.get("received_at")))
    if body.get("next"):
        table.caption = f"more: --after {body['next']}"
    return table


def control(api: Api, args) -> int:
    if args.action == "show":
        state = api.get("/v1/control")
    elif args.action == "stop-all":
        state = api.post("/v1/control/stop-all")
    else:
        state = api.post(f"/v1/control/{args.action}", {"capability": args.capability} if args.capability else None)
    emit(args, state, control_text)
    return OK


def control_text(state: dict) -> str:
    said = "STOP-ALL is on" if state.get("stopped") else ("everything paused" if state.get("paused") else "dispatching")
    if state.get("paused_capabilities"):
        said += f"; paused: {', '.join(state['paused_capabilities'])}"
    return said


def demo(api: Api, args) -> int:
    """The planner's delegation demo, then the writer's streaming one (or --only one of them). With
    `--output json`: {"workflow", "children"} of the planner and {"writer": ...} of the writer."""
    document: dict = {}
    codes = []
    if args.only != "writer":
        code, planner_views = _planner_demo(api, args)
        codes.append(code)
        document |= planner_views
    if args.only != "planner":
        code, document["writer"] = _writer_demo(api, args)
        codes.append(code)
    if args.output == "json":
        emit(args, document)
    return max(codes)


def _planner_demo(api: Api, args) -> tuple[int, dict]:
    """The delegation demo: the parent workflow and the child workflows its planner starts, shown live
    (on a terminal) as their tasks move; then each task's result."""
    spec = {"name": "demo: planner delegates", "tasks": [
        {"id": "plan", "capability": "plan", "priority": "HIGH",
         "payload": {"goal": args.goal, "steps": ["gather facts", "find counterpoints", "check sources"]}},
        {"id": "review", "capability": "echo", "depends_on": ["plan"], "payload": {"role": "reviewer"}},
    ]}
    wf_id = api.post("/v1/workflows", spec)["workflow_id"]
    say(f"submitted workflow {wf_id}")
    views = cli_watch.follow_family(api, wf_id, live=args.output != "json" and sys.stderr.isatty(),
                                    timeout=args.timeout)
    parent = views[0]
    if args.output != "json":
        for task in parent["tasks"]:
            print(f"\n{task['id']} result:\n{json.dumps(task['result'] or task['error'], indent=2)}")
        for child in views[1:]:
            name = f" ({child['name']})" if child.get("name") else ""
            print(f"\nchild workflow {child['workflow_id']}{name} of task {child['parent']['task_id']}: "
                  f"{child['status']}")
        print(f"\nworkflow {parent['status']}")
    if parent["status"] not in cli_watch.TERMINAL:
        say(f"the workflow did not finish in {args.timeout:g}s; is `make run` up?")
    return (OK if parent["status"] == "succeeded" else FAILED), {"workflow": parent, "children": views[1:]}


def _writer_demo(api: Api, args) -> tuple[int, dict]:
    """The streaming demo, all through the workflow's event stream (GET /v1/workflows/{id}/events): the
    draft as the writer streams it, its progress, its question, answered here (by you with --ask on a
    terminal, else approved for you), and the draft.published event it then announces."""
    spec = {"name": "demo: writer asks before publishing",
            "tasks": [{"id": "write", "capability": "write", "payload": {"topic": args.topic}}]}
    wf_id = api.post("/v1/workflows", spec)["workflow_id"]
    text = args.output != "json"
    say(f"\nsubmitted workflow {wf_id}: a writer streams a draft, asks before publishing it, then announces it")
    out = cli_watch.Printer(sys.stdout if text else None)
    seen: dict = {"draft": "", "answers": [], "published": [], "statuses": {}}
    for _, event, data in api.events(f"/v1/workflows/{wf_id}/events", until=time.monotonic() + args.timeout):
        if event == "chunk" and data.get("workflow_id") == wf_id:
            if not seen["draft"]:
                out.say(f"  {data.get('task_id')} streams its draft:")
            seen["draft"] += data["text"]
            out.write(data["text"])
        elif event == "progress" and _said(data) != seen.get("progress") and not out.mid_line:
            # A new phase, not every percent; and not in the middle of the draft, which shows it already.
            seen["progress"] = _said(data)
            out.say(f"  [{(data.get('progress') or data).get('percent', '?')}%] {_said(data)}")
        elif event == "task" and seen["statuses"].get(data.get("task_id")) != data.get("status"):
            seen["statuses"][data.get("task_id")] = data.get("status")
            out.say(f"  {data.get('task_id')} {data.get('status')}")
        elif event == "input":
            answer = _answer(data, args, out)
            try:
                api.post(f"/v1/workflows/{wf_id}/tasks/{data['task_id']}/input", {"answer": answer})
                seen["answers"].append(answer)
            except CliError as exc:  # someone else answered first (409): theirs stands
                out.say(f"  not answered: {exc}")
        elif event == "published":
            seen["published"].append(data)
            out.say(f"  published {data.get('topic')} (event {data.get('event_id')}): "
                    f"{(data.get('data') or {}).get('words')} words on {(data.get('data') or {}).get('topic')!r}")
        elif event == "end":
            break
    view = api.get(f"/v1/workflows/{wf_id}")
    task = view["tasks"][0]
    if text:
        print(f"\n{task['id']} result:\n{json.dumps(task['result'] or task['error'], indent=2)}")
        print(f"\nworkflow {view['status']}")
    if seen["published"]:  # its subscribers are agents: what they do with it shows in their logs, not the API
        say("subscribers hear it: the announcer agent logs \"heard draft.published\" (in `make run`'s output)")
    if view["status"] not in cli_watch.TERMINAL:
        say(f"the writer's workflow did not finish in {args.timeout:g}s; is `make run` up?")
    return (OK if view["status"] == "succeeded" else FAILED), {"workflow": view, **seen}


def _said(progress: dict) -> str | None:
    return (progress.get("progress") or progress).get("message")


def _answer(question: dict, args, out) -> dict:
    """The answer to the writer's question: typed in with --ask on a terminal, else approve=true."""
    out.say(f"  question from {question.get('task_id')}: {question.get('question')}")
    if args.ask and sys.stdin.isatty() and args.output != "json":
        reply = input("  approve? [Y/n] ").strip().lower()
        note = input("  a note (optional): ").strip()
        answer = {"approve": reply in ("", "y", "yes")}
        return answer | ({"note": note} if note else {})
    out.say("  answering it: approve=true (run `switchboard demo --ask` on a terminal to answer it yourself)")
    return {"approve": True, "note": "approved by switchboard demo"}


COMMANDS = {"demo": demo, "submit": submit, "workflows": workflows, "show": show, "wait": wait, "cancel": cancel, "dag": dag,
            "agents": agents, "dlq": dlq, "control": control}
