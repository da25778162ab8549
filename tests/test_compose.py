"""deploy/compose, checked without a Docker engine: the files against the compose-spec schema, the stack
against the code (commands, settings, ports, probes, dependencies, volumes, the telemetry wiring), and a
smoke test that starts each Switchboard service of the SQLite profile as a local process with the command
and environment compose gives its container, sees the platform become ready and runs a workflow."""

from __future__ import annotations

import asyncio
import json
import os
import posixpath
import shlex
import signal
import subprocess
import sys
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import yaml

from tests import deploy_facts
from tests.compose_file import load, variables
from tests.harness import cleanup, example_queues, free_port, wait_for, wait_processes_ready
from tests.otlp import OtlpReceiver
from tests.test_image import instructions
from switchboard.topology import Topology

ROOT = deploy_facts.ROOT
COMPOSE = ROOT / "deploy" / "compose"
FDB_FILES = [COMPOSE / "compose.yaml"]
SQLITE_FILES = [COMPOSE / "compose.yaml", COMPOSE / "compose.sqlite.yaml"]
INFRASTRUCTURE = {"rabbitmq", "redis", "fdb", "fdb-init", "prometheus", "redis-exporter", "grafana", "jaeger",
                  "loki", "promtail"}


@cache
def project(sqlite: bool = False) -> dict:
    return load(SQLITE_FILES if sqlite else FDB_FILES, env={})


def switchboard_services(p: dict) -> dict[str, dict]:
    """The services that run the project's image, by name."""
    image = project()["x-switchboard"]["image"]
    return {name: s for name, s in p["services"].items() if s.get("image") == image}


def process_of(service: dict) -> str:
    assert service["command"][0] == "serve", service["command"]
    return service["command"][1]


def image_env() -> dict[str, str]:
    env = {}
    for line in instructions("ENV"):
        env.update(item.split("=", 1) for item in shlex.split(line))
    return env


def test_the_files_follow_the_compose_spec():
    done = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                           *map(str, SQLITE_FILES)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("sqlite", [False, True], ids=["foundationdb", "sqlite"])
def test_the_stack_runs_every_process_once_with_its_command(sqlite):
    p = project(sqlite)
    services = switchboard_services(p)
    assert sorted(process_of(s) for s in services.values()) == sorted(deploy_facts.PROCESSES)
    for name, service in services.items():
        assert name == process_of(service).replace("_", "-")
    assert json.loads(instructions("ENTRYPOINT")[0])[0] in deploy_facts.entry_points()
    expected = INFRASTRUCTURE - ({"fdb", "fdb-init"} if sqlite else set())
    assert set(p["services"]) - set(services) == expected
    assert p["disabled"] == ({"fdb", "fdb-init"} if sqlite else set())


@pytest.mark.parametrize("sqlite", [False, True], ids=["foundationdb", "sqlite"])
def test_every_setting_is_set_or_deliberately_defaulted(sqlite):
    assert set(deploy_facts.MUST_SET) | set(deploy_facts.DEFAULTED) == set(deploy_facts.Settings.model_fields)
    for name, service in switchboard_services(project(sqlite)).items():
        env = {**image_env(), **service["environment"]}
        unknown = [v for v in service["environment"] if not deploy_facts.known_env(v)]
        assert not unknown, f"{name} sets variables nothing reads: {unknown}"
        for setting in deploy_facts.MUST_SET:
            assert deploy_facts.env_names(setting) & set(env), f"{name} does not set {setting}"
        assert env["SWITCHBOARD_HEALTH_PORT"] == str(deploy_facts.HEALTH_PORT)


def test_every_service_has_a_healthcheck_and_waits_for_what_it_uses():
    p = project()
    one_shots = {n for n, s in p["services"].items() if s.get("restart") == "no"}
    assert one_shots == {"fdb-init"}
    for name, service in p["services"].items():
        if name not in one_shots:
            assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        for dependency, cfg in service["depends_on"].items():
            wanted = "service_completed_successfully" if dependency in one_shots else "service_healthy"
            assert cfg["condition"] == wanted, (name, dependency)
    needs = {"rabbitmq": "rabbitmq", "redis": "redis", "store": "fdb-init"}
    for name, service in switchboard_services(p).items():
        assert service["healthcheck"]["test"] == ["CMD", *json.loads(instructions("HEALTHCHECK")[0].split("CMD", 1)[1])]
        for part in deploy_facts.uses(process_of(service)):
            assert needs[part] in service["depends_on"], f"{name} does not wait for {needs[part]}"


