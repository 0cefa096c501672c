"""A dedicated worker for one project, started by `manage.py agentbus_worker`."""

from __future__ import annotations

import sys
import uuid
from io import StringIO

import pytest
from celery.utils.nodenames import host_format
from django.core.management import CommandError, call_command

from agentbus import active
from agentbus.active import UNFOLLOW_COMMAND
from agentbus.queues import project_queue
from config.celery_app import app
from tests.agentbus import tasks
from tests.agentbus.conftest import send, wait_for, worker_status
from tests.factories import ProjectFactory


def test_the_command_prints_the_dedicated_worker_command(db):
    project = ProjectFactory()
    out = StringIO()
    call_command("agentbus_worker", "--project", str(project.id), "--print", stdout=out)
    line = out.getvalue()
    assert f"-Q {project_queue(project.id)}" in line
    assert "--agentbus-mode dedicated" in line
    assert f"-n project-{project.id.hex}@%h" in line


@pytest.mark.parametrize(
    "args, message",
    [
        (["--project", "nope"], "not a project id"),
        (["--project", str(uuid.UUID(int=1))], "no project"),
        (["--project", str(uuid.UUID(int=1)), "--concurrency", "0"], "at least 1"),
    ],
)
def test_the_command_refuses_bad_input(db, args, message):
    with pytest.raises(CommandError, match=message):
        call_command("agentbus_worker", *args, "--print")


@pytest.mark.slow
@pytest.mark.usefixtures("bus_broker")
def test_a_dedicated_worker_serves_its_project_only(transactional_db, worker_process, bus_broker):
    project = ProjectFactory()
    other = uuid.uuid4()
    name = host_format(f"project-{project.id.hex}@%h")
    worker = worker_process(
        argv=[sys.executable, "manage.py", "agentbus_worker", "--project", str(project.id), "--"],
        name=name,
    )
    status = worker.wait_ready()
    assert status == {
        "mode": "dedicated",
        "queues": [project_queue(project.id)],
        "reconciled_at": None,
        "transport": {
            "redis": "agentbus.transport.Transport",
            "amqp": "kombu.transport.pyamqp.Transport",
        }[bus_broker],
        "cached_poll": bus_broker == "redis",
        "ready_list": False,  # a dedicated worker polls its own queue only
    }

    mine = send(tasks.record, user_id=1, project_id=project.id, kwargs={"tag": "mine"})
    send(tasks.record, user_id=1, project_id=other, kwargs={"tag": "other"})

    assert wait_for(lambda: tasks.effects("mine"), timeout=20) == [mine], worker.log()
    # The other project became active and was announced: a dedicated worker ignores that,
    # and the shared pool's retirement of its own queue too.
    app.control.broadcast(
        UNFOLLOW_COMMAND, arguments={"queues": [project_queue(project.id)]}, reply=False
    )
    # The status request waits in the worker's mailbox behind the broadcast.
    queues = worker_status(name)["queues"]
    assert tasks.effects("other") == []
    assert active.queue_depth(other) == 1
    assert queues == [project_queue(project.id)]
