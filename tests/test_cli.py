"""The `switchboard` CLI's REST commands, run as real subprocesses against a real platform (services in
this process, real broker, Redis and store): exit codes, JSON output, DAG drawings, and `top` in a
pseudo-terminal."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import termios
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import example_agents
from tests.harness import Platform, free_port, wait_for

SWITCHBOARD = str(Path(sys.executable).parent / "switchboard")
FAN = {"name": "fan", "tasks": [
    {"id": "a", "capability": "echo"},
    {"id": "b", "capability": "echo", "depends_on": ["a"]},
    {"id": "c", "capability": "echo", "depends_on": ["a"]},
    {"id": "d", "capability": "echo", "depends_on": ["b", "c"]},
]}
FAILING = {"name": "doomed", "tasks": [{"id": "x", "capability": "fail",
                                        "payload": {"retryable": False, "message": "no luck"}}]}


@pytest.fixture
async def examples(platform):
    for agent in example_agents.build(platform.settings):
        await platform.add_agent(agent)
    return platform


def env_for(platform: Platform, token: str | None = None) -> dict:
    env = {**os.environ, "SWITCHBOARD_API_URL": str(platform.client.base_url)}
    env.pop("SWITCHBOARD_API_TOKEN", None)
    if token:
        env["SWITCHBOARD_TOKEN"] = token
    else:
        env.pop("SWITCHBOARD_TOKEN", None)
    return env


async def cli(env: dict, *args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        SWITCHBOARD, *args, env=env, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    return proc.returncode, out.decode(), err.decode()


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


async def test_submit_wait_exit_codes_and_json_output_match_the_api(examples, tmp_path):
    env = env_for(examples)
    code, out, err = await cli(env, "submit", write(tmp_path, "fan.json", json.dumps(FAN)), "--wait", "--output", "json")
    assert code == 0, err
    view = json.loads(out)  # nothing but the one document on stdout
    assert view["status"] == "succeeded" and {t["id"] for t in view["tasks"]} == {"a", "b", "c", "d"}
    wf_id = view["workflow_id"]
    code, out, _ = await cli(env, "show", wf_id, "--output", "json")
    assert code == 0 and json.loads(out) == (await examples.client.get(f"/v1/workflows/{wf_id}")).json()

    yaml_file = write(tmp_path, "doomed.yaml", "name: doomed\ntasks:\n  - id: x\n    capability: fail\n"
                                               "    payload: {retryable: false, message: no luck}\n")
    code, out, err = await cli(env, "submit", yaml_file, "--wait")
    assert code == 1, (out, err)
    assert "failed" in out and "no luck" in out

    code, out, _ = await cli(env, "submit", write(tmp_path, "many.json", json.dumps([FAN, FAN])), "--output", "json")
    assert code == 0 and len(json.loads(out)["workflow_ids"]) == 2
    code, out, _ = await cli(env, "workflows", "--output", "json", "--status", "failed")
    listed = json.loads(out)["workflows"]
    assert code == 0 and [w["name"] for w in listed] == ["doomed"]
    code, out, _ = await cli(env, "workflows")
    assert code == 0 and wf_id in out and "doomed" in out

    # bad input: 2; no API: 3
    assert (await cli(env, "submit", write(tmp_path, "bad.json", "{not json")))[0] == 2
    assert (await cli(env, "submit", str(tmp_path / "missing.yaml")))[0] == 2
    assert (await cli(env, "submit", write(tmp_path, "cycle.json", json.dumps(
        {"tasks": [{"id": "a", "capability": "echo", "depends_on": ["a"]}]}))))[0] == 2
    code, out, err = await cli({**env, "SWITCHBOARD_API_URL": f"http://127.0.0.1:{free_port()}"}, "workflows")
    assert code == 3 and out == "" and "cannot reach" in err
    code, _, err = await cli(env, "show", "nope")
    assert code == 1 and "404" in err


async def test_wait_cancel_agents_control_and_dlq(examples, tmp_path):
    env = env_for(examples)
    slow = await examples.submit({"tasks": [{"id": "z", "capability": "sleep", "payload": {"seconds": 30}}]})
    code, out, _ = await cli(env, "wait", slow, "--timeout", "0.5", "--output", "json")
    assert code == 1 and json.loads(out)["status"] in ("pending", "running")
    code, out, _ = await cli(env, "cancel", slow, "--output", "json")
    assert code == 0 and json.loads(out)["status"] == "cancelled"
    code, out, _ = await cli(env, "wait", slow)
    assert code == 1 and "cancelled" in out

    code, out, _ = await cli(env, "agents", "--output", "json")
    assert code == 0
    assert {a["name"] for a in json.loads(out)["agents"]} >= {"echo-agent", "sleep-agent", "fail-agent"}
    code, out, _ = await cli(env, "agents")
    assert code == 0 and "echo-agent" in out and "alive" in out

    code, out, _ = await cli(env, "control", "pause", "--capability", "echo", "--output", "json")
    assert code == 0 and json.loads(out)["paused_capabilities"] == ["echo"]
    code, out, _ = await cli(env, "control", "--output", "json", "resume", "--capability", "echo")
    assert code == 0 and json.loads(out)["paused_capabilities"] == []
    assert (await cli(env, "control", "stop-all"))[1].strip() == "STOP-ALL is on"
    code, out, _ = await cli(env, "control", "resume")
    assert code == 0 and out.strip() == "dispatching"

    failed = await examples.submit(FAILING)
    await examples.wait(failed)

    async def dead_letter():
        body = (await examples.client.get("/v1/dlq", params={"workflow_id": failed})).json()
        return body["dead_letters"]

    [letter] = await wait_for(dead_letter, what="the failed task's dead letter")
    code, out, _ = await cli(env, "dlq", "list", "--workflow-id", failed, "--output", "json")
    assert code == 0 and [r["id"] for r in json.loads(out)["dead_letters"]] == [letter["id"]]
    code, out, _ = await cli(env, "dlq", "show", letter["id"], "--output", "json")
    assert code == 0 and json.loads(out) == (await examples.client.get(f"/v1/dlq/{letter['id']}")).json()
    code, out, _ = await cli(env, "dlq", "replay", letter["id"], "--output", "json")
    assert code == 0 and json.loads(out)["status"] == "replayed"
    code, out, _ = await cli(env, "dlq", "delete", letter["id"])
    assert code == 0 and (await examples.client.get(f"/v1/dlq/{letter['id']}")).status_code == 404
    assert (await cli(env, "dlq", "delete", letter["id"]))[0] == 1


async def test_dag_as_ascii_mermaid_and_svg(examples, tmp_path):
    env = env_for(examples)
    wf_id = await examples.submit(FAN)
    await examples.wait(wf_id)
    code, out, _ = await cli(env, "dag", wf_id)
    assert code == 0
    assert out == (f"workflow {wf_id} (fan): succeeded\n"
                   "layer 0\n"
                   "  [+] a     echo  succeeded\n"
                   "layer 1\n"
                   "  [+] b     echo  succeeded  <- a\n"
                   "  [+] c     echo  succeeded  <- a\n"
                   "layer 2\n"
                   "  [+] d     echo  succeeded  <- b, c\n"
                   "legend: [ ] pending  [.] queued  [>] running  [?] waiting_input  [+] succeeded  [x] failed  [-] cancelled\n")
    code, out, _ = await cli(env, "dag", wf_id, "--format", "mermaid")
    assert code == 0 and out.startswith("flowchart TD\n")
    for edge in ("t_a --> t_b", "t_a --> t_c", "t_b --> t_d", "t_c --> t_d"):
        assert edge in out
    assert "classDef succeeded" in out and 't_d["d<br/>echo: succeeded"]:::succeeded' in out
    svg_file = tmp_path / "fan.svg"
    code, _, _ = await cli(env, "dag", wf_id, "--format", "svg", "--out", str(svg_file))
    assert code == 0
    root = ET.parse(svg_file).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    boxes = [r for r in root.iter(f"{ns}rect") if r.get("class") == "task"]
    assert sorted(b.get("data-task") for b in boxes) == ["a", "b", "c", "d"]
    assert {b.get("data-status") for b in boxes} == {"succeeded"}
    assert len([line for line in root.iter(f"{ns}line") if line.get("class") == "edge"]) == 4
    y = {b.get("data-task"): float(b.get("y")) for b in boxes}
    assert y["a"] < y["b"] == y["c"] < y["d"]  # layered top-down


async def test_the_cli_sends_its_token_when_auth_is_on(settings, tmp_path):
    platform = Platform(settings.model_copy(update={"api_token": "cli-s3cret", "api_rate_per_s": 0}))
    try:
        await platform.start(services=("api",))
        code, _, err = await cli(env_for(platform), "workflows")
        assert code == 1 and "401" in err
        code, out, _ = await cli(env_for(platform, "cli-s3cret"), "workflows", "--output", "json")
        assert code == 0 and json.loads(out) == {"workflows": [], "next": None}
        code, _, err = await cli(env_for(platform), "workflows", "--token", "cli-s3cret")
        assert code == 0, err
    finally:
        await platform.close()


async def test_top_shows_agents_and_a_running_workflow_and_quits_on_q(examples):
    pexpect = pytest.importorskip("pexpect")
    running = await examples.submit({"name": "napping", "tasks": [
        {"id": "nap", "capability": "sleep", "payload": {"seconds": 20}}]})

    async def is_running() -> bool:
        return (await examples.client.get(f"/v1/workflows/{running}")).json()["status"] == "running"

    await wait_for(is_running, what="the sleep workflow running")
    env = {**env_for(examples), "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}

    def drive() -> tuple[int | None, bytes, list]:
        child = pexpect.spawn(SWITCHBOARD, ["top", "--interval", "0.5"], env=env, dimensions=(40, 120),
                              timeout=20)
        try:
            before = termios.tcgetattr(child.child_fd)
            for name in ("echo-agent", "sleep-agent", "fail-agent", running):
                child.expect_exact(name)
            child.send("q")
            child.expect(pexpect.EOF)
            after = termios.tcgetattr(child.child_fd)  # the pty's modes, as top left them
            return before, after, child
        finally:
            child.close(force=True)

    before, after, child = await asyncio.to_thread(drive)
    assert child.exitstatus == 0, child.before
    lflag = 3
    assert after[lflag] & (termios.ECHO | termios.ICANON) == before[lflag] & (termios.ECHO | termios.ICANON) != 0
    await (await examples.client.post(f"/v1/workflows/{running}/cancel")).aread()


async def test_submit_wait_shows_live_progress_on_a_terminal(examples, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    spec = {"name": "progress", "tasks": [{"id": "nap", "capability": "sleep", "payload": {"seconds": 1.5}},
                                          {"id": "after", "capability": "echo", "depends_on": ["nap"]}]}
    path = write(tmp_path, "progress.yaml", json.dumps(spec))
    env = {**env_for(examples), "TERM": "xterm-256color"}

    def drive():
        child = pexpect.spawn(SWITCHBOARD, ["submit", path, "--wait"], env=env, dimensions=(40, 120), timeout=20)
        try:
            child.expect(r"nap\s+sleep\s+\S*running")  # the table while it runs, before the end
            child.expect_exact("2/2 tasks done")
            child.expect(pexpect.EOF)
            return child
        finally:
            child.close(force=True)

    child = await asyncio.to_thread(drive)
    assert child.exitstatus == 0


async def test_demo_follows_the_planner_and_its_child_workflows(examples):
    code, out, err = await cli(env_for(examples), "demo", "--output", "json", "--timeout", "60")
    assert code == 0, err
    done = json.loads(out)
    assert done["workflow"]["status"] == "succeeded" and done["children"]
    assert all(c["parent"]["workflow_id"] == done["workflow"]["workflow_id"] for c in done["children"])
    assert "plan" in err and "succeeded" in err  # the progress lines, on stderr
