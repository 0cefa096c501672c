"""Requests that are no event stream nor waiting search are served as WSGI serves them:
their start, middleware chain and close in one step on a fixed set of threads
(common.asgi), under uvicorn."""

from __future__ import annotations

import threading

import httpx

from projects.models import Project
from tests.runtime.conftest import token_for


def _request_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("request")}


def test_requests_run_on_a_fixed_set_of_threads(asgi, user, settings):
    base = f"http://127.0.0.1:{asgi.port}/my/projects/"
    headers = {"Authorization": f"Token {token_for(user)}"}
    with httpx.Client(headers=headers, timeout=30) as client:
        created = [client.post(base, json={"name": f"p{i}"}) for i in range(3)]
        assert [r.status_code for r in created] == [201] * 3
        listed = [client.get(base) for _ in range(20)]
        # Bad input through the same path: a 400 in the API's shape, nothing written.
        refused = client.post(base, json={"name": ""})
        missing = client.get(base + "00000000-0000-0000-0000-000000000000/")
    assert {r.status_code for r in listed} == {200}
    assert len(listed[-1].json()["projects"]) == 3
    assert refused.status_code == 400 and refused.json()["code"] == "invalid"
    assert missing.status_code == 404
    assert Project.objects.filter(owner=user).count() == 3
    # 25 requests, never more threads than requests admitted at once, all of them reused.
    assert 0 < len(_request_threads()) <= settings.WEB_MAX_CONCURRENT_REQUESTS
