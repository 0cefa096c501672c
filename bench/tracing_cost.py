"""Where tracing's CPU goes, per part, measured in one process (no server, no load swing):
what bench/tracing.py's end-to-end figure is made of.

    .venv/bin/python bench/tracing_cost.py [--spans 20000] [--requests 5000] [--rounds 3]

Per part, CPU time of this process (all its threads, so the batch span processor's
export thread too) divided by the count:
- `span() off`: common.tracing.span with tracing off (the no-op every span site calls);
- `span()`: a span through common.tracing.span with two attributes, ended, and exported
  by the batch span processor with the OTLP/HTTP exporter (protobuf encoding, HTTP POST)
  to an OTLP receiver in this process; the receiver's decoding runs here too, so this
  is an upper bound (a collector would decode elsewhere). Spans are made 500 at a time,
  then flushed, so the processor's queue never drops one;
- `span() sampled out`: the same under a ratio sampler that drops the trace
  (OTEL_TRACES_SAMPLER=traceidratio, ARG=0);
- `inject` / `extract`: the W3C trace context into / out of a message's headers (the
  bus does one of each per message);
- `ASGI request`: OpenTelemetry's ASGI middleware (as config.asgi wraps the app) around
  an app that answers at once: the server span and its attributes, on top of `span()`.

Then a message's estimate: spans per message (bench/tracing.py counts them at the
receiver) but the request's x `span()` + one ASGI request (its server span included,
the bare app's time taken out) + inject + extract. The Celery instrumentation's
signal handlers beyond their spans, and the export's HTTP round trip amortised over a
batch, are in `span()` or left out. Settings: defaults of the SDK (batch span
processor: 2048 queued, 512 per export, 5 s delay); OTEL_BSP_* are honoured.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from common import tracing  # noqa: E402
from tests.runtime.otlp_receiver import OtlpReceiver  # noqa: E402


def per_call(count: int, function, *, flush=None, chunk: int = 500) -> float:
    """CPU microseconds per call of `function` (all threads of this process)."""
    started = time.process_time()
    done = 0
    while done < count:
        n = min(chunk, count - done)
        for _ in range(n):
            function()
        if flush is not None:
            flush()
        done += n
    return (time.process_time() - started) / count * 1e6


SCOPE = {
    "type": "http",
    "method": "POST",
    "path": "/my/projects/0b7a1c7e-1111-2222-3333-444455556666/chat/"
    "0b7a1c7e-1111-2222-3333-444455556667/messages/",
    "raw_path": b"/",
    "query_string": b"",
    "root_path": "",
    "scheme": "http",
    "http_version": "1.1",
    "server": ("127.0.0.1", 8000),
    "client": ("127.0.0.1", 50000),
    "headers": [
        (b"host", b"127.0.0.1:8000"),
        (b"authorization", b"Token 0123456789abcdef"),
        (b"content-type", b"application/json"),
        (b"content-length", b"20"),
        (b"user-agent", b"python-httpx/0.28"),
    ],
}


async def _app(scope, receive, send):
    await receive()
    await send({"type": "http.response.start", "status": 202, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def _receive():
    return {"type": "http.request", "body": b'{"content": "q?"}', "more_body": False}


async def _send(message):
    pass


def asgi_per_request(application, count: int, flush, chunk: int = 500) -> float:
    """CPU microseconds per request through `application` (flushing the batch span
    processor every `chunk` requests: nothing dropped)."""

    async def run():
        for done in range(count):
            await application(dict(SCOPE), _receive, _send)
            if done % chunk == chunk - 1:
                flush()
        flush()

    started = time.process_time()
    asyncio.run(run())
    return (time.process_time() - started) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spans", type=int, default=20000)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--spans-per-message", type=float, default=11.0)
    options = parser.parse_args()

    receiver = OtlpReceiver().start()
    for key in [k for k in os.environ if k.startswith("OTEL_")]:
        del os.environ[key]
    results: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        results.setdefault(name, []).append(value)

    carrier = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    attrs = {"uws.run_id": "0b7a1c7e-1111-2222-3333-444455556666", "uws.retrieval.k": 2}

    def one_span():
        with tracing.span("context.retrieval", **attrs) as s:
            s.set_attribute("uws.retrieval.hits", 2)

    for _ in range(options.rounds):
        add("span() off", per_call(options.spans, one_span))

    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
    assert tracing.tracing_setup("uws-bench")
    provider = trace.get_tracer_provider()
    middleware = tracing.asgi_traced(_app)
    for _ in range(options.rounds):
        with tracing.span("parent"):
            add("span()", per_call(options.spans, one_span, flush=provider.force_flush))
        add("ASGI request", asgi_per_request(middleware, options.requests, provider.force_flush))
        add("ASGI request, bare app", asgi_per_request(_app, options.requests, lambda: None))
        with tracing.span("parent"):
            add("inject", per_call(options.spans, lambda: propagate.inject({})))
        add("extract", per_call(options.spans, lambda: propagate.extract(carrier)))
    provider.force_flush()
    exported = len(receiver.spans)

    # The same span sites under a sampler that records nothing.
    sampled_out = TracerProvider(sampler=TraceIdRatioBased(0.0))
    tracing._tracer = sampled_out.get_tracer("uws")
    for _ in range(options.rounds):
        add("span() sampled out", per_call(options.spans, one_span))
    provider.shutdown()
    receiver.stop()

    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"tracing cost per part: {options.rounds} rounds, {options.spans} spans / "
          f"{options.requests} requests each; load average {os.getloadavg()[0]:.1f}; "
          f"spans received {exported}\n")  # fmt: skip
    print("| part | CPU us min / median / max |")
    print("|---|---|")
    for name, values in results.items():
        print(f"| {name} | {min(values):.1f} / {med[name]:.1f} / {max(values):.1f} |")
    asgi = med["ASGI request"] - med["ASGI request, bare app"]
    others = options.spans_per_message - 1
    total = others * med["span()"] + asgi + med["inject"] + med["extract"]
    print(f"\nper message: {others:g} spans x {med['span()']:.0f} us + ASGI request "
          f"{asgi:.0f} us + inject/extract {med['inject'] + med['extract']:.0f} us = "
          f"{total / 1000:.2f} ms of CPU")  # fmt: skip


if __name__ == "__main__":
    main()
