"""Operators' metrics in Prometheus' text format (`GET /admin/metrics`, staff only).

Per project, over the last 24 hours (gauges read from the database at each scrape, so
they survive restarts and need no shared state between processes): runs, runs that
ended in error, prompt and completion tokens; and each project's queue depth now.
Label cardinality is bounded: the METRICS_TOP_PROJECTS projects with the most tokens
(then the deepest queues) get a `project` label of their own, all others are summed
under `project="other"`.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import timedelta

from django.conf import settings
from django.db.models import Count, Q, Sum
from django.utils import timezone
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from agentbus import queue_depths
from agentbus.active import active_queues
from agentbus.flow import flow_counters
from agentbus.queues import project_id_from_queue
from projects.models import Project

from .models import RunUsage

OTHER = "other"
WINDOW = timedelta(hours=24)
FIELDS = ("runs", "errors", "prompt_tokens", "completion_tokens", "queue_depth")


def _queue_depths() -> dict[str, int]:
    projects = [p for p in map(project_id_from_queue, active_queues()) if p is not None]
    depths = queue_depths(projects) if projects else []
    return {str(p): d for p, d in zip(projects, depths, strict=True) if isinstance(d, int)}


def project_figures() -> dict[str, dict[str, int]]:
    """The figures per project label: at most METRICS_TOP_PROJECTS ids, plus "other"."""
    since = timezone.now() - WINDOW
    rows = (
        RunUsage.objects.filter(recorded_at__gte=since)
        .values("project_id")
        .annotate(
            runs=Count("run_id"),
            errors=Count("run_id", filter=Q(outcome="error")),
            prompt_tokens=Sum("prompt_tokens"),
            completion_tokens=Sum("completion_tokens"),
        )
    )
    figures: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(FIELDS, 0))
    for row in rows:
        project = str(row.pop("project_id"))
        figures[project].update({k: int(v or 0) for k, v in row.items()})
    for project, depth in _queue_depths().items():
        figures[project]["queue_depth"] = depth
    ranked = sorted(
        figures,
        key=lambda p: (figures[p]["prompt_tokens"] + figures[p]["completion_tokens"],
                       figures[p]["queue_depth"]),
        reverse=True,
    )  # fmt: skip
    top = set(ranked[: settings.METRICS_TOP_PROJECTS])
    out: dict[str, dict[str, int]] = {p: figures[p] for p in ranked if p in top}
    out[OTHER] = dict.fromkeys(FIELDS, 0)
    for project in ranked:
        if project not in top:
            for name in FIELDS:
                out[OTHER][name] += figures[project][name]
    return out


class _Collector:
    def collect(self):
        figures = project_figures()
        families = {
            "runs": GaugeMetricFamily(
                "uws_project_runs_24h",
                "Agent runs recorded in the last 24 hours.",
                labels=["project"],
            ),
            "errors": GaugeMetricFamily(
                "uws_project_run_errors_24h",
                "Agent runs that ended in error in the last 24 hours.",
                labels=["project"],
            ),
            "tokens": GaugeMetricFamily(
                "uws_project_tokens_24h",
                "Tokens of the last 24 hours' runs (reported or estimated).",
                labels=["project", "kind"],
            ),
            "queue_depth": GaugeMetricFamily(
                "uws_project_queue_depth",
                "Tasks waiting on the project's queue.",
                labels=["project"],
            ),
        }
        # Names beside the ids (Prometheus' info idiom: join on `project` to label by name).
        info = GaugeMetricFamily(
            "uws_project_info", "A project's name, by its id (value always 1).",
            labels=["project", "name"],
        )  # fmt: skip
        ids = [p for p in figures if p != OTHER]
        for project_id, name in Project.objects.filter(id__in=ids).values_list("id", "name"):
            info.add_metric([str(project_id), name], 1)
        families["info"] = info
        for project, values in figures.items():
            families["runs"].add_metric([project], values["runs"])
            families["errors"].add_metric([project], values["errors"])
            families["tokens"].add_metric([project, "prompt"], values["prompt_tokens"])
            families["tokens"].add_metric([project, "completion"], values["completion_tokens"])
            families["queue_depth"].add_metric([project], values["queue_depth"])
        yield from families.values()


# Metric families of apps above this one (e.g. llm's shared limits), registered by them:
# each a callable returning metric families, called at every scrape.
_sources: list = []


def register_metrics_source(source) -> None:
    if source not in _sources:
        _sources.append(source)


class _FlowCollector:
    """The AgentBus's flow control, per project: tasks the shared workers took (and of
    them from the bulk lane), and takes refused at the project's cap (waits). Counters
    since the bus's Redis began; same top-N labelling as the other families."""

    def collect(self):
        counters = flow_counters()
        ranked = sorted(counters, key=lambda p: counters[p]["served"], reverse=True)
        top = ranked[: settings.METRICS_TOP_PROJECTS]
        rows = {p: counters[p] for p in top}
        other = {"served": 0, "bulk": 0, "capped": 0}
        for project in ranked[len(top) :]:
            for name in other:
                other[name] += counters[project][name]
        rows[OTHER] = other
        served = CounterMetricFamily(
            "uws_flow_served",
            "Tasks the shared workers took, per lane.",
            labels=["project", "lane"],
        )
        waits = CounterMetricFamily(
            "uws_flow_cap_waits",
            "Takes that found the project at its cap (its tasks waited in its queue).",
            labels=["project"],
        )
        for project, values in rows.items():
            served.add_metric([project, "interactive"], values["served"] - values["bulk"])
            served.add_metric([project, "bulk"], values["bulk"])
            waits.add_metric([project], values["capped"])
        yield served
        yield waits
        for source in _sources:
            yield from source()


def project_collectors() -> list:
    """The per-project gauges and the bus's flow control, for a registry of the
    caller's."""
    return [_Collector(), _FlowCollector()]


def metrics_render() -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    registry.register(_FlowCollector())
    return generate_latest(registry)
