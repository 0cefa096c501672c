"""Operators' metrics: Prometheus text, staff only, per project with bounded labels."""

from __future__ import annotations

import uuid

import pytest
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families
from rest_framework.test import APIClient

from governance.models import RunUsage
from tests.factories import ProjectFactory
from tests.governance.conftest import key_client, messages_url

pytestmark = pytest.mark.django_db


def _run(project, tokens, outcome="done"):
    now = timezone.now()
    RunUsage.objects.create(
        run_id=uuid.uuid4(),
        project_id=project.id,
        user_id=project.owner_id,
        agent_id=uuid.uuid4(),
        message_id=1,
        prompt_tokens=tokens,
        completion_tokens=1,
        total_tokens=tokens + 1,
        outcome=outcome,
        created_at=now,
        day=now.date(),
        recorded_at=now,
    )


def scrape(client) -> dict[tuple, float]:
    response = client.get("/admin/metrics")
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.content.decode())
        for sample in family.samples
    }


@pytest.mark.django_db(transaction=True)  # the message's run is published after commit
def test_metrics_per_project_with_the_rest_as_other(api, user, session, settings):
    settings.METRICS_TOP_PROJECTS = 2
    user.is_staff = True
    user.save(update_fields=["is_staff"])
    big, middle, small = ProjectFactory(), ProjectFactory(), ProjectFactory()
    _run(big, 1000)
    _run(middle, 500, outcome="error")
    _run(small, 10)
    _run(small, 20, outcome="error")
    # A message with no worker: a task waits on its project's queue.
    assert api.post(messages_url(session), {"content": "hi"}, format="json").status_code == 202

    samples = scrape(api)
    runs = {dict(k[1])["project"]: v for k, v in samples.items() if k[0] == "uws_project_runs_24h"}
    assert runs == {str(big.id): 1, str(middle.id): 1, "other": 2}  # session's: no usage yet
    errors = {
        dict(k[1])["project"]: v for k, v in samples.items() if k[0] == "uws_project_run_errors_24h"
    }
    assert errors == {str(big.id): 0, str(middle.id): 1, "other": 1}
    prompt = samples[("uws_project_tokens_24h", (("kind", "prompt"), ("project", "other")))]
    assert prompt == 30
    depth = {
        dict(k[1])["project"]: v for k, v in samples.items() if k[0] == "uws_project_queue_depth"
    }
    # The session's project ranks below the two: its queue counts in "other".
    assert str(session.project_id) not in depth and depth["other"] >= 1

    settings.METRICS_TOP_PROJECTS = 10_000
    depth = {
        dict(k[1])["project"]: v
        for k, v in scrape(api).items()
        if k[0] == "uws_project_queue_depth"
    }
    assert depth[str(session.project_id)] == 1 and depth["other"] == 0
    assert len(depth) <= 10_001


def test_metrics_are_for_staff_only(api, user, project, make_key):
    assert APIClient().get("/admin/metrics").status_code == 401
    assert api.get("/admin/metrics").status_code == 403
    raw, _ = make_key(project, ["read", "write", "chat"])
    user.is_staff = True
    user.save(update_fields=["is_staff"])
    assert key_client(raw).get("/admin/metrics").status_code == 403
    assert api.get("/admin/metrics").status_code == 200
