"""The web console (/ui) in headless Chromium (Debian's, driven by Playwright) against the real platform,
with auth on: the test signs in by typing the token into the console's prompt, as a person would.
Screenshots go to tests/screenshots/ (the README's docs/console.png is a copy of workflow-detail.png,
made by hand: tests do not write into the repo's tracked files)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import example_agents
from switchboard import Agent, TaskError
from tests.harness import Platform

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
playwright_api = pytest.importorskip("playwright.async_api", reason="playwright is not installed (the test extra)")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed "
                                "(apt-get install chromium); this test never downloads Playwright's own browsers")
expect = playwright_api.expect

TOKEN = "console-token"
SHOTS = Path(__file__).parent / "screenshots"
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
WAIT_MS = 15_000  # every wait on the page has this deadline
expect.set_options(timeout=WAIT_MS)
FAN_OUT = {"name": "console-fan-out", "tasks": [
    {"id": "fetch", "capability": "echo"},
    *({"id": f"part-{i}", "capability": "echo", "depends_on": ["fetch"]} for i in range(3)),
    {"id": "merge", "capability": "echo", "depends_on": ["part-0", "part-1", "part-2"]},
]}


@pytest.fixture
async def platform(settings):
    platform = Platform(settings.model_copy(update={"api_token": TOKEN}))
    platform.client.headers["Authorization"] = f"Bearer {TOKEN}"
    try:
        await platform.start()
        for agent in example_agents.build(platform.settings):
            await platform.add_agent(agent)
        yield platform
    finally:
        await platform.close()


@pytest.fixture
async def page(platform):
    SHOTS.mkdir(exist_ok=True)
    async with playwright_api.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 760})
            page.set_default_timeout(WAIT_MS)
            await page.goto(f"http://127.0.0.1:{platform.settings.api_port}/ui")  # redirected to /ui/
            await page.get_by_test_id("token-input").fill(TOKEN)
            await page.get_by_test_id("token-submit").click()
            await expect(page.get_by_test_id("whoami")).to_contain_text("admin")
            await expect(page.get_by_test_id("live-state")).to_have_text("live")
            yield page
        finally:
            await browser.close()


async def confirm(page) -> None:
    await page.get_by_test_id("confirm-ok").click()


def node(page, task_id: str):
    return page.locator(f'[data-testid=dag-node][data-task="{task_id}"]')


async def test_a_fan_out_appears_live_and_its_nodes_go_from_queued_to_succeeded(platform, page):
    # Paused, its tasks wait queued, so that the page shows them queued before they run.
    assert (await platform.client.post("/v1/control/pause", json={"capability": "echo"})).status_code == 200
    wf_id = await platform.submit(FAN_OUT)
    row = page.locator(f'[data-testid=workflow-row][data-id="{wf_id}"]')
    await expect(row).to_be_visible()  # arrived from the stream: the list was loaded before it existed
    await row.get_by_test_id("workflow-link").click()
    await expect(node(page, "fetch")).to_have_attribute("data-status", "queued")
    await expect(page.get_by_test_id("dag-node")).to_have_count(5)
    assert (await platform.client.post("/v1/control/resume", json={"capability": "echo"})).status_code == 200
    for task in ("fetch", "part-0", "part-1", "part-2", "merge"):
        await expect(node(page, task)).to_have_attribute("data-status", "succeeded")
    await expect(page.get_by_test_id("detail-status")).to_have_text("succeeded")
    await node(page, "merge").click()
    await expect(page.get_by_test_id("task-detail")).to_contain_text("echo-agent")
    await page.screenshot(path=str(SHOTS / "workflow-detail.png"), full_page=True)
    await page.get_by_test_id("nav-workflows").click()
    await page.get_by_test_id("filter-name").fill("console-fan")
    await expect(row.get_by_test_id("workflow-status")).to_have_text("succeeded")
    await page.screenshot(path=str(SHOTS / "workflows.png"))


async def test_a_failed_tasks_error_shows_and_replaying_its_dead_letter_resumes_the_workflow(platform, page):
    healthy = False

    async def flaky(task):
        if not healthy:
            raise TaskError("the upstream service is down", retryable=False)
        return {"ok": True}

    agent = Agent("flaky-agent", settings=platform.settings)
    agent.handler("flaky")(flaky)
    await platform.add_agent(agent)
    wf_id = await platform.submit({"name": "console-replay", "tasks": [
        {"id": "prepare", "capability": "echo"},
        {"id": "call", "capability": "flaky", "depends_on": ["prepare"]},
        {"id": "report", "capability": "echo", "depends_on": ["call"]},
    ]})
    await page.goto(f"http://127.0.0.1:{platform.settings.api_port}/ui/#/workflows/{wf_id}")
    await node(page, "call").click()
    await expect(page.get_by_test_id("task-error")).to_contain_text("the upstream service is down")
    await expect(node(page, "report")).to_have_attribute("data-status", "cancelled")
    await expect(page.get_by_test_id("detail-status")).to_have_text("failed")

    healthy = True  # the outage is over: now its replay can succeed
    await page.get_by_test_id("nav-dlq").click()
    row = page.locator(f'[data-testid=dlq-row][data-workflow="{wf_id}"]')
    await expect(row).to_be_visible()
    await row.locator("a").first.click()
    await expect(page.get_by_test_id("dlq-detail")).to_contain_text("non-retryable error")
    await page.screenshot(path=str(SHOTS / "dead-letters.png"), full_page=True)
    await row.get_by_test_id("dlq-replay").click()
    await confirm(page)
    await expect(row).to_have_count(0)  # the list shows dead ones: a replayed letter leaves it

    await page.goto(f"http://127.0.0.1:{platform.settings.api_port}/ui/#/workflows/{wf_id}")
    await expect(node(page, "report")).to_have_attribute("data-status", "succeeded")
    await expect(page.get_by_test_id("detail-status")).to_have_text("succeeded")


async def test_stop_all_shows_a_banner_on_every_page_until_it_is_lifted(platform, page):
    banner = page.get_by_test_id("stop-banner")
    await expect(banner).to_be_hidden()
    await page.get_by_test_id("nav-controls").click()
    await page.get_by_test_id("control-stop-all").click()
    await page.get_by_test_id("confirm-cancel").click()  # thought better of it: nothing happens
    await expect(page.get_by_test_id("state-stopped")).to_have_text("off")
    await page.get_by_test_id("control-stop-all").click()
    await confirm(page)
    await expect(banner).to_be_visible()
    await expect(page.get_by_test_id("state-stopped")).to_have_text("ON")
    assert (await platform.client.get("/v1/control")).json()["stopped"] is True
    await page.get_by_test_id("nav-agents").click()
    await expect(page.get_by_test_id("agent-row").first).to_be_visible()
    await expect(banner).to_be_visible()
    await page.screenshot(path=str(SHOTS / "agents-stop-all.png"), full_page=True)
    await page.get_by_test_id("nav-controls").click()
    await page.get_by_test_id("control-resume").click()
    await confirm(page)
    await expect(banner).to_be_hidden()
    assert (await platform.client.get("/v1/control")).json()["stopped"] is False


async def test_a_reader_sees_no_buttons_it_may_not_use(platform, page):
    made = (await platform.client.post("/v1/tokens", json={"name": "viewer", "role": "reader"})).json()
    wf_id = await platform.submit({"tasks": [{"id": "s", "capability": "sleep", "payload": {"seconds": 3}}]})
    await page.get_by_test_id("sign-out").click()  # the session's token goes; the prompt comes back
    await page.get_by_test_id("token-input").fill(made["token"])
    await page.get_by_test_id("token-submit").click()
    await expect(page.get_by_test_id("whoami")).to_contain_text("viewer (reader)")
    await page.goto(f"http://127.0.0.1:{platform.settings.api_port}/ui/#/workflows/{wf_id}")
    await expect(page.get_by_test_id("dag-node")).to_have_count(1)
    await expect(page.get_by_test_id("cancel-workflow")).to_have_count(0)
    await page.get_by_test_id("nav-controls").click()
    await expect(page.get_by_test_id("control-state")).to_be_visible()
    await expect(page.get_by_test_id("control-stop-all")).to_have_count(0)
    await platform.client.post(f"/v1/workflows/{wf_id}/cancel")  # so that stopping its agent need not wait


async def test_streamed_text_and_a_question_appear_and_answering_it_finishes_the_workflow(platform, page):
    agent = Agent("drafting-agent", settings=platform.settings)

    @agent.handler("draft")
    async def draft(task):
        for word in ("Once ", "upon ", "a ", "time."):
            await task.stream(word)
        await task.progress(message="drafted", percent=60)
        answer = await task.ask("Publish the draft?", schema={"type": "string", "enum": ["yes", "no"]})
        await task.publish("draft.reviewed", {"answer": answer})
        return {"published": answer == "yes"}

    await platform.add_agent(agent)
    wf_id = await platform.submit({"name": "console-draft", "tasks": [{"id": "draft", "capability": "draft"}]})
    await page.goto(f"http://127.0.0.1:{platform.settings.api_port}/ui/#/workflows/{wf_id}")
    question = page.get_by_test_id("question")
    await expect(question.get_by_test_id("question-text")).to_have_text("Publish the draft?")
    await expect(node(page, "draft")).to_have_attribute("data-status", "waiting_input")
    await node(page, "draft").click()
    await expect(page.get_by_test_id("task-stream")).to_have_text("Once upon a time.")
    await expect(page.get_by_test_id("task-progress")).to_contain_text("60% drafted")
    await question.get_by_test_id("answer-input").fill("maybe")
    await question.get_by_test_id("answer-submit").click()
    await expect(question.get_by_test_id("answer-error")).to_contain_text("'maybe' is not one of")  # the 422's message
    await page.screenshot(path=str(SHOTS / "workflow-question.png"), full_page=True)
    await question.get_by_test_id("answer-input").fill("yes")
    await question.get_by_test_id("answer-submit").click()
    await expect(question).to_have_count(0)
    await expect(page.get_by_test_id("detail-status")).to_have_text("succeeded")
    await expect(node(page, "draft")).to_have_attribute("data-status", "succeeded")
    await expect(page.get_by_test_id("published-event")).to_contain_text("draft.reviewed")
    await expect(page.get_by_test_id("task-detail")).to_contain_text('"published": true')  # its result, read whole
