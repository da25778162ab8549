"""Chaos and crash-recovery tests: the whole platform as real processes, with services, agents, the
broker and Redis killed or restarted mid-run. `python -m tests.chaos.run_chaos` runs the long version."""
