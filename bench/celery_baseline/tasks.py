"""Celery app for the Switchboard-vs-Celery baseline benchmark.

Started by run.py as ``celery -A tasks worker ...`` with this directory as cwd.
"""
import os
import time

from celery import Celery

QUEUE = "bench-celery"

app = Celery(
    "bench_celery",
    broker=os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    backend=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14"),
)
app.conf.update(
    task_default_queue=QUEUE,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_expires=600,  # the bench leaves no long-lived keys behind in redis
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="bench.noop")
def noop(*args, **kwargs):
    """The no-op task (also used for every node of the DAG)."""
    return None


@app.task(name="bench.started_at")
def started_at(submitted_at):
    """Return the wall-clock time at which the task body began running."""
    return time.time()
