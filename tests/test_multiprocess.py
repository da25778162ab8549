"""The production shape: every service and the example agents in processes of their own, started with
`switchboard serve`, talking only through RabbitMQ, Redis and the store; SIGTERM drains each cleanly."""

from __future__ import annotations

import asyncio
import signal

import httpx
import orjson

from tests.harness import wait_processes_ready


async def test_each_service_in_its_own_process(processes, settings):
    procs, ports = processes
    async with httpx.AsyncClient(timeout=30) as client:
        await wait_processes_ready(client, settings, ports)
        api = f"http://127.0.0.1:{settings.api_port}"
        spec = {"tasks": [
            {"id": "a", "capability": "echo", "payload": {"x": 1}},
            {"id": "b", "capability": "echo", "depends_on": ["a"]},
            {"id": "c", "capability": "sleep", "payload": {"seconds": 0.05}, "depends_on": ["a"]},
            {"id": "plan", "capability": "plan", "payload": {"goal": "g"}, "depends_on": ["b", "c"]},
        ]}
        wf_id = (await client.post(f"{api}/v1/workflows", json=spec)).json()["workflow_id"]
        view = (await client.get(f"{api}/v1/workflows/{wf_id}", params={"wait": 60})).json()
        assert view["status"] == "succeeded", view
        metrics = (await client.get(f"http://127.0.0.1:{ports['aggregator']}/metrics")).text
        assert 'switchboard_tasks_finished_total{capability="plan",outcome="succeeded"} 1.0' in metrics

    for proc in procs.values():
        proc.send_signal(signal.SIGTERM)
    for name, proc in procs.items():
        output, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{output.decode()[-2000:]}"
        lines = [orjson.loads(line) for line in output.splitlines() if line.strip()]
        assert lines and all("service" in line and "level" in line for line in lines), name
        assert lines[-1]["msg"] == "stopped"
