"""Dramatiq broker and actors for the Switchboard-vs-Dramatiq baseline benchmark.

Started by run.py as ``dramatiq tasks --processes 2 --threads 8 ...`` with this directory as cwd;
run.py loads it too, with the same environment (the queue and whether publishes wait for RabbitMQ's
confirms, so that the client and the worker publish alike).
"""
import os
import time

import dramatiq
import redis
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.middleware import GroupCallbacks
from dramatiq.rate_limits.backends import RedisBackend as BarrierBackend
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

QUEUE = os.environ.get("BENCH_DRAMATIQ_QUEUE", "bench-dramatiq")
REDIS_URL = os.environ.get("BENCH_DRAMATIQ_REDIS_URL", "redis://127.0.0.1:6379/13")
TTL_MS = 600_000  # results and group barriers expire: the bench leaves no long-lived keys in redis

# No socket timeout: the client waits for each result with a blocking BRPOPLPUSH, which redis-py's default
# of 5 s (redis-py 8) would cut short whenever a result takes longer than that to come.
results = RedisBackend(client=redis.Redis.from_url(REDIS_URL, socket_timeout=None), namespace=QUEUE,
                       use_namespace_prefix_keys=True)  # keys "<QUEUE>:..."
broker = RabbitmqBroker(url=os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
                        confirm_delivery=os.environ.get("BENCH_DRAMATIQ_CONFIRM") == "1")
broker.add_middleware(Results(backend=results, result_ttl=TTL_MS))
broker.add_middleware(GroupCallbacks(BarrierBackend(url=REDIS_URL), barrier_ttl=TTL_MS))
dramatiq.set_broker(broker)


@dramatiq.actor(actor_name="bench.noop", queue_name=QUEUE, store_results=True, max_retries=0)
def noop(*args, **kwargs):
    """The no-op task (b1..b4 and c of the DAG too)."""
    return None


@dramatiq.actor(actor_name="bench.fan_out", queue_name=QUEUE, store_results=True, max_retries=0)
def fan_out(callback):
    """Node a of the DAG: a no-op whose end starts b1..b4, with `callback` (c) run when all four are done
    (what Celery's chain(a, chord([b1..b4], c)) does after a)."""
    group = dramatiq.group([noop.message() for _ in range(4)])
    group.add_completion_callback(dramatiq.Message(**callback))
    group.run()


@dramatiq.actor(actor_name="bench.started_at", queue_name=QUEUE, store_results=True, max_retries=0)
def started_at(submitted_at):
    """Return the wall-clock time at which the task body began running."""
    return time.time()
