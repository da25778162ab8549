"""Switchboard: run many agents as one system. The shared library every service and agent imports."""

from switchboard.sdk import Agent, TaskContext, TaskError

__all__ = ["Agent", "TaskContext", "TaskError"]
