"""Prometheus metrics of the processes themselves, beside governance's per-project
gauges at `GET /admin/metrics`: HTTP requests (count and latency per route and status
class), Celery tasks (count per state, run time, time waiting on the queue), and the
process (CPU, memory, file descriptors: prometheus_client's own collectors).

Web, worker and beat are separate processes: with PROMETHEUS_MULTIPROC_DIR set (`make
run` sets it) every process on the host writes its figures there and the scrape sums
them (prometheus_client's multiprocess mode); without it, the scrape shows the serving
process's own."""

from __future__ import annotations

import os

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
    multiprocess,
)

from governance.metrics import project_collectors

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

HTTP_REQUESTS = Counter(
    "uws_http_requests_total",
    "HTTP requests answered, per method, route and status class.",
    ["method", "route", "status"],
)
HTTP_LATENCY = Histogram(
    "uws_http_request_duration_seconds",
    "Time to the response (to its first byte for an event stream), per method and route.",
    ["method", "route"],
    buckets=_BUCKETS,
)
CELERY_TASKS = Counter(
    "uws_celery_tasks_total",
    "Celery tasks run, per task name and final state.",
    ["task", "state"],
)
CELERY_TASK_SECONDS = Histogram(
    "uws_celery_task_duration_seconds",
    "Time a task ran on a worker, per task name.",
    ["task"],
    buckets=_BUCKETS,
)
CELERY_QUEUE_WAIT = Histogram(
    "uws_celery_queue_wait_seconds",
    "Time an AgentBus task waited on its project's queue, from publish to start.",
    ["task"],
    buckets=_BUCKETS,
)


def metrics_render() -> bytes:
    """The per-project gauges, then every process's HTTP / Celery figures and this
    process's own."""
    registry = CollectorRegistry(auto_describe=False)
    for collector in project_collectors():
        registry.register(collector)
    text = generate_latest(registry)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        shared = CollectorRegistry()
        multiprocess.MultiProcessCollector(shared)
        ProcessCollector(registry=shared)
        text += generate_latest(shared)
    else:
        text += generate_latest(REGISTRY)
    return text
