"""One folder per service; each is thin wiring over the shared library in libs/switchboard."""

SERVICES = ("api", "coordinator", "dispatcher", "registry", "aggregator", "dlq_replayer")
