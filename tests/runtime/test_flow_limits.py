"""Shared limits on a provider endpoint (llm.limits): requests per minute across every
caller, the endpoint's own 429 with Retry-After, and the run's deadline. Against the
local OpenAI-compatible server with a rate limit of its own, on a real Redis."""

from __future__ import annotations

import threading
import time

import pytest

from governance.providers import ProjectLLM
from llm.limits import STATS_KEY, LimitDeadline, hold_off, limit_for, wait_for_turn
from llm.openai_api import OpenAIProvider, openai_client
from llm.providers import ChatRequest, ProviderError, get_provider


def _ask(model: str = "m", deadline: float | None = None) -> str:
    provider = OpenAIProvider(openai_client())
    request = ChatRequest(
        model=model, messages=[{"role": "user", "content": "hi"}], deadline=deadline
    )
    return "".join(part for part in provider.stream(request) if isinstance(part, str))


def test_callers_sharing_an_endpoint_never_exceed_its_limit(fake_openai, runtime_settings):
    fake_openai.rate_limit, fake_openai.rate_window = 4, 1.0  # the server's own limit
    # The window is a minute; a limit of 4 per minute checked by the server per second
    # means any request beyond the shared limit would be seen as a 429 there.
    runtime_settings.FLOW_LIMITS = {"*": {"rpm": 4}}
    answers, errors = [], []

    def call():
        try:
            answers.append(_ask(deadline=time.monotonic() + 0.5))
        except ProviderError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(answers) == 4 and fake_openai.rejected == 0
    # The two over the limit end at their deadline, named for it (never a 429).
    assert len(errors) == 2 and all(isinstance(e, LimitDeadline) for e in errors)
    assert len(fake_openai.requests) == 4


def test_a_429_is_waited_out_with_its_retry_after_and_the_run_succeeds(
    fake_openai, runtime_settings, redis_client
):
    fake_openai.rate_limit, fake_openai.rate_window = 1, 0.6
    fake_openai.retry_after = 0.3
    runtime_settings.FLOW_LIMITS = {"*": {"rpm": 1000}}
    runtime_settings.LLM_MAX_RETRIES = 0  # a 429 is not a failure: no retry is spent
    deadline = time.monotonic() + 10
    assert _ask(deadline=deadline) == "Hello from the model."
    started = time.monotonic()
    assert _ask(deadline=deadline) == "Hello from the model."
    assert fake_openai.rejected >= 1
    assert time.monotonic() - started >= 0.3  # it waited the Retry-After at least
    limit = limit_for(fake_openai.base_url, "m")
    assert int(redis_client.hget(STATS_KEY, f"throttled:{limit.name}")) >= 1


def test_a_429_past_the_deadline_ends_the_run_with_a_clear_error(fake_openai, runtime_settings):
    fake_openai.rate_limit, fake_openai.rate_window = 1, 30
    fake_openai.retry_after = 20
    _ask()
    with pytest.raises(LimitDeadline, match="deadline"):
        _ask(deadline=time.monotonic() + 2)


def test_each_model_of_an_endpoint_has_a_window_of_its_own(fake_openai, runtime_settings):
    runtime_settings.FLOW_LIMITS = {fake_openai.base_url: {"rpm": 1}}
    assert _ask(model="a") and _ask(model="b")
    with pytest.raises(LimitDeadline):
        _ask(model="a", deadline=time.monotonic() + 0.3)


def test_tokens_per_minute_count_what_calls_are_estimated_to_use(runtime_settings):
    runtime_settings.FLOW_LIMITS = {"*": {"tpm": 100}}
    limit = limit_for("http://endpoint.invalid/v1", "m")
    wait_for_turn(limit, tokens=60)
    with pytest.raises(LimitDeadline, match="tpm"):
        wait_for_turn(limit, tokens=60, deadline=time.monotonic() + 0.2)
    wait_for_turn(limit, tokens=40)  # what is left of the window
    assert limit_for("http://other.invalid", "m").tpm == 100
    runtime_settings.FLOW_LIMITS = {}
    assert limit_for("http://endpoint.invalid/v1", "m") is None


def test_a_streamed_tool_call_is_counted_with_the_tokens_the_endpoint_reported(
    fake_openai, runtime_settings, redis_client
):
    runtime_settings.FLOW_LIMITS = {"*": {"rpm": 10, "tpm": 10_000}}
    fake_openai.every_turn = {"tool_calls": [("search_context", {"query": "x"})]}
    tool = {"type": "function", "function": {"name": "search_context", "parameters": {}}}
    provider = OpenAIProvider(openai_client())
    request = ChatRequest(model="m", messages=[{"role": "user", "content": "?"}], tools=[tool])
    parts = list(provider.stream(request))
    assert [p.name for p in parts] == ["search_context"]
    limit = limit_for(fake_openai.base_url, "m")
    entries = redis_client.zrange(limit.keys()[1], 0, -1)
    counted = sum(int(e.rsplit(":", 1)[1]) for e in entries)
    assert counted == 26  # the usage the endpoint reported (21 + 5), not the estimate
    assert redis_client.zcard(limit.keys()[0]) == 1
    # Every entry is the call's own (its place's id), the correction included.
    assert len({e.split(":", 1)[0] for e in entries}) == 1
    assert entries[0].split(":", 1)[0] in redis_client.zrange(limit.keys()[0], 0, -1)


def test_a_projects_own_key_is_limited_apart_from_the_deployments(
    fake_openai, runtime_settings, redis_client
):
    """An endpoint limits each key: a project calling the deployment's endpoint with a
    key of its own takes no place of the deployment's key, and a 429 its key earns holds
    off only its own calls."""
    runtime_settings.FLOW_LIMITS = {"*": {"rpm": 1}}
    # What a run of a project with a key of its own gets (the deployment's endpoint).
    tenant = get_provider("m", llm=ProjectLLM(api_key="project-key"))
    request = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    assert "".join(p for p in tenant.stream(request) if isinstance(p, str))
    assert _ask(deadline=time.monotonic() + 0.3)  # the deployment's place is still free
    ours = limit_for(fake_openai.base_url, "m", own_key="project-key")
    deployment = limit_for(fake_openai.base_url, "m")
    assert ours.keys()[0] != deployment.keys()[0] and "project-key" not in ours.keys()[0]
    assert redis_client.zcard(ours.keys()[0]) == redis_client.zcard(deployment.keys()[0]) == 1

    runtime_settings.FLOW_LIMITS = {"*": {"rpm": 1000}}
    ours = limit_for(fake_openai.base_url, "m", own_key="project-key")
    deployment = limit_for(fake_openai.base_url, "m")
    hold_off(ours, 30)  # the project's key got a 429
    wait_for_turn(deployment, tokens=1, deadline=time.monotonic() + 0.3)  # not held off
    with pytest.raises(LimitDeadline):
        wait_for_turn(ours, tokens=1, deadline=time.monotonic() + 0.3)
