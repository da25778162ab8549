"""Example agents that ship with Switchboard; `switchboard serve agents` runs them all in one process."""

from example_agents.basic import echo_agent, fail_agent, sleep_agent
from example_agents.planner import planner_agent

ALL = (echo_agent, sleep_agent, fail_agent, planner_agent)
