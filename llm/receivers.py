"""Health's `llm` check: which endpoint agents answer through and whether it answers."""

from prometheus_client.core import CounterMetricFamily

from governance.metrics import register_metrics_source
from workspaces.sources import register_health_check

from .limits import limit_figures
from .selectors import llm_health

# Not a check that breaks every tenant: a project may answer through its own provider
# credentials while the deployment's endpoint is down.
register_health_check("llm", llm_health)


def limit_metrics():
    """The shared limits (llm.limits) per endpoint|model: waits begun because a window
    was full, seconds waited, 429s the endpoint answered, runs a limit ended."""
    figures = limit_figures()
    families = {
        "hits": CounterMetricFamily(
            "uws_flow_limit_hits", "Calls that found a shared limit full.", labels=["limit"]
        ),
        "wait_seconds": CounterMetricFamily(
            "uws_flow_limit_wait_seconds", "Seconds calls waited for a limit.", labels=["limit"]
        ),
        "throttled": CounterMetricFamily(
            "uws_flow_limit_throttled", "429 answers of the endpoint.", labels=["limit"]
        ),
        "deadline": CounterMetricFamily(
            "uws_flow_limit_deadline", "Runs a limit ended at their deadline.", labels=["limit"]
        ),
    }
    for name, values in sorted(figures.items()):
        for kind, family in families.items():
            family.add_metric([name], values.get(kind, 0.0))
    return list(families.values())


register_metrics_source(limit_metrics)
