"""A writer that uses what long-running AI agents need: it streams a draft token by token, reports
progress, checkpoints the draft (so a retry does not write it again), asks a person to approve it, and
announces the published draft as an event, which the announcer, another agent, hears.

    {"capability": "write", "payload": {"topic": "tides", "token_delay_s": 0.03}}

The answer comes from `POST /v1/workflows/{id}/tasks/{task_id}/input {"answer": {"approve": true}}`
(or `make demo`, which answers it).
"""

import asyncio
import logging

from switchboard import Agent
from switchboard.settings import Settings

log = logging.getLogger(__name__)

APPROVAL = {"type": "object", "properties": {"approve": {"type": "boolean"}, "note": {"type": "string"}},
            "required": ["approve"]}
# Canned, so the example needs no model: the point is how the tokens travel, not what they say.
DRAFT = ("{Topic} are easier to explain than they look. Start with what you can see, then name the force "
         "behind it, and only then the numbers. A reader who can picture it will remember it, and a reader "
         "who remembers it will ask the next question. That next question is the one worth writing about.")


async def write(task):
    topic = str(task.payload.get("topic", "tides"))
    state = task.checkpoint_state or {}
    draft = state.get("draft")
    if draft is None:  # a retry that finds its checkpoint goes straight to the question
        draft = await _draft(task, topic, float(task.payload.get("token_delay_s", 0.03)))
        await task.checkpoint({"draft": draft})
    await task.progress("waiting for approval", percent=80)
    answer = await task.ask("Publish this draft?", schema=APPROVAL)
    outcome = {"topic": topic, "words": len(draft.split()), "note": answer.get("note"), "resumed": "draft" in state}
    if not answer["approve"]:
        await task.progress("not published", percent=100)
        return outcome | {"published": False}
    event_id = await task.publish("draft.published", {"topic": topic, "words": outcome["words"],
                                                      "note": answer.get("note"), "draft": draft})
    await task.progress("published", percent=100)
    return outcome | {"published": True, "event_id": event_id}


async def _draft(task, topic: str, delay_s: float) -> str:
    words = DRAFT.replace("{Topic}", topic.capitalize()).split()
    await task.progress("drafting", percent=0)
    for i, word in enumerate(words):
        await task.stream(word if i == 0 else " " + word)  # the SDK coalesces these into few messages
        await task.progress("drafting", percent=round(70 * (i + 1) / len(words)))  # coalesced too
        await asyncio.sleep(delay_s)  # a model's pace, so it looks live
    return " ".join(words)


async def announce(event):
    # A real subscriber would post it somewhere; the log line is what the example's test looks for.
    log.info("heard %s (event %s) from %s: %s words on %r", event.topic, event.id, event.source,
             event.data.get("words"), event.data.get("topic"),
             extra={"workflow_id": event.workflow_id, "task_id": event.task_id})


def build(settings: Settings | None = None) -> list[Agent]:
    writer = Agent("writer-agent", settings=settings)
    writer.handler("write")(write)
    announcer = Agent("announcer-agent", settings=settings)
    announcer.on_event("draft.*")(announce)
    return [writer, announcer]
