"""Flower's Tasks page names the project next to a project queue (bin/flowerconfig.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

from agentbus.queues import MAINTENANCE_QUEUE, project_queue
from tests.factories import ProjectFactory

CONFIG = Path(__file__).resolve().parents[2] / "bin" / "flowerconfig.py"


@pytest.fixture
def flowerconfig():
    spec = importlib.util.spec_from_file_location("flowerconfig", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_project_queue_shows_its_project_name(transactional_db, flowerconfig):
    project = ProjectFactory(name="Support bot")
    queue = project_queue(project.id)
    task = flowerconfig.format_task(SimpleNamespace(routing_key=queue))
    assert task.routing_key == f"{queue} (Support bot)"  # the queue name stays as it is
    assert "routing_key" in flowerconfig.tasks_columns.split(",")


def test_other_queues_and_deleted_projects_are_left_alone(transactional_db, flowerconfig):
    for queue in (MAINTENANCE_QUEUE, project_queue("00000000-0000-4000-8000-000000000000"), ""):
        assert flowerconfig.format_task(SimpleNamespace(routing_key=queue)).routing_key == queue


def test_a_task_event_without_its_routing_key_is_named_from_its_project(
    transactional_db, flowerconfig
):
    project = ProjectFactory(name="Billing")
    kwargs = repr({"user_id": project.owner_id, "project_id": str(project.id)})
    task = flowerconfig.format_task(SimpleNamespace(routing_key=None, kwargs=kwargs))
    assert task.routing_key == f"{project_queue(project.id)} (Billing)"
