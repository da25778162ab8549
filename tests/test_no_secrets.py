"""No token, key or password shows in a log line, an HTTP answer, a trace or a settings repr.

One full run (module-scoped): every service and the example agents as real `switchboard serve` processes,
connected to the shared RabbitMQ as a temporary user with a distinctive password, with a distinctive
bootstrap token and tracing to an OTLP receiver. The run is driven through successes and failures (401,
403, 404, 422, a task that fails into the DLQ, a token created, used and revoked), then each place a secret
could end up is searched, one test per place, so a failure names where it leaked.

The Redis URL carries a password too: the shared Redis has none, and a user without a password (Redis's
`nopass` default user) accepts any, so it is sent on every connection but checks nothing. Not covered in
the full run: SWITCHBOARD_PAYLOAD_KEYS (the settings repr test covers secret fields by name).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import pytest

from switchboard.settings import Settings
from tests.harness import free_port, make_settings, service_processes, wait_for, wait_processes_ready
from tests.otlp import OtlpReceiver

MANAGEMENT = "http://127.0.0.1:15672"


@dataclass
class Run:
    secrets: dict[str, str]  # what each secret is -> its value
    logs: dict[str, str] = field(default_factory=dict)  # process -> everything it wrote
    bodies: list[tuple[str, str]] = field(default_factory=list)  # ("METHOD url -> status", headers and body)
    token_body: str = ""  # the one answer that legitimately shows the created token
    dead_letters: list[dict] = field(default_factory=list)
    audit: list[dict] = field(default_factory=list)
    receiver: OtlpReceiver | None = None


def _with_user(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"))


class BrokerUser:
    """A temporary user on the shared broker, through the management API (else rabbitmqctl)."""

    def __init__(self, amqp_url: str, name: str, password: str):
        parts = urlsplit(amqp_url)
        self.admin = (parts.username or "guest", parts.password or "guest")
        self.vhost = (parts.path or "/")[1:] or "/"
        self.name, self.password = name, password
        self.via_api = True

    def _api(self, method: str, path: str, body: dict | None = None) -> None:
        response = httpx.request(method, MANAGEMENT + path, json=body, auth=self.admin, timeout=10)
        assert response.status_code in (200, 201, 204), f"{method} {path}: {response.status_code} {response.text}"

    def _ctl(self, *args: str) -> None:
        subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)

    def create(self) -> None:
        vhost = quote(self.vhost, safe="")
        try:
            self._api("PUT", f"/api/users/{self.name}", {"password": self.password, "tags": ""})
        except httpx.TransportError:
            self.via_api = False
            self._ctl("add_user", self.name, self.password)
            self._ctl("set_permissions", "-p", self.vhost, self.name, ".*", ".*", ".*")
            return
        self._api("PUT", f"/api/permissions/{vhost}/{self.name}", {"configure": ".*", "write": ".*", "read": ".*"})

    def delete(self) -> None:
        if self.via_api:
            self._api("DELETE", f"/api/users/{self.name}")
        else:
            self._ctl("delete_user", self.name)


async def _drive(run: Run, settings: Settings, receiver: OtlpReceiver) -> None:
    boot = run.secrets["bootstrap token"]
    env = {"SWITCHBOARD_API_TOKEN": boot, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
           "OTEL_BSP_SCHEDULE_DELAY": "100", "SWITCHBOARD_AGENT_LOST_AFTER_S": "5"}
    api = f"http://127.0.0.1:{settings.api_port}"

    async def keep(response: httpx.Response) -> None:
        await response.aread()
        label = f"{response.request.method} {response.request.url} -> {response.status_code}"
        run.bodies.append((label, f"{dict(response.headers)}\n{response.text}"))

    async with service_processes(settings, env) as (procs, ports):
        readers = {name: asyncio.create_task(proc.stdout.read()) for name, proc in procs.items()}
        try:
            async with httpx.AsyncClient(base_url=api, timeout=30, event_hooks={"response": [keep]},
                                         headers={"Authorization": f"Bearer {boot}"}) as client:
                await wait_processes_ready(client, settings, ports, procs)
                await _exercise(run, client)
                # Every process has exported spans before it is stopped (the rest go out on shutdown).
                await wait_for(lambda: {"api", "coordinator", "dispatcher", "aggregator"}
                               <= {s.service for s in receiver.spans}, timeout=20, what="spans from the services")
                for port in ports.values():  # each process's metrics are an answer too
                    await client.get(f"http://127.0.0.1:{port}/metrics")
        finally:
            for proc in procs.values():
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
            for name, proc in procs.items():
                try:
                    await asyncio.wait_for(proc.wait(), 30)
                except asyncio.TimeoutError:
                    proc.kill()
                run.logs[name] = (await readers[name]).decode(errors="replace")


async def _exercise(run: Run, client: httpx.AsyncClient) -> None:
    boot = run.secrets["bootstrap token"]
    # Unauthenticated, and wrong tokens: one of them has the real token inside it, so an answer, a log line
    # or an audit record that repeated the presented token would show the real one.
    assert (await client.get("/v1/workflows", headers={"Authorization": ""})).status_code == 401
    for wrong in (f"{boot}x", "tok-not-a-token", f"x{boot}"):
        answer = await client.get("/v1/agents", headers={"Authorization": f"Bearer {wrong}"})
        assert answer.status_code == 401, answer.text
    assert (await client.post("/v1/workflows", json={"tasks": []},
                              headers={"Authorization": f"Bearer {boot}x"})).status_code == 401

    ok = await client.post("/v1/workflows", json={"tasks": [
        {"id": "a", "capability": "echo", "payload": {"x": 1}},
        {"id": "b", "capability": "echo", "depends_on": ["a"]}]})
    assert ok.status_code == 202, ok.text
    failing = await client.post("/v1/workflows", json={"tasks": [
        {"id": "f", "capability": "fail", "max_attempts": 1, "payload": {"retryable": False, "message": "on purpose"}}]})
    assert failing.status_code == 202, failing.text
    for answer, status in ((ok, "succeeded"), (failing, "failed")):
        wf_id = answer.json()["workflow_id"]
        view = (await client.get(f"/v1/workflows/{wf_id}", params={"wait": 30})).json()
        assert view["status"] == status, view

    assert (await client.get("/v1/workflows/no-such-workflow")).status_code == 404
    assert (await client.post("/v1/workflows", json={"tasks": [{"id": "a"}]})).status_code == 422
    assert (await client.post("/v1/workflows", content=b"{not json",
                              headers={"Content-Type": "application/json"})).status_code == 400
    assert (await client.get("/v1/dlq/no-such-letter")).status_code == 404

    created = await client.post("/v1/tokens", json={"name": "secrets-test", "role": "reader"})
    assert created.status_code == 201, created.text
    run.token_body = created.text
    run.secrets["created token"] = token = created.json()["token"]
    as_reader = {"Authorization": f"Bearer {token}"}
    assert (await client.get("/v1/workflows", headers=as_reader)).status_code == 200
    assert (await client.post("/v1/workflows", json={"tasks": [{"id": "a", "capability": "echo"}]},
                              headers=as_reader)).status_code == 403
    assert (await client.get("/v1/tokens")).status_code == 200
    assert (await client.delete(f"/v1/tokens/{created.json()['id']}")).status_code == 200

    async def refused() -> bool:
        return (await client.get("/v1/workflows", headers=as_reader)).status_code == 401

    await wait_for(refused, timeout=10, what="the revoked token refused")

    letters = (await client.get("/v1/dlq")).json()["dead_letters"]
    run.dead_letters = [(await client.get(f"/v1/dlq/{letter['id']}")).json() for letter in letters]
    run.audit = (await client.get("/v1/audit", params={"limit": 1000})).json()["records"]


@pytest.fixture(scope="module")
def full_run(amqp_url, redis_url, tmp_path_factory) -> Run:
    user = BrokerUser(amqp_url, f"sbsecrets-{secrets.token_hex(4)}", f"pw-{secrets.token_hex(12)}")
    run = Run(secrets={"broker password": user.password, "bootstrap token": f"tok-{secrets.token_hex(16)}",
                       "redis password": f"pw-redis-{secrets.token_hex(8)}"})
    settings = make_settings(_with_user(amqp_url, user.name, user.password),
                             _with_user(redis_url, "", run.secrets["redis password"]),
                             tmp_path_factory.mktemp("secrets") / "store.sqlite3",
                             api_token=run.secrets["bootstrap token"])

    async def scenario() -> None:
        run.receiver = await OtlpReceiver().start()
        try:
            await _drive(run, settings, run.receiver)
        finally:
            await run.receiver.close()

    user.create()
    try:
        asyncio.run(scenario())
    finally:
        user.delete()
    return run


def _leaks(run: Run, texts: dict[str, str]) -> list[str]:
    return [f"the {what} is in {where}" for where, text in texts.items()
            for what, value in run.secrets.items() if value and value in text]


def test_the_run_really_used_the_secrets(full_run):
    assert set(full_run.secrets) == {"broker password", "bootstrap token", "redis password", "created token"}
    assert full_run.secrets["created token"] in full_run.token_body  # shown once, where it is made
    statuses = [label.rsplit(" ", 1)[1] for label, _ in full_run.bodies]
    assert {"200", "201", "202", "400", "401", "403", "404", "422"} <= set(statuses), statuses


def test_no_secret_in_any_log_line(full_run):
    assert set(full_run.logs) >= {"api", "coordinator", "dispatcher", "aggregator", "agents"}
    for name, output in full_run.logs.items():
        assert '"msg":"stopped"' in output.replace(" ", ""), f"{name} did not stop cleanly:\n{output[-2000:]}"
    assert not _leaks(full_run, {f"the {name} process's output": out for name, out in full_run.logs.items()})


def test_no_secret_in_any_http_answer(full_run):
    answers = {f"answer {i} ({label})": text for i, (label, text) in enumerate(full_run.bodies)
               if text.partition("\n")[2] != full_run.token_body}
    assert len(answers) == len(full_run.bodies) - 1  # exactly the token's 201 left out
    assert not _leaks(full_run, answers)


def test_no_secret_in_any_span(full_run):
    receiver = full_run.receiver
    assert receiver.spans and receiver.raw
    decoded = {f"span {s.name!r} of {s.service}": f"{s.name} {s.attributes}" for s in receiver.spans}
    assert not _leaks(full_run, decoded)
    # The export requests as sent: resources, events, status messages and links too.
    raw = {f"OTLP export request {i}": body.decode("latin-1") for i, body in enumerate(receiver.raw)}
    assert not _leaks(full_run, raw)


def test_no_secret_in_dead_letters_or_audit(full_run):
    assert full_run.dead_letters and any(letter.get("errors") for letter in full_run.dead_letters)
    outcomes = {r.get("outcome") for r in full_run.audit}
    assert {"unauthenticated", "forbidden", "ok"} <= outcomes, full_run.audit  # the refusals are recorded too
    assert not _leaks(full_run, {f"dead letter {d.get('id')}": str(d) for d in full_run.dead_letters})
    assert not _leaks(full_run, {f"audit record {r.get('seq')}": str(r) for r in full_run.audit})


def test_settings_repr_and_str_show_no_secret(monkeypatch):
    values = {"amqp_url": "amqps://agent:pw-amqp-s3cret@broker:5671/prod?cafile=/ca.pem",
              "redis_url": "rediss://:pw-redis-s3cret@redis:6380/0",
              "management_url": "http://admin:pw-mgmt-s3cret@broker:15672",
              "api_token": "tok-bootstrap-s3cret"}
    from_env = {f"SWITCHBOARD_{k.upper()}": v for k, v in values.items()}
    for name, value in from_env.items():
        monkeypatch.setenv(name, value)
    for settings in (Settings(**values), Settings()):
        assert settings.amqp_url == values["amqp_url"] and settings.api_token == values["api_token"]  # still usable
        for shown in (repr(settings), str(settings), f"{settings}", repr([settings])):
            assert "s3cret" not in shown, shown
        assert "amqps://agent:***@broker:5671/prod?cafile=/ca.pem" in repr(settings)  # still says where
    # Whatever other secret field settings gain (payload keys, say) is masked by its name.
    if "payload_keys" in Settings.model_fields:
        monkeypatch.setenv("SWITCHBOARD_PAYLOAD_KEYS", "k1:" + "A" * 43 + "=")
        assert "A" * 43 not in repr(Settings())


async def test_switchboard_check_does_not_print_the_password():
    from switchboard.cli import _check

    port = free_port()
    problems = await _check(Settings(amqp_url=f"amqp://u:pw-check-s3cret@127.0.0.1:{port}/",
                                     redis_url=f"redis://:pw-check-s3cret@127.0.0.1:{port}/0"))
    assert problems["RabbitMQ"] and problems["Redis"]  # both unreachable, each reported
    assert "s3cret" not in str(problems), problems


async def test_a_service_refused_by_the_broker_does_not_log_the_password(settings):
    """A wrong broker password: the service retries and says why, never with the password."""
    wrong = f"pw-wrong-{secrets.token_hex(8)}"
    parts = urlsplit(settings.amqp_url)
    env = {**os.environ, "SWITCHBOARD_AMQP_URL": _with_user(settings.amqp_url, parts.username or "guest", wrong),
           "SWITCHBOARD_REDIS_URL": settings.redis_url, "SWITCHBOARD_NAMESPACE": settings.namespace,
           "SWITCHBOARD_HEALTH_PORT": str(free_port())}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "switchboard.cli", "serve", "registry", env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    lines: list[bytes] = []
    try:
        async def refused() -> bool:
            lines.append(await asyncio.wait_for(proc.stdout.readline(), 20))
            return b"cannot start yet" in lines[-1] or proc.stdout.at_eof()
        await wait_for(refused, timeout=30, what="the registry's retry log line")
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = await asyncio.wait_for(proc.communicate(), 30)
    output = b"".join(lines).decode() + rest.decode()
    assert "ACCESS_REFUSED" in output, output  # it does say why
    assert wrong not in output, output


def test_a_log_line_masks_the_password_of_any_url_in_it():
    """Defence in depth: a message or a traceback that formats a URL with its password shows ***."""
    import logging

    import orjson

    from switchboard.telemetry.logs import JsonFormatter

    url = "amqps://agent:pw-log-s3cret@broker:5671/prod?cafile=/ca.pem"
    try:
        raise ConnectionError(f"cannot reach {url} nor redis://:pw-log-s3cret@redis:6379/0")
    except ConnectionError:
        record = logging.LogRecord("t", logging.WARNING, __file__, 1, "retrying %s", (url,), sys.exc_info())
    line = JsonFormatter("test").format(record)
    assert "s3cret" not in line, line
    parsed = orjson.loads(line)
    assert parsed["msg"] == "retrying amqps://agent:***@broker:5671/prod?cafile=/ca.pem"
    assert "redis://:***@redis:6379/0" in parsed["exc"]
