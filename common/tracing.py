"""OpenTelemetry traces: one trace per chat message, from the POST through the bus to the
worker's provider and tool calls and the run's end.

Off by default, and free when off: `span()` hands back one shared no-op object, nothing
is imported from the SDK, and nothing is added to messages. It is on in a process that
called `tracing_setup()` (the ASGI/WSGI entry points and Celery workers do) with the
standard variables saying where spans go:

- `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`: OTLP over HTTP
  (protobuf), e.g. `http://127.0.0.1:4318` (the collector's `/v1/traces` is appended);
- or `OTEL_TRACES_EXPORTER=otlp|console` (`none` turns tracing off, as does
  `OTEL_SDK_DISABLED=true`); `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
  `OTEL_BSP_*`, `OTEL_TRACES_SAMPLER*` as the SDK reads them;
  `OTEL_PYTHON_DISABLED_INSTRUMENTATIONS` names the instrumentations left out: unset,
  `redis,psycopg` (a span per Redis command or SQL statement would be two thirds of a
  message's spans and most of tracing's cost); `none` turns every one on.

Context crosses the bus in the task message's headers (W3C `traceparent`, injected by
the Celery instrumentation when the bus publishes, see agentbus.publish), so the
worker's spans are children of the web request's.

For code of any app: `with span("name", key=value) as s: ... s.set_attribute(...)`.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any

logger = logging.getLogger(__name__)

_enabled = False
_tracer: Any = None
# opentelemetry.trace once tracing is on (the SDK is not imported while it is off).
_trace_api: Any = None
_setup_lock = threading.Lock()
# The message header carrying when the bus took the message (seconds since the epoch),
# for the queue-wait span and metric.
PUBLISHED_AT_HEADER = "uws_published_at"


def tracing_wanted(environ: dict[str, str] | None = None) -> bool:
    """Whether the standard OTEL_* variables ask for traces."""
    environ = os.environ if environ is None else environ
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return bool(
        exporter
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


# A span per Redis command or SQL statement is ~40 spans of a chat message's ~60, and
# each costs ~0.08 ms of CPU with its export (bench/tracing_cost.py): off unless asked for.
DEFAULT_DISABLED = "redis,psycopg"


def disabled_instrumentations(environ: dict[str, str] | None = None) -> set[str]:
    """The instrumentations left out: OTEL_PYTHON_DISABLED_INSTRUMENTATIONS (the standard
    list), `redis,psycopg` when it is unset; `none` (or empty) leaves none out."""
    environ = os.environ if environ is None else environ
    value = environ.get("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", DEFAULT_DISABLED)
    names = {name.strip().lower() for name in value.split(",")} - {"", "none"}
    return names


def tracing_enabled() -> bool:
    return _enabled


def tracing_setup(service: str) -> bool:
    """Turn tracing on in this process when the environment asks for it (idempotent):
    the tracer provider and its exporter, and the maintained instrumentations of Celery,
    Redis, psycopg and httpx. The web entry points add the ASGI / Django one. `service`
    is the default `service.name` (OTEL_SERVICE_NAME wins)."""
    global _enabled, _tracer, _trace_api
    if _enabled or not tracing_wanted():
        return _enabled
    with _setup_lock:
        if _enabled:
            return True
        # The SDK and instrumentations are imported only here: a process with tracing
        # off never loads them.
        from opentelemetry import trace
        from opentelemetry.instrumentation.celery import CeleryInstrumentor
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
        from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
        from opentelemetry.instrumentation.redis import RedisInstrumentor
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

        attributes = {}
        if not os.environ.get("OTEL_SERVICE_NAME"):
            attributes[SERVICE_NAME] = service
        provider = TracerProvider(resource=Resource.create(attributes))
        exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
        for name in (n.strip() for n in exporter_name.split(",")):
            if name == "console":
                provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
            elif name == "otlp":
                # Only the exporter asked for is loaded (the OTLP one pulls in protobuf).
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                    OTLPSpanExporter,
                )

                provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            else:
                logger.warning("OTEL_TRACES_EXPORTER=%s is not supported here: ignored", name)
        trace.set_tracer_provider(provider)
        disabled = disabled_instrumentations()
        instrumentors = {
            "celery": lambda: CeleryInstrumentor().instrument(),
            "redis": lambda: RedisInstrumentor().instrument(),
            "psycopg": lambda: PsycopgInstrumentor().instrument(enable_commenter=False),
            "httpx": lambda: HTTPXClientInstrumentor().instrument(),
        }
        for name, instrument in instrumentors.items():
            if name not in disabled:
                instrument()
        _tracer = trace.get_tracer("uws")
        _trace_api = trace
        _enabled = True
        logger.info("tracing on: service %s, exporter %s", service, exporter_name)
        return True


def tracing_shutdown() -> None:
    """Export what is buffered (a process about to exit)."""
    if not _enabled:
        return
    from opentelemetry import trace  # the SDK loads only with tracing on (see tracing_setup)

    provider = trace.get_tracer_provider()
    shutdown = getattr(provider, "force_flush", None)
    if shutdown is not None:
        shutdown()


def asgi_traced(application):
    """The ASGI application wrapped in OpenTelemetry's ASGI middleware (a server span per
    request, async: no thread per request), or unchanged when tracing is off."""
    if not _enabled:
        return application
    # The SDK loads only with tracing on (see tracing_setup).
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    # One span per request, not one per chunk sent or received (event streams send many),
    # named by the route's shape: ids out of span names (they are in the attributes).
    return OpenTelemetryMiddleware(
        application, exclude_spans=["receive", "send"], default_span_details=_span_details
    )


_ID_SEGMENT = re.compile(r"/(?:[0-9a-fA-F]{8}-?(?:[0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}|\d+)(?=/|$)")


def _span_details(scope: dict) -> tuple[str, dict]:
    method = scope.get("method") or scope.get("type", "").upper()
    return f"{method} {_ID_SEGMENT.sub('/{id}', scope.get('path', ''))}", {}


def django_instrument() -> None:
    """The WSGI entry point's request spans (Django's middleware; under ASGI the ASGI
    middleware does it without a sync step per request)."""
    if not _enabled:
        return
    # The SDK loads only with tracing on (see tracing_setup).
    from opentelemetry.instrumentation.django import DjangoInstrumentor

    DjangoInstrumentor().instrument()


class _NoSpan:
    """What `span()` yields when tracing is off: every method does nothing."""

    __slots__ = ()

    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def set_attributes(self, attributes: dict[str, Any]) -> None:
        pass

    def record_exception(self, exc: BaseException, **kwargs) -> None:
        pass

    def set_status(self, *args, **kwargs) -> None:
        pass

    def add_event(self, name: str, attributes: dict[str, Any] | None = None) -> None:
        pass

    def is_recording(self) -> bool:
        return False

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False


NO_SPAN = _NoSpan()


def _clean(attributes: dict[str, Any]) -> dict[str, Any] | None:
    if not attributes:
        return None
    return {
        k: (v if isinstance(v, str | bool | int | float) else str(v))
        for k, v in attributes.items()
        if v is not None
    }


def span(name: str, *, start_time: float | None = None, **attributes: Any):
    """A context manager: a child span of the current one named `name` (with
    `attributes`; None values are left out), current inside the block; an exception
    leaving the block is recorded on it. With tracing off, the shared no-op."""
    if not _enabled:
        return NO_SPAN
    if start_time is None:
        return _tracer.start_as_current_span(name, attributes=_clean(attributes))
    return _tracer.start_as_current_span(
        name, attributes=_clean(attributes), start_time=int(start_time * 1e9)
    )


def span_between(name: str, *, start: float, end: float | None = None, **attributes: Any) -> None:
    """A finished span for an interval that already happened (a message's wait on its
    queue), child of the current span. Seconds since the epoch."""
    if not _enabled:
        return
    end = time.time() if end is None else end
    s = _tracer.start_span(name, attributes=_clean(attributes), start_time=int(start * 1e9))
    s.end(end_time=int(max(end, start) * 1e9))


def current_trace_id() -> str:
    """The current trace's id as 32 hex digits, or "" (tracing off, or no trace)."""
    if not _enabled:
        return ""
    ctx = _trace_api.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def current_ids() -> tuple[str, str]:
    """(trace id, span id) of the current span, or ("", "")."""
    if not _enabled:
        return "", ""
    ctx = _trace_api.get_current_span().get_span_context()
    if not ctx.is_valid:
        return "", ""
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def in_context(function: Callable) -> Callable:
    """`function` bound to the caller's context (the current span, the log context), for
    a thread pool: a call run on another thread stays a child of this one."""
    ctx = contextvars.copy_context()
    return lambda *args, **kwargs: ctx.copy().run(function, *args, **kwargs)


def publish_headers() -> dict[str, Any] | None:
    """Headers the bus adds to a message while tracing is on: the current trace context
    (W3C `traceparent`, whatever instruments the broker client); None when off."""
    if not _enabled:
        return None
    # The SDK loads only with tracing on (see tracing_setup).
    from opentelemetry.propagate import inject

    headers: dict[str, Any] = {}
    inject(headers)
    return headers


# Ids of the work at hand (project, run, ...) for log lines; see log_context.
_NO_IDS: Mapping[str, str] = MappingProxyType({})
LOG_CONTEXT: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "uws_log_context", default=_NO_IDS
)


@contextmanager
def log_context(**ids: Any) -> Iterator[None]:
    """Ids (project, run, ...) every log line inside the block carries (see
    common.logging.ContextFilter)."""
    token = LOG_CONTEXT.set({**LOG_CONTEXT.get(), **{k: str(v) for k, v in ids.items() if v}})
    try:
        yield
    finally:
        LOG_CONTEXT.reset(token)
