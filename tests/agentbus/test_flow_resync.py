"""Projects' flow rules come back into the bus's Redis after it lost them: the periodic
re-sync (workspaces.flow_sync, beat's `workspaces.flow_rules_resync`) writes what the
database holds, drops what it does not, and never overwrites a newer save."""

from __future__ import annotations

import pytest
from django.conf import settings

from agentbus.flow import flow_rules_set, flow_rules_stored, flow_rules_sync, flow_status
from agentbus.keys import BULK_SUFFIX, FLOW_PARKED_DUE_FIELD, FLOW_RULES_KEY
from agentbus.queues import project_queue
from projects.models import Project
from projects.services import project_flow_update
from tests.factories import ProjectFactory
from tests.workers import wait_for
from workspaces import tasks
from workspaces.flow_sync import flow_rules_resync


def _rules(redis_client, project) -> str | None:
    return redis_client.hget(FLOW_RULES_KEY, project_queue(project.id))


@pytest.mark.django_db(transaction=True)
def test_rules_flushed_from_redis_come_back_from_the_database(user, redis_client):
    weighted, capped, plain = (ProjectFactory(owner=user) for _ in range(3))
    project_flow_update(project=weighted, data={"flow_weight": 3})
    project_flow_update(project=capped, data={"flow_weight": 2, "flow_max_in_flight": 5})
    assert (_rules(redis_client, weighted), _rules(redis_client, capped)) == ("3 0", "2 5")

    redis_client.delete(FLOW_RULES_KEY)  # Redis lost them: every project has the defaults
    assert flow_status([weighted.id])[str(weighted.id)].weight == 1

    assert flow_rules_resync() == 2
    assert (_rules(redis_client, weighted), _rules(redis_client, capped)) == ("3 0", "2 5")
    assert _rules(redis_client, plain) is None  # defaults: nothing to store
    status = flow_status([weighted.id, capped.id])
    assert status[str(weighted.id)].weight == 3
    assert (status[str(capped.id)].weight, status[str(capped.id)].max_in_flight) == (2, 5)
    assert flow_rules_resync() == 0  # in step: nothing written


@pytest.mark.django_db(transaction=True)
def test_the_periodic_task_runs_on_a_worker(live_worker, user, redis_client):
    project = ProjectFactory(owner=user)
    project_flow_update(project=project, data={"flow_weight": 4, "flow_max_in_flight": 2})
    redis_client.delete(FLOW_RULES_KEY)
    entry = settings.CELERY_BEAT_SCHEDULE["workspaces.flow_rules_resync"]
    assert entry["task"] == tasks.flow_rules_resync.name
    tasks.flow_rules_resync.delay()  # as beat sends it: the maintenance queue
    wait_for(lambda: _rules(redis_client, project) is not None, timeout=30)
    assert _rules(redis_client, project) == "4 2"


@pytest.mark.django_db(transaction=True)
def test_rules_the_database_does_not_hold_are_dropped_and_marks_are_kept(user, redis_client):
    project = ProjectFactory(owner=user)  # default rules in the database
    queue = project_queue(project.id)
    redis_client.hset(FLOW_RULES_KEY, queue, "9 9")  # stale (e.g. restored from a backup)
    redis_client.hset(FLOW_RULES_KEY, queue + BULK_SUFFIX, "1")  # the take's own fields
    redis_client.hset(FLOW_RULES_KEY, FLOW_PARKED_DUE_FIELD, "123.5")
    assert flow_rules_resync() == 1
    assert _rules(redis_client, project) is None
    assert redis_client.hget(FLOW_RULES_KEY, queue + BULK_SUFFIX) == "1"
    assert redis_client.hget(FLOW_RULES_KEY, FLOW_PARKED_DUE_FIELD) == "123.5"


@pytest.mark.django_db(transaction=True)
def test_a_save_after_the_resync_read_redis_keeps_the_newer_rules(user, redis_client):
    project = ProjectFactory(owner=user)
    Project.objects.filter(id=project.id).update(flow_weight=2)
    stored = flow_rules_stored()  # the re-sync's first read: nothing stored
    # A save commits and writes its rules before the re-sync writes what it read.
    flow_rules_set(project_id=project.id, weight=5, max_in_flight=1)
    assert flow_rules_sync(stored=stored, wanted={project.id: "2 0"}) == 0
    assert _rules(redis_client, project) == "5 1"
