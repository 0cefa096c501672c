"""`GET /admin/metrics` (and `/admin/metrics/`): Prometheus' text format, with
`Accept: text/plain` (what Prometheus sends) or anything else; staff only."""

from __future__ import annotations

from django.http import HttpResponse
from prometheus_client import CONTENT_TYPE_LATEST
from rest_framework.renderers import BaseRenderer, JSONRenderer

from governance.apis import MetricsApi as ProjectMetricsApi

from .metrics import metrics_render


class PrometheusTextRenderer(BaseRenderer):
    """text/plain: the exposition format; an error (401, 403) as one line of text."""

    media_type = "text/plain"
    format = "txt"
    charset = "utf-8"

    def render(self, data, accepted_media_type=None, renderer_context=None):
        if isinstance(data, bytes | str):
            return data
        detail = data.get("detail", data) if isinstance(data, dict) else data
        return f"# {detail}\n".encode()


class MetricsApi(ProjectMetricsApi):
    """The per-project gauges and the processes' HTTP, Celery and process metrics."""

    renderer_classes = [PrometheusTextRenderer, JSONRenderer]

    def get(self, request):
        return HttpResponse(metrics_render(), content_type=CONTENT_TYPE_LATEST)
