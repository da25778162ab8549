"""A short load run of every scenario (load/run.py, locust) against a platform of real processes, on
the real broker and Redis: no request fails and every workflow the load created succeeds. Nothing is
asserted about speed; the driver prints the numbers (see them with -s)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path

import httpx
import pytest

from tests.harness import service_processes, wait_processes_ready

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("mix", "poll", "burst", "soak")

# find_spec, not an import: importing locust would patch this process with gevent.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("locust") is None,
                                reason="locust is not installed (pip install -e '.[test]'); the load test needs it")


async def run_driver(*args: str, timeout: float) -> tuple[int, str]:
    driver = await asyncio.create_subprocess_exec(sys.executable, str(ROOT / "load" / "run.py"), *args, cwd=ROOT,
                                                  stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(driver.communicate(), timeout)
    finally:
        if driver.returncode is None:  # SIGTERM first: the driver then stops its locust process
            driver.terminate()
            try:
                await asyncio.wait_for(driver.wait(), 20)
            except asyncio.TimeoutError:
                driver.kill()
                await driver.wait()
    return driver.returncode, out.decode(errors="replace")


@pytest.mark.timeout(150)
async def test_short_load_fails_no_request_and_loses_no_workflow(settings, tmp_path):
    # The per-token rate limit is not what this measures: a burst would only be answered 429.
    env = {"SWITCHBOARD_API_RATE_PER_S": "0", "SWITCHBOARD_LOG_LEVEL": "WARNING"}
    async with service_processes(settings, env=env) as (procs, ports):
        async with httpx.AsyncClient(timeout=10) as client:
            await wait_processes_ready(client, settings, ports, procs)
        metrics = ",".join(f"{name}=http://127.0.0.1:{port}" for name, port in ports.items())
        code, out = await run_driver(
            "--url", f"http://127.0.0.1:{settings.api_port}", "--metrics", metrics, "--capability", "echo",
            "--scenario", ",".join(SCENARIOS), "--duration", "3s", "--users", "4", "--settle", "30",
            "--sample-every", "1s", "--out", str(tmp_path / "load"), timeout=120)
        exited = {name: p.returncode for name, p in procs.items() if p.returncode is not None}
    print(f"namespace {settings.namespace}\n{out}")
    assert not exited, f"processes exited during the load: {exited}"
    for scenario in SCENARIOS:
        folder = tmp_path / "load" / scenario
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["requests"] > 0, f"{scenario}: no request made\n{out}"
        assert summary["failures"] == 0 and summary["exceptions"] == 0, \
            f"{scenario}: {summary['failure_messages']}\n{out}"
        assert summary["workflows"] > 0, f"{scenario}: no workflow accepted\n{out}"
        assert summary["lost"] == 0, f"{scenario}: workflows lost: {summary['lost_ids']}\n{out}"
        assert summary["succeeded"] == summary["workflows"], f"{scenario}: {summary['not_succeeded']}\n{out}"
        assert (folder / "report.html").stat().st_size > 0 and (folder / "locust_stats.csv").exists()
    soak = json.loads((tmp_path / "load" / "soak" / "summary.json").read_text())
    assert set(soak["memory"]) == set(ports) and all(soak["memory"].values()), soak["memory"]
    assert "growth after warm-up" in out
    assert code == 0, out
