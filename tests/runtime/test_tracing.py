"""Traces end to end: the web app (uvicorn) and a shared worker (`celery -A config
worker`), each a process of its own with only the standard OTEL_* variables set, export
to a real OTLP/HTTP receiver in this process; one chat message whose answer makes two
tool calls is one trace, web and worker linked through the bus's message headers."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from django.conf import settings
from rest_framework.authtoken.models import Token

from agentbus.queues import MAINTENANCE_QUEUE
from chat.models import Run
from common.logging import ContextFilter, JsonFormatter
from common.tracing import disabled_instrumentations, log_context, tracing_enabled, tracing_wanted
from tests.factories import AgentFactory, ChatSessionFactory
from tests.runtime.otlp_receiver import OtlpReceiver
from tests.runtime.test_tools import http_tool, model_agent
from tests.runtime.tool_server import ToolServer
from tests.workers import ROOT, database_url, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def receiver():
    server = OtlpReceiver().start()
    yield server
    server.stop()


@pytest.fixture
def tool_server():
    server = ToolServer().start()
    yield server
    server.stop()


def _otel_env(receiver) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within 0.1 s, not the default 5 s
        "OTEL_SERVICE_NAME": "",
    }


def _web_env(otel: dict[str, str]) -> dict[str, str]:
    return dict(
        os.environ,
        DJANGO_SETTINGS_MODULE="config.settings.test",
        REDIS_URL=settings.REDIS_URL,
        CELERY_BROKER_URL=settings.CELERY_BROKER_URL,
        DATABASE_URL=database_url(),
        PYTHONUNBUFFERED="1",
        **otel,
    )


class WebProcess:
    """`uvicorn config.asgi:application` as the Procfile starts it, on a free port."""

    def __init__(self, env: dict[str, str], log_path) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "config.asgi:application",
                "--port",
                str(self.port),
                "--lifespan",
                "on",
                "--no-proxy-headers",
            ],  # fmt: skip
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]

    def answers(self) -> bool:
        try:
            urllib.request.urlopen(self.url + "/", timeout=0.5).read()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


def test_tracing_is_off_without_otel_variables():
    assert not tracing_wanted({})
    assert not tracing_wanted({"OTEL_TRACES_EXPORTER": "none"})
    assert not tracing_wanted(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318", "OTEL_SDK_DISABLED": "true"}
    )
    assert tracing_wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"})
    assert tracing_wanted({"OTEL_TRACES_EXPORTER": "console"})
    assert not tracing_enabled()  # the test process itself sets none
    # A span per Redis command or SQL statement only when asked for.
    assert disabled_instrumentations({}) == {"redis", "psycopg"}
    assert disabled_instrumentations({"OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "none"}) == set()
    assert disabled_instrumentations({"OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "httpx"}) == {
        "httpx"
    }


def test_one_message_with_two_tool_calls_is_one_trace_across_web_and_worker(
    transactional_db,
    user,
    project,
    worker_process,
    fake_openai,
    receiver,
    tool_server,
    tmp_path,
):
    otel = _otel_env(receiver)
    web = WebProcess(_web_env(otel), tmp_path / "web.log")
    worker = worker_process(
        "-Q", MAINTENANCE_QUEUE, "-P", "threads", "-c", "4",
        env={
            **otel,
            "QDRANT_PATH": settings.QDRANT_PATH,
            "OPENAI_BASE_URL": fake_openai.base_url,
            "OPENAI_API_KEY": "test-key",
            "LLM_MAX_RETRIES": "0",
            "EGRESS_ALLOW_NETWORKS_TOOLS": "127.0.0.0/8",
            "WORKER_LOG_EACH_TASK": "true",
        },
    )  # fmt: skip
    try:
        worker.wait_ready()
        assert wait_until(web.answers, timeout=60, what="the web process answers"), web.log()

        agent = model_agent(project)
        http_tool(agent, tool_server, name="first", path="/echo/{city}")
        http_tool(agent, tool_server, name="second", path="/echo/{city}")
        session = ChatSessionFactory(agent=agent, project=project)
        fake_openai.turns = [
            {"tool_calls": [("first", {"city": "Oslo"}), ("second", {"city": "Rome"})]}
        ]
        token = Token.objects.get_or_create(user=user)[0].key
        request = urllib.request.Request(
            f"{web.url}/my/projects/{project.id}/chat/{session.id}/messages/",
            data=json.dumps({"content": "Weather in both?"}).encode(),
            headers={"Authorization": f"Token {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 202
            answer_id = json.loads(response.read())["assistant_message_id"]

        run = wait_until(
            lambda: Run.objects.filter(message_id=answer_id, status__in=Run.FINISHED).first(),
            timeout=60,
            what="the run ended",
        )
        assert run.status == Run.Status.DONE, (run.error, worker.log())
        assert len(run.trace_id) == 32 and int(run.trace_id, 16), run.trace_id
        assert len(tool_server.requests) == 2

        # The task's span ends last (after the run's end): wait for it to be exported.
        def whole():
            spans = receiver.trace(run.trace_id)
            ended = {s["name"] for s in spans}
            return spans if {"run.end", "run/agents.run_agent"} <= ended else None

        spans = wait_until(whole, timeout=30, what="the run's spans exported")
        names = [s["name"] for s in spans]
        by_id = {s["span_id"]: s for s in spans}

        # One trace: every span of the work has the run's trace id, and >= 8 of them.
        assert len(spans) >= 8, names
        # Web and worker, linked: the worker's task span is a child of the web's publish.
        services = {s["service"] for s in spans}
        assert {"uws-web", "uws-worker"} <= services, services
        server = [s for s in spans if s["service"] == "uws-web" and s["kind"] == 2]  # SERVER
        assert server and server[0]["parent_id"] == "", server
        assert server[0]["name"] == "POST /my/projects/{id}/chat/{id}/messages/", server
        task = next(s for s in spans if s["name"] == "run/agents.run_agent")
        parent = by_id[task["parent_id"]]
        assert parent["service"] == "uws-web" and parent["kind"] == 4, parent  # PRODUCER
        # Each step of the way is there once (two provider turns, two tool calls).
        for name in ("agentbus.publish", "agentbus.queue_wait", "run.claim",
                     "context.retrieval", "run.end", "chat.run"):  # fmt: skip
            assert names.count(name) == 1, (name, names)
        calls = [s for s in spans if s["name"] == "llm.call"]
        assert len(calls) == 2, names
        assert all(c["attributes"]["gen_ai.request.model"] == "gpt-local" for c in calls)
        assert calls[0]["attributes"]["gen_ai.usage.input_tokens"] == 21
        tools = [s for s in spans if s["name"] == "tool.call"]
        assert sorted(t["attributes"]["uws.tool.name"] for t in tools) == ["first", "second"]
        assert all(t["attributes"]["uws.tool.kind"] == "http" for t in tools)
        assert all(t["attributes"]["uws.tool.status"] == "ok" for t in tools)
        # Every worker span descends from the web request's server span.
        root = server[0]["span_id"]
        for s in spans:
            seen, node = set(), s
            while node["parent_id"] and node["parent_id"] in by_id and node["span_id"] not in seen:
                seen.add(node["span_id"])
                node = by_id[node["parent_id"]]
            assert node["span_id"] == root, (s["name"], s["service"])
        wait_ms = next(s for s in spans if s["name"] == "agentbus.queue_wait")
        assert wait_ms["end"] >= wait_ms["start"]

        # The worker's log lines of the run carry its trace id (Celery's "succeeded"
        # line, logged inside the task's span, with WORKER_LOG_EACH_TASK).
        wait_until(
            lambda: any(
                "agents.run_agent" in line and f"trace={run.trace_id}" in line
                for line in worker.log().splitlines()
            ),
            timeout=10,
            what=f"a worker log line with trace={run.trace_id}:\n{worker.log()}",
        )
    finally:
        web.stop()


def test_a_ratio_sampler_decides_once_per_message_and_the_worker_follows(
    transactional_db, user, project, worker_process, receiver, tmp_path
):
    """OTEL_TRACES_SAMPLER=parentbased_traceidratio on the web (a ratio of 0 here): a
    message left out is left out on the worker too, though the worker samples
    everything it starts itself: the decision travels in the message's headers. A
    caller's own sampled `traceparent` is continued whatever the ratio."""
    otel = _otel_env(receiver)
    web = WebProcess(
        _web_env(
            {
                **otel,
                "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": "0",
            }
        ),
        tmp_path / "web.log",
    )
    worker = worker_process(
        "-Q", MAINTENANCE_QUEUE, "-P", "threads", "-c", "4",
        env={**otel, "OTEL_TRACES_SAMPLER": "parentbased_always_on",
             "QDRANT_PATH": settings.QDRANT_PATH},
    )  # fmt: skip
    try:
        worker.wait_ready()
        assert wait_until(web.answers, timeout=60, what="the web process answers"), web.log()
        session = ChatSessionFactory(agent=AgentFactory(project=project), project=project)
        token = Token.objects.get_or_create(user=user)[0].key
        url = f"{web.url}/my/projects/{project.id}/chat/{session.id}/messages/"

        def send(content: str, **headers: str) -> Run:
            request = urllib.request.Request(
                url,
                data=json.dumps({"content": content}).encode(),
                headers={"Authorization": f"Token {token}", "Content-Type": "application/json",
                         **headers},
            )  # fmt: skip
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status == 202
                answer_id = json.loads(response.read())["assistant_message_id"]
            run = wait_until(
                lambda: Run.objects.filter(message_id=answer_id, status__in=Run.FINISHED).first(),
                timeout=60,
                what="the run ended",
            )
            assert run.status == Run.Status.DONE, (run.error, worker.log())
            return run

        left_out = send("first?")
        # Not recorded, yet one id still follows the message into the worker's log lines.
        assert len(left_out.trace_id) == 32, left_out.trace_id
        caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
        kept = send("second?", traceparent=f"00-{caller_trace}-00f067aa0ba902b7-01")
        assert kept.trace_id == caller_trace

        def whole():
            ended = {s["name"] for s in receiver.trace(caller_trace)}
            return {"run.end", "run/agents.run_agent", "agentbus.publish"} <= ended

        wait_until(whole, timeout=30, what="the caller's trace exported")
        # Each process exports in the order spans end: the first message's would have
        # come before the second's.
        assert receiver.trace(left_out.trace_id) == []
        services = {s["service"] for s in receiver.trace(caller_trace)}
        assert services == {"uws-web", "uws-worker"}, services
    finally:
        web.stop()


def test_log_lines_carry_the_work_ids_and_json_is_one_object_per_line():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("tests.tracing.json")
    log.addHandler(handler)
    log.propagate = False
    try:
        with log_context(project_id="p-1", run_id="r-2"):
            log.warning("inside %s", "the run")
        log.warning("outside")
    finally:
        log.removeHandler(handler)
    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert inside["message"] == "inside the run" and inside["level"] == "WARNING"
    assert inside["project_id"] == "p-1" and inside["run_id"] == "r-2"
    assert "run_id" not in outside and outside["logger"] == "tests.tracing.json"
    assert time.strptime(inside["time"][:19], "%Y-%m-%dT%H:%M:%S")
