"""schemathesis against the running api, with auth on: every answer to generated requests, valid and
invalid, is no server error, and conforms to the OpenAPI document (status, content type, schema, Allow)."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import pytest

from tests.harness import Platform

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
EXAMPLES_PER_OPERATION = 12  # per operation, positive and negative cases alike; the suite must stay short
SEED = 20261203  # a fixed seed: the same cases on every run, so a failure is reproducible
# Left out, each for its reason:
#   positive_data_acceptance: a schema-valid workflow may still break a rule the schema cannot say
#                             (an unknown dependency, a cycle): that is a 422 by design;
#   object_level_authorization: needs several tokens; test_auth shows a submitter sees only its own.
# ignored_auth stays: every /v1 operation declares the bearer scheme, and a call without it must be a 401.
EXCLUDED_CHECKS = "positive_data_acceptance,object_level_authorization"
# A long poll on a pending workflow would hold a case for up to 300 s.
CONFIG = """
[[operations]]
include-path = "/v1/workflows/{workflow_id}"
include-method = "GET"
parameters = { "query.wait" = 0.2 }

[[operations]]
include-path = "/v1/events"
enabled = false

[[operations]]
include-path = "/v1/workflows/{workflow_id}/events"
enabled = false
"""
# The event streams are left out: they answer 200 and then stream until the client goes away (or the
# workflow finishes), so every generated case would run into the request timeout. tests/test_events.py
# and tests/test_workflow_events.py cover them (auth, filters, bounds, bad Last-Event-ID).
SKIPPED_OPERATIONS = 2

pytestmark = pytest.mark.skipif(not SCHEMATHESIS.exists(), reason="schemathesis is not installed (the test extra)")


@pytest.fixture
async def api(settings):
    platform = Platform(settings.model_copy(update={"api_token": "fuzz-token"}))
    try:
        await platform.start(services=("api",))
        yield platform
    finally:
        await platform.close()


async def test_generated_requests_get_no_server_error_and_documented_answers(api, tmp_path):
    (tmp_path / "schemathesis.toml").write_text(CONFIG)
    base = f"http://127.0.0.1:{api.settings.api_port}"
    run = await asyncio.create_subprocess_exec(
        str(SCHEMATHESIS), "--no-color", "--config-file", str(tmp_path / "schemathesis.toml"), "run",
        f"{base}/openapi.json", "--header", f"Authorization: Bearer {api.settings.api_token}",
        "--checks", "all", "--exclude-checks", EXCLUDED_CHECKS,
        "--max-examples", str(EXAMPLES_PER_OPERATION), "--seed", str(SEED), "--generation-database", "none",
        "--request-timeout", "30", cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(run.communicate(), 600)
    report = output.decode(errors="replace")
    assert run.returncode == 0, report[-6000:]
    operations = sum(len(item) for item in (await api.client.get("/openapi.json")).json()["paths"].values())
    tested = re.search(r"Tested:\s+(\d+)", report)
    # every operation but the event stream, none skipped
    assert tested and int(tested[1]) == operations - SKIPPED_OPERATIONS, report[-3000:]
