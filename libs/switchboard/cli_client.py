"""How every REST command of the CLI talks to the API: where it is, the token, errors, exit codes, output.

The platform is named by --api (else SWITCHBOARD_API_URL, else http://API_HOST:API_PORT from the settings)
and --token (else SWITCHBOARD_TOKEN, else the bootstrap SWITCHBOARD_API_TOKEN). `--output json` prints
exactly one JSON document on stdout (the API's body, or the shape a command's help documents); anything
else a command says goes to stderr, so a script can pipe stdout to jq.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from switchboard.settings import Settings

# Exit statuses shared by every REST command (listed in `switchboard --help`).
OK, FAILED, USAGE, UNREACHABLE = 0, 1, 2, 3
EXIT_CODES_HELP = ("exit status: 0 success (a waited-for workflow succeeded); 1 a workflow failed or was "
                   "cancelled, or the API refused the call; 2 bad usage or input (a bad file, a workflow the "
                   "API rejects as invalid); 3 the API cannot be reached")
# API answers that mean "your input is wrong" rather than "the operation failed".
BAD_INPUT_STATUSES = {400, 413, 422}


class CliError(Exception):
    """Ends a command with a message on stderr and an exit status."""

    def __init__(self, message: str, code: int = FAILED):
        super().__init__(message)
        self.code = code


def options(*, nested: bool = False) -> argparse.ArgumentParser:
    """The parent parser of every REST subcommand. `nested` (for the leaves under a group such as `dlq
    list`) suppresses defaults, so `switchboard dlq --output json list` and `... dlq list --output json`
    both work: a leaf only sets what was given to it."""
    default = (lambda value: argparse.SUPPRESS) if nested else (lambda value: value)
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--api", default=default(None), metavar="URL",
                        help="API base URL (default: SWITCHBOARD_API_URL, else http://127.0.0.1:8000)")
    parent.add_argument("--token", default=default(None),
                        help="API token (default: SWITCHBOARD_TOKEN, else SWITCHBOARD_API_TOKEN)")
    parent.add_argument("--output", choices=["text", "json"], default=default("text"),
                        help="text (tables, for people) or json (one document on stdout, for scripts)")
    return parent


class Api:
    """A small synchronous client: the CLI makes one call at a time, so httpx.Client is enough."""

    def __init__(self, url: str, token: str | None, timeout: float = 30.0):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    @classmethod
    def from_args(cls, settings: Settings, args: argparse.Namespace) -> Api:
        url = getattr(args, "api", None) or os.environ.get("SWITCHBOARD_API_URL") \
            or f"http://{settings.api_host}:{settings.api_port}"
        token = getattr(args, "token", None) or os.environ.get("SWITCHBOARD_TOKEN") or settings.api_token or None
        return cls(url, token)

    def call(self, method: str, path: str, *, body: Any = None, params: dict | None = None,
             timeout: float | None = None) -> Any:
        """The decoded body of a 2xx answer (None for 204); CliError for anything else."""
        params = {k: v for k, v in (params or {}).items() if v is not None}
        extra = {"timeout": timeout} if timeout is not None else {}
        try:
            response = self.http.request(method, path, json=body, params=params, **extra)
        except httpx.TransportError as exc:
            raise CliError(f"cannot reach the Switchboard API at {self.url}: {exc or type(exc).__name__}",
                           UNREACHABLE) from exc
        if response.status_code == 204:
            return None
        if response.status_code >= 400:
            self._raise(response)
        try:
            return response.json()
        except ValueError:
            return None

    @staticmethod
    def _raise(response: httpx.Response) -> None:
        """CliError for an error answer: the API's message, and USAGE when the input was at fault."""
        try:
            decoded = response.json()
        except ValueError:
            decoded = None
        error = decoded.get("error") if isinstance(decoded, dict) else None
        message = error["message"] if error else response.text[:200]
        code = USAGE if response.status_code in BAD_INPUT_STATUSES else FAILED
        raise CliError(f"{response.status_code} {error['code'] if error else ''}: {message}".replace(" :", ":"), code)

    def get(self, path: str, **params) -> Any:
        return self.call("GET", path, params=params)

    def post(self, path: str, body: Any = None) -> Any:
        return self.call("POST", path, body=body)

    def events(self, path: str, *, until: float | None = None, reconnects: int = 5,
               **params) -> Iterator[tuple[str | None, str, Any]]:
        """The server-sent events of `path` as (id, event, data decoded from JSON), until the caller stops
        or time.monotonic() passes `until` (checked at each line: the server's heartbeats come every 15 s).

        A dropped connection is opened again with Last-Event-ID, the last id seen, so the server resumes
        after it: nothing is missed or repeated. CliError after `reconnects` failures in a row.
        """
        last_id, failures = None, 0
        params = {k: v for k, v in params.items() if v is not None}
        while until is None or time.monotonic() < until:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                # No read deadline beyond the server's heartbeat comments (every 15 s) with room to spare.
                with self.http.stream("GET", path, params=params, headers=headers,
                                      timeout=httpx.Timeout(30.0, read=60.0)) as response:
                    if response.status_code >= 400:
                        response.read()
                        self._raise(response)
                    fields: dict[str, str] = {}
                    for line in response.iter_lines():
                        if until is not None and time.monotonic() >= until:
                            return
                        if line == "":
                            if "data" in fields:
                                last_id = fields.get("id", last_id)
                                failures = 0
                                yield fields.get("id"), fields.get("event", "message"), json.loads(fields["data"])
                            fields = {}
                        elif not line.startswith(":"):  # a comment only keeps the connection open
                            key, _, value = line.partition(":")
                            value = value[1:] if value.startswith(" ") else value
                            fields[key] = f"{fields[key]}\n{value}" if key == "data" and key in fields else value
            except httpx.TransportError as exc:
                failures += 1
                if failures > reconnects:
                    raise CliError(f"the event stream {path} at {self.url} keeps failing: "
                                   f"{exc or type(exc).__name__}", UNREACHABLE) from exc
                time.sleep(min(2.0, 0.2 * failures))
                continue
            failures += 1  # the server closed the stream without the caller stopping: open it again
            if failures > reconnects:
                raise CliError(f"the event stream {path} at {self.url} keeps closing", FAILED)

    def close(self) -> None:
        self.http.close()


def console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Piped output is for grep and less, not an 80-column terminal: don't cut ids short there.
    wide = None if stream.isatty() or "COLUMNS" in os.environ else 200
    return Console(stderr=stderr, highlight=False, soft_wrap=False, width=wide)


def emit(args: argparse.Namespace, data: Any, render: Callable[[Any], Any] | None = None) -> None:
    """Prints `data` as JSON, or render(data) (a rich renderable or a string) for people."""
    if getattr(args, "output", "text") == "json":
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    elif render is not None:
        out = render(data)
        if isinstance(out, str):
            print(out)  # plain text as is: rich would read "[x]" as markup
        elif out is not None:
            console().print(out)


def say(message: str) -> None:
    """A remark for the person at the terminal: stderr, so that stdout stays the command's output."""
    print(message, file=sys.stderr)


def run(settings: Settings, args: argparse.Namespace, command: Callable[[Api, argparse.Namespace], int]) -> int:
    """Runs one REST command, turning CliError into its message and exit status."""
    api = Api.from_args(settings, args)
    try:
        return command(api, args)
    except CliError as exc:
        say(f"switchboard: {exc}")
        return exc.code
    except KeyboardInterrupt:
        return 130
    finally:
        api.close()