def test_only_the_api_and_grafana_are_published_on_loopback():
    published = {n: s["ports"] for n, s in project(True)["services"].items() if s.get("ports")}
    assert set(published) == {"api", "grafana"}
    assert published["api"] == [f"127.0.0.1:8000:{deploy_facts.API_PORT}"]
    assert published["grafana"] == ["127.0.0.1:3000:3000"]


def _mounts(service: dict) -> dict[str, str]:
    return {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}


def test_the_data_stores_keep_their_data_on_named_volumes():
    p = project()
    data = {"rabbitmq": "/var/lib/rabbitmq", "redis": "/data", "fdb": "/var/fdb/data", "prometheus": "/prometheus",
            "grafana": "/var/lib/grafana", "loki": "/loki"}
    for name, path in data.items():
        assert _mounts(p["services"][name]).get(path) in p["volumes"], f"{name}: {path} is not on a named volume"
    for name, service in p["services"].items():
        for source in _mounts(service).values():
            if source.startswith("."):
                assert (COMPOSE / source).exists(), f"{name} mounts {source}, which is not in the repo"


def test_the_foundationdb_cluster_file_reaches_every_service():
    p = project()
    fdb = p["services"]["fdb"]
    cluster_file = fdb["environment"]["FDB_CLUSTER_FILE"]
    volume = _mounts(fdb)[posixpath.dirname(cluster_file)]
    assert p["services"]["fdb-init"]["environment"]["FDB_CLUSTER_FILE"] == cluster_file
    for name, service in switchboard_services(p).items():
        path = urlsplit(service["environment"]["STORE_URL"]).path
        assert posixpath.basename(path) == posixpath.basename(cluster_file)
        assert _mounts(service)[posixpath.dirname(path)] == volume, name


def test_in_the_sqlite_profile_every_stateful_service_shares_one_file():
    p = project(sqlite=True)
    files = set()
    for name, service in switchboard_services(p).items():
        if "store" in deploy_facts.uses(process_of(service)):
            url = service["environment"]["STORE_URL"]
            assert url.startswith("sqlite:////"), name
            path = url.removeprefix("sqlite:///")
            files.add((_mounts(service)[posixpath.dirname(path)], path))
    assert len(files) == 1 and next(iter(files))[0] in p["volumes"]


def test_env_example_names_every_variable_the_files_use():
    example = {line.split("=", 1)[0] for line in (COMPOSE / ".env.example").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    used = set().union(*(variables(f.read_text()) for f in SQLITE_FILES))
    assert example == used


def _hostport(url: str) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"//{url}")
    return parts.hostname, parts.port


