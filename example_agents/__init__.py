"""Example agents that ship with Switchboard; `switchboard serve agents` runs them all in one process."""

from switchboard import Agent
from switchboard.settings import Settings

from example_agents import basic, planner


def build(settings: Settings | None = None) -> list[Agent]:
    """echo, sleep, fail and the delegating planner, each its own agent."""
    return basic.build(settings) + planner.build(settings)
