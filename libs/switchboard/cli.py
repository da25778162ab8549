"""The `switchboard` command.

  switchboard serve SERVICE   run one service (api, coordinator, dispatcher, registry, aggregator,
                              dlq_replayer) or the example agents (agents) in this process
  switchboard run             check the broker and Redis, then run every service and the example agents,
                              each in its own process, until Ctrl-C / SIGTERM
  switchboard demo            follow a planner that delegates to other agents, then a writer that streams a
                              draft, asks for approval and announces it (--only planner|writer, --ask)
  switchboard host MODULE:CALLABLE
                              run the agents that CALLABLE(settings) returns (a list of Agent) in this
                              process, sharing one connection and one heartbeat (switchboard.hosting)
  switchboard check           say whether RabbitMQ and Redis answer
  switchboard healthcheck     exit 0 if the service of this host or container answers /healthz (for
                              Docker's HEALTHCHECK)
  switchboard agent-credentials create NAME --capabilities a,b [--password P]
                              (admin) give an agent a RabbitMQ user of its own, allowed only what that
                              agent needs; prints its AMQP URL. `... delete NAME` removes the user
  switchboard submit FILE [--wait] | workflows [--status S] | show ID | wait ID | cancel ID
                              workflows through the REST API; --wait follows them live
  switchboard dag ID [--format ascii|mermaid|svg] [--out FILE]
                              a workflow's DAG with each task's status
  switchboard agents | dlq list|show|replay|delete | control show|stop-all|pause|resume [--capability C]
  switchboard top             a full-screen live view of agents, capabilities, workflows and controls
  switchboard token create NAME --role R [--expires-in S] | list | revoke ID
                              (admin) API tokens, through the REST API
  switchboard audit verify    check the audit log's hash chain in the store; names the first broken link
  switchboard keys generate | reencrypt
                              (admin) a new payload key; seal stored payloads and results with the current one

Every REST command takes --api URL (default SWITCHBOARD_API_URL, else http://127.0.0.1:8000), --token T
(default SWITCHBOARD_TOKEN, else SWITCHBOARD_API_TOKEN) and --output text|json (json: one document on
stdout, for scripts).
Exit status of the REST commands: 0 success (a waited-for workflow succeeded); 1 a workflow failed or
was cancelled, or the API refused the call; 2 bad usage or input; 3 the API cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import signal
import subprocess
import sys
import time

from switchboard import cli_admin, cli_client, cli_commands, cli_top
from switchboard.settings import Settings, get_settings, redact

SERVICES = {
    "api": "services.api:Api",
    "coordinator": "services.coordinator:Coordinator",
    "dispatcher": "services.dispatcher:Dispatcher",
    "registry": "services.registry:Registry",
    "aggregator": "services.aggregator:Aggregator",
    "dlq_replayer": "services.dlq_replayer:DlqReplayer",
}
HOW_TO_START = {
    "RabbitMQ": "start it with `rabbitmq-server -detached` (Debian: apt-get install rabbitmq-server), "
                "or point AMQP_URL at one",
    "Redis": "start it with `redis-server --daemonize yes --save ''` (Debian: apt-get install redis-server), "
             "or point REDIS_URL at one",
}


def load_service(name: str, settings: Settings):
    module, _, cls = SERVICES[name].partition(":")
    return getattr(importlib.import_module(module), cls)(settings)


def serve(name: str) -> None:
    from switchboard import runtime

    settings = get_settings()
    if name == "agents":
        host("example_agents:build")
    else:
        runtime.run(load_service(name, settings))


def host(target: str) -> None:
    """Runs the agents that `module:callable` builds in this process, sharing one connection."""
    from switchboard import runtime
    from switchboard.hosting import AgentHost, load

    runtime.run(AgentHost(load(target, get_settings())))


async def _check(settings: Settings) -> dict[str, str | None]:
    import logging

    import aio_pika
    import redis.asyncio as aioredis

    logging.getLogger("aiormq").setLevel(logging.CRITICAL)  # we report the failure ourselves
    logging.getLogger("aio_pika").setLevel(logging.CRITICAL)

    problems: dict[str, str | None] = {"RabbitMQ": None, "Redis": None}
    try:
        connection = await asyncio.wait_for(aio_pika.connect(settings.amqp_url), 5)
        await connection.close()
    except Exception as exc:
        problems["RabbitMQ"] = f"{redact(settings.amqp_url)}: {exc or type(exc).__name__}"
    client = aioredis.from_url(settings.redis_url, socket_connect_timeout=5)
    try:
        await client.ping()
    except Exception as exc:
        problems["Redis"] = f"{redact(settings.redis_url)}: {exc}"
    finally:
        await client.aclose()
    return problems


def check(settings: Settings) -> bool:
    ok = True
    for name, problem in asyncio.run(_check(settings)).items():
        if problem is None:
            print(f"  {name:9} ok")
        else:
            ok = False
            print(f"  {name:9} NOT REACHABLE ({problem})\n            {HOW_TO_START[name]}")
    return ok


def run_all() -> int:
    """A small supervisor: one process per service, restarted with backoff if it dies."""
    settings = get_settings()
    print("Checking dependencies:")
    if not check(settings):
        return 1
    names = list(SERVICES) + ["agents"]
    procs: dict[str, subprocess.Popen] = {}
    restarts: dict[str, float] = {}
    stopping = False

    def start(name: str) -> None:
        procs[name] = subprocess.Popen([sys.executable, "-m", "switchboard.cli", "serve", name])

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for name in names:
        start(name)
    ports = {"coordinator": 8101, "dispatcher": 8102, "registry": 8103, "aggregator": 8104,
             "dlq_replayer": 8105, "agents": 8110}
    api = f"http://{settings.api_host}:{settings.api_port}"
    host = settings.health_host
    print(f"\nSwitchboard is starting ({len(names)} processes), state in {settings.store_url}\n"
          f"  REST API     {api}/v1   (OpenAPI docs: {api}/docs)\n"
          f"  health       " + ", ".join(f"{n} :{p}" for n, p in ports.items()) + " (/healthz /readyz)\n"
          f"  metrics      {api}/metrics  " + "  ".join(f"http://{host}:{p}/metrics" for p in ports.values()) + "\n"
          f"  tracing      {_tracing_status()}\n"
          f"  broker       {redact(settings.amqp_url)}\n  redis        {redact(settings.redis_url)}\n"
          f"Try `make demo` in another terminal. Ctrl-C stops everything.\n", flush=True)
    while not stopping:
        time.sleep(0.2)
        for name, proc in list(procs.items()):
            if proc.poll() is not None and not stopping:
                delay = min(30.0, max(1.0, restarts.get(name, 0.5) * 2))
                restarts[name] = delay
                print(f"switchboard: {name} exited with {proc.returncode}; restarting in {delay:.0f}s", flush=True)
                deadline = time.monotonic() + delay
                while time.monotonic() < deadline and not stopping:
                    time.sleep(0.1)
                if not stopping:
                    start(name)
    print("\nswitchboard: stopping (draining in-flight work)...", flush=True)
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 40
    for proc in procs.values():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
    print("switchboard: stopped", flush=True)
    return 0


def _tracing_status() -> str:
    from switchboard.telemetry import tracing

    if tracing.enabled():
        where = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        return f"on, OTLP to {where}" if where else f"on ({os.environ['OTEL_TRACES_EXPORTER']})"
    return ("off; to turn it on, run with OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 "
            "(Jaeger's OTLP/HTTP port)")


def healthcheck(settings: Settings) -> bool:
    """The service here answers /healthz: on its health port, or, for the api, on the API port."""
    import urllib.request

    for port in dict.fromkeys(p for p in (settings.health_port, settings.api_port) if p):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3) as response:
                if response.status == 200:
                    return True
        except OSError:
            continue
    return False


def agent_credentials(settings: Settings, args) -> int:
    import httpx

    from switchboard import credentials

    failed = (credentials.ManagementError, httpx.HTTPError, OSError)

    if args.action == "delete":
        try:
            found = credentials.delete(settings, args.name)
        except failed as exc:
            print(f"cannot delete broker user {args.name!r}: {exc}", file=sys.stderr)
            return 1
        print(f"deleted broker user {args.name!r}" if found else f"no broker user {args.name!r}")
        return 0
    capabilities = [c for c in (args.capabilities or "").split(",") if c]
    if not capabilities:
        print("--capabilities needs at least one capability", file=sys.stderr)
        return 2
    try:
        url = asyncio.run(credentials.create(settings, args.name, capabilities, args.password))
    except failed as exc:
        print(f"cannot create broker user {args.name!r} at {redact(settings.management_url)}: {exc}", file=sys.stderr)
        return 1
    print(url)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="switchboard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    serve_cmd = sub.add_parser("serve", help="run one service, or the example agents")
    serve_cmd.add_argument("service", choices=[*SERVICES, "agents"])
    sub.add_parser("run", help="run every service and the example agents")
    host_cmd = sub.add_parser("host", help="run many agents in this process (module:callable returns them)")
    host_cmd.add_argument("target", help="e.g. example_agents:build: called with the settings, returns Agents")
    sub.add_parser("check", help="check that RabbitMQ and Redis answer")
    sub.add_parser("healthcheck", help="exit 0 if the service here answers /healthz")
    creds = sub.add_parser(
        "agent-credentials", help="(admin) an agent's own RabbitMQ user, allowed only what it needs",
        description="Creates, updates or deletes an agent's RabbitMQ user through the management API "
                    "(SWITCHBOARD_MANAGEMENT_URL) as its administrator: the management URL's user, else "
                    "AMQP_URL's. Only who holds that admin can run it.")
    creds_sub = creds.add_subparsers(dest="action", required=True)
    create_cmd = creds_sub.add_parser("create", help="create or update the user; prints its AMQP URL")
    create_cmd.add_argument("name", help="the agent's name (Agent(name)), also the broker user's")
    create_cmd.add_argument("--capabilities", required=True, help="comma-separated capabilities it serves")
    create_cmd.add_argument("--password", default=None, help="default: a strong random one")
    delete_cmd = creds_sub.add_parser("delete", help="delete the user")
    delete_cmd.add_argument("name")
    cli_admin.add_parsers(sub)
    cli_commands.add_parsers(sub)
    cli_top.add_parser(sub)
    args = parser.parse_args(argv)
    settings = get_settings()
    if args.command in cli_commands.COMMANDS:
        return cli_client.run(settings, args, cli_commands.COMMANDS[args.command])
    if args.command == "top":
        return cli_client.run(settings, args, cli_top.top)
    if args.command == "serve":
        serve(args.service)
        return 0
    if args.command == "host":
        try:
            host(args.target)
        except (ImportError, AttributeError, ValueError) as exc:
            print(f"switchboard host: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command == "run":
        return run_all()
    if args.command == "healthcheck":
        return 0 if healthcheck(settings) else 1
    if args.command == "agent-credentials":
        return agent_credentials(settings, args)
    if args.command == "token":
        return cli_admin.token(settings, args)
    if args.command == "audit":
        return cli_admin.audit_verify(settings)
    if args.command == "keys":
        return cli_admin.keys(settings, args)
    return 0 if check(settings) else 1


if __name__ == "__main__":
    sys.exit(main())
