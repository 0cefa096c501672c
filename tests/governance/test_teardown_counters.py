"""A deleted project's quota counters, rate-limit keys and other counters go with its
teardown: nothing of it is left in Redis (checked by SCAN), while its owner's other
project keeps its own."""

from __future__ import annotations

import pytest
from django.conf import settings as django_settings

from common.redis import get_redis
from governance.models import Quota
from tests.factories import AgentFactory, ChatSessionFactory, ProjectFactory
from tests.workers import wait_until
from workspaces.models import WorkspaceTeardown

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def keys_naming(project_id) -> list[str]:
    client = get_redis()
    found = set()
    for spelling in (str(project_id), project_id.hex):
        found |= {k for k in client.scan_iter(match=f"*{spelling}*", count=1000)}
    return sorted(k.decode() if isinstance(k, bytes) else k for k in found)


def test_teardown_leaves_no_quota_throttle_or_counter_key(
    live_worker, api, other_api, user, settings
):
    framework = dict(django_settings.REST_FRAMEWORK)
    framework["DEFAULT_THROTTLE_RATES"] = {
        **framework["DEFAULT_THROTTLE_RATES"],
        "messages_project": "100/min",
    }
    settings.REST_FRAMEWORK = framework
    doomed, kept = ProjectFactory(owner=user), ProjectFactory(owner=user)
    for project in (doomed, kept):
        Quota.objects.create(project=project, messages_per_minute=50, tokens_per_day=100000)
        session = ChatSessionFactory(agent=AgentFactory(project=project, model="offline"))
        url = f"/my/projects/{project.id}/chat/{session.id}/messages/"
        assert api.post(url, {"content": "hi"}, format="json").status_code == 202
    # A stranger's tries (404) are limited apart from the owner's: their limit goes too.
    stranger = f"/my/projects/{doomed.id}/chat/{session.id}/messages/"
    assert other_api.post(stranger, {"content": "x"}, format="json").status_code == 404
    client = get_redis()
    assert list(client.scan_iter(match=f"gov:p:{doomed.id}:*"))  # the counters exist
    # The owner's limit and the stranger's, apart.
    assert len([k for k in keys_naming(doomed.id) if "throttle_messages_project" in k]) == 2

    assert api.delete(f"/my/projects/{doomed.id}/").status_code == 204
    wait_until(
        lambda: WorkspaceTeardown.objects.filter(
            project_id=doomed.id, status=WorkspaceTeardown.Status.DONE
        ).exists(),
        timeout=60,
        what="teardown done",
    )
    # The bus's tombstone stays on purpose (it expires): late tasks of the project are dropped.
    left = [k for k in keys_naming(doomed.id) if not k.startswith("uws:bus:tombstone:")]
    assert left == []
    assert list(client.scan_iter(match=f"gov:p:{kept.id}:*"))  # the other keeps its own
