"""Requests that wait for a worker's answer, served under ASGI without holding a thread
or a database connection while they wait.

`GET …/agents/{agent_id}/context/?q=` (a context search) waits up to
CONTEXT_SEARCH_TIMEOUT_SECONDS for the worker that owns the vector store. Served by a
sync view, each waiting request would hold a thread (and, in it, a database
connection) the whole time: a burst of searches from one user would exhaust both for
everyone. Here the request authenticates and reads the database in short sync steps
(the connection goes back at once), then waits on the reply through the process's
stream hub (realtime.streamhub), like an event stream. The other methods of the route
are the DRF view's (context.apis), as is the schema.
"""

from __future__ import annotations

import asyncio
import uuid

import redis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import Http404, HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from rest_framework import exceptions
from rest_framework.settings import api_settings

from agentbus import ProjectGone, publish
from agents.selectors import agent_get_in
from common.api import BackendUnavailable, exception_handler
from common.asgi import long_lived, run_sync
from realtime import replies
from realtime.auth import request_authorize
from realtime.streamhub import HubFull, get_hub
from workspaces.redis import workspace_prefix

from .apis import AgentContextApi, ContextHitSerializer, ContextSearchSerializer
from .services import (
    ContextUnavailable,
    TooManySearches,
    context_search_task_kwargs,
    search_answer,
    search_limits,
)
from .tasks import search_context

_context_view = AgentContextApi.as_view()


def _error(exc: Exception, request: HttpRequest, retry_after: int | None = None) -> JsonResponse:
    """The error as a DRF view would answer it (common.api.exception_handler's shape)."""
    response = exception_handler(exc, {"request": request})
    out = JsonResponse(response.data, status=response.status_code)
    for name in ("Retry-After",):
        if name in response:
            out[name] = response[name]
    if retry_after is not None:
        out["Retry-After"] = str(retry_after)
    if isinstance(exc, exceptions.NotAuthenticated | exceptions.AuthenticationFailed):
        auth = api_settings.DEFAULT_AUTHENTICATION_CLASSES[0]()
        out["WWW-Authenticate"] = auth.authenticate_header(request)
    return out


# csrf_exempt as DRF's views are: its view checks CSRF itself for session-authenticated
# requests, and token clients have no CSRF cookie to show.
@csrf_exempt
@long_lived(methods=("GET",))
async def agent_context(request: HttpRequest, project_id: uuid.UUID, agent_id: uuid.UUID):
    """The context route: a search waits here; adding and clearing are the DRF view's."""
    if request.method != "GET":
        return await sync_to_async(_context_view)(request, project_id=project_id, agent_id=agent_id)
    try:
        agent, query = await run_sync(_prepare, request, project_id, agent_id)
        hits = await context_search_waiting(agent=agent, **query)
    except HubFull:
        return _error(
            BackendUnavailable(
                "This server has as many requests waiting as it may; retry shortly."
            ),
            request,
            retry_after=settings.SSE_RETRY_AFTER_SECONDS,
        )
    except ContextUnavailable as exc:
        return _error(BackendUnavailable(f"Context search unavailable: {exc}."), request)
    except ProjectGone:
        return _error(Http404(), request)
    except (exceptions.APIException, Http404, redis.RedisError) as exc:
        return _error(exc, request)
    return JsonResponse({"results": ContextHitSerializer(hits, many=True).data})


def _prepare(request: HttpRequest, project_id, agent_id):
    """Authentication, throttling, scoping and validation, as the DRF view does them
    (realtime.auth); the database connection goes back before the wait."""

    def agent_and_query(drf_request, projects):
        agent = agent_get_in(projects=projects, agent_id=agent_id)  # its project with it
        # A plain dict: DRF reads an empty `?k=` in a QueryDict as "not given".
        query = ContextSearchSerializer(data=request.GET.dict())
        query.is_valid(raise_exception=True)
        return agent, dict(query.validated_data)

    return request_authorize(
        request,
        project_id=project_id,
        throttle_scopes=AgentContextApi.throttle_scopes,
        then=agent_and_query,
    )


async def context_search_waiting(*, agent, q: str, k: int, mode: str = "") -> list[dict]:
    """Search the agent's context on a worker (the vector store lives there), waiting on
    the process's hub for the reply, at most CONTEXT_SEARCH_TIMEOUT_SECONDS; at most
    SEARCH_INFLIGHT_PER_USER / _PER_PROJECT wait at once (TooManySearches, a 429)."""
    timeout = settings.CONTEXT_SEARCH_TIMEOUT_SECONDS
    project = agent.project
    hub = get_hub()
    prefix = workspace_prefix(project.owner_id, project.id)
    counters = replies.inflight_keys(user_id=project.owner_id, project_prefix=prefix, kind="search")
    if not await hub.client.eval(replies.ADMIT, len(counters), *counters, *search_limits()):
        raise TooManySearches(wait=1)
    request_id = str(uuid.uuid4())
    reply = prefix + replies.reply_key(request_id)
    try:
        # Subscribed before the task goes out: the reply cannot come before we listen.
        async with hub.subscribe(key=reply, project_id=project.id, cursor="0-0") as sub:
            kwargs = context_search_task_kwargs(
                agent=agent, request_id=request_id, query=q, k=k, timeout=timeout, mode=mode
            )
            await sync_to_async(publish, thread_sensitive=False)(
                search_context, project_id=project.id, kwargs=kwargs
            )
            try:
                entries = await asyncio.wait_for(sub.inbox.get(), timeout=timeout)
            except TimeoutError:
                entries = None
        answer = None
        if entries and entries != "closed":
            answer = replies.reply_payload(entries[0][1])
        return search_answer(answer, timeout=timeout)
    finally:
        pipe = hub.client.pipeline(transaction=False)
        for counter in counters:
            pipe.decr(counter)
        pipe.delete(reply)
        await pipe.execute()


# The schema (drf-spectacular) documents the route from the DRF view, whose methods and
# serializers it shares; DRF's own as_view() marks its views the same way.
agent_context.cls = AgentContextApi
agent_context.initkwargs = {}
