"""An agent's search mode (params.search_mode) and a search's (?mode=) are validated:
anything but dense, sparse or hybrid is a 400 that writes and queues nothing."""

import pytest

from agents.models import Agent
from tests.factories import AgentFactory
from tests.runtime.conftest import queued_task_names

pytestmark = pytest.mark.django_db


def test_agent_search_mode_is_checked(api, project):
    url = f"/my/projects/{project.id}/agents/"
    bad = api.post(url, {"name": "a", "params": {"search_mode": "fuzzy"}}, format="json")
    assert bad.status_code == 400 and "search_mode" in bad.content.decode()
    assert not Agent.objects.exists()
    for mode in ("dense", "sparse", "hybrid"):
        ok = api.post(url, {"name": mode, "params": {"search_mode": mode}}, format="json")
        assert ok.status_code == 201, ok.content
        assert ok.json()["params"]["search_mode"] == mode
    agent = Agent.objects.get(name="dense")
    bad = api.patch(f"{url}{agent.id}/", {"params": {"search_mode": 3}}, format="json")
    assert bad.status_code == 400
    agent.refresh_from_db()
    assert agent.params == {"search_mode": "dense"}


@pytest.mark.parametrize("mode", ["fuzzy", "", "DENSE"])
def test_search_mode_of_a_query_is_checked(api, project, mode):
    agent = AgentFactory(project=project)
    url = f"/my/projects/{project.id}/agents/{agent.id}/context/"
    response = api.get(url, {"q": "ERR-4021", "mode": mode})
    assert response.status_code == 400 and "mode" in response.json().get("errors", response.json())
    assert queued_task_names(project.id) == []
