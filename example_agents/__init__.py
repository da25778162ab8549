"""Example agents that ship with Switchboard; `switchboard serve agents` runs them all in one process."""

from switchboard import Agent
from switchboard.settings import Settings

from example_agents import basic, planner, writer


def build(settings: Settings | None = None) -> list[Agent]:
    """echo, sleep, fail, the delegating planner, and the streaming writer with its announcer."""
    return basic.build(settings) + planner.build(settings) + writer.build(settings)