def test_the_telemetry_stack_is_wired_to_the_services():
    p = project()
    services = p["services"]
    scrape = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())["scrape_configs"]
    jobs = {job["job_name"]: job for job in scrape}
    by_process = {process_of(s): n for n, s in switchboard_services(p).items()}
    targets = {group["labels"]["service"]: group["targets"] for group in jobs["switchboard"]["static_configs"]}
    assert set(targets) == set(deploy_facts.PROCESSES)
    for process, [target] in targets.items():
        assert _hostport(target) == (by_process[process], deploy_facts.serving_port(process))
    assert [_hostport(t) for t in jobs["rabbitmq"]["static_configs"][0]["targets"]] == [("rabbitmq", 15692)]
    assert "rabbitmq_prometheus" in (COMPOSE / "rabbitmq/enabled_plugins").read_text()
    assert [_hostport(t)[0] for t in jobs["redis"]["static_configs"][0]["targets"]] == ["redis-exporter"]
    prometheus = services["prometheus"]
    config = next(a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file="))
    assert (ROOT / "deploy/prometheus" / posixpath.relpath(config, "/etc/prometheus")).exists()
    assert _mounts(prometheus)["/etc/prometheus"] == "../prometheus"

    sources = yaml.safe_load((ROOT / "grafana/provisioning/datasources/datasources.yaml").read_text())
    for source in sources["datasources"]:
        assert _hostport(source["url"])[0] in services, source["name"]
    promtail = yaml.safe_load((ROOT / "deploy/promtail/promtail.yml").read_text())
    loki = yaml.safe_load((ROOT / "deploy/loki/loki.yml").read_text())
    assert _hostport(promtail["clients"][0]["url"]) == ("loki", loki["server"]["http_listen_port"])
    for service in switchboard_services(p).values():
        assert _hostport(service["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"]) == ("jaeger", 4318)


# --- the smoke test --------------------------------------------------------------------------------------

def container_as_process(service: dict, network: dict[str, str], data_dir: Path, settings) -> dict[str, str]:
    """The environment a container would have (the image's ENV, then compose's), made to run here: each
    compose host:port becomes the local one that serves it, /data (the volume) a test folder, and the
    container's own ports free local ones, since here every container shares one network namespace."""
    env = {**image_env(), **service["environment"]}
    for name, value in env.items():
        if "://" in value:
            parts = urlsplit(value)
            hostport = f"{parts.hostname}:{parts.port}"
            if hostport in network:
                local = urlsplit(network[hostport])
                netloc = parts.netloc.replace(hostport, local.netloc.rsplit("@", 1)[-1])
                path = local.path if parts.scheme == "redis" else parts.path  # the test's Redis database
                value = urlunsplit((parts.scheme, netloc, path, parts.query, parts.fragment))
            env[name] = value.replace("sqlite:////data/", f"sqlite:///{data_dir}/")
    env["SWITCHBOARD_HEALTH_PORT"] = str(free_port())
    env["SWITCHBOARD_API_PORT"] = str(settings.api_port)
    # Not a compose setting: keeps this run's queues and keys apart on the shared broker and Redis.
    env["SWITCHBOARD_NAMESPACE"] = settings.namespace
    env["SWITCHBOARD_HEARTBEAT_INTERVAL_S"] = "0.5"
    return env


async def test_the_sqlite_stack_starts_from_its_compose_file_and_runs_a_workflow(settings, tmp_path):
    amqp = urlsplit(settings.amqp_url)
    p = load(SQLITE_FILES, env={"RABBITMQ_USER": amqp.username or "guest", "RABBITMQ_PASSWORD": amqp.password or "guest"})
    receiver = await OtlpReceiver().start()
    network = {"rabbitmq:5672": settings.amqp_url, "redis:6379": settings.redis_url, "jaeger:4318": receiver.endpoint}
    switchboard = Path(sys.executable).parent / "switchboard"
    procs: dict[str, asyncio.subprocess.Process] = {}
    envs: dict[str, dict[str, str]] = {}
    try:
        for name, service in switchboard_services(p).items():
            envs[name] = container_as_process(service, network, tmp_path, settings)
            procs[name] = await asyncio.create_subprocess_exec(
                str(switchboard), *service["command"], env={**os.environ, **envs[name]},
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)

        async def healthy(name: str) -> bool:
            # The compose healthcheck itself, in the container's environment.
            test = p["services"][name]["healthcheck"]["test"][1:]
            check = await asyncio.create_subprocess_exec(
                str(switchboard), *test[1:], env={**os.environ, **envs[name]},
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            return await check.wait() == 0

        async def all_healthy() -> bool:
            return all([await healthy(name) for name in procs])

        await wait_for(all_healthy, timeout=60, what="every compose service's healthcheck passes")
        async with httpx.AsyncClient(timeout=30) as client:
            ports = {name: int(env["SWITCHBOARD_API_PORT" if name == "api" else "SWITCHBOARD_HEALTH_PORT"])
                     for name, env in envs.items()}
            await wait_processes_ready(client, settings, ports, procs)
            api = f"http://127.0.0.1:{settings.api_port}/v1"
            spec = {"name": "compose-smoke", "tasks": [
                {"id": "a", "capability": "echo", "payload": {"x": 1}},
                {"id": "b", "capability": "echo", "depends_on": ["a"]},
                {"id": "c", "capability": "plan", "payload": {"goal": "g"}, "depends_on": ["a"]},
            ]}
            created = await client.post(f"{api}/workflows", json=spec)
            assert created.status_code == 202, created.text
            view = (await client.get(f"{api}/workflows/{created.json()['workflow_id']}", params={"wait": 60})).json()
            assert view["status"] == "succeeded", view
        assert (tmp_path / "switchboard.sqlite3").exists()  # the one file of the sqlite profile
        # The OTLP endpoint in the file is where the traces go.
        await wait_for(lambda: {"api", "agents"} <= {s.service for s in receiver.spans}, timeout=30,
                       what="spans from the api and the agents")

        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for name, proc in procs.items():
            output, _ = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{output.decode()[-2000:]}"
    finally:
        for proc in procs.values():
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await receiver.close()
        topology = Topology(settings.namespace)
        await cleanup(settings, example_queues(topology))
