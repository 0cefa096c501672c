"""Another user's project, agent, session or message is a 404 on every route and method.

The matrix walks every per-project route with every method it serves, against ids that
belong to someone else (or to another of the caller's own projects), and checks that
nothing answered anything but 404 and that nothing was written or created for them.
"""

import itertools
import uuid

import pytest
from django.urls import get_resolver

from agents.models import Agent, AgentVersion, MemoryBlock, ProjectSecret, Tool
from automation.models import Schedule, WebhookDelivery, WebhookEndpoint
from automation.schedules import schedule_create
from chat.models import ChatSession, Message, Run
from context.models import ContextDocument
from governance.models import ProjectApiKey, ProviderSettings
from governance.services import api_key_create
from lifecycle.models import ArchiveJob, RetentionPolicy
from projects.models import Project
from tests.factories import AgentFactory, ChatSessionFactory, MessageFactory, ProjectFactory

pytestmark = pytest.mark.django_db

# (route template, methods). Keep in step with the URLconf: test_matrix_covers_every_route.
ROUTES = [
    ("/my/projects/{p}/", ["get", "patch", "delete"]),
    ("/my/projects/{p}/agents/", ["get", "post"]),
    ("/my/projects/{p}/agents/{a}/", ["get", "patch", "delete"]),
    ("/my/projects/{p}/chat/", ["get", "post"]),
    ("/my/projects/{p}/chat/{s}/", ["get", "delete"]),
    ("/my/projects/{p}/chat/{s}/messages/", ["get", "post"]),
    ("/my/projects/{p}/chat/{s}/cancel/", ["post"]),
    ("/my/projects/{p}/chat/{s}/events/", ["get"]),
    ("/my/projects/{p}/agents/{a}/context/", ["get", "post", "delete"]),
    ("/my/projects/{p}/agents/{a}/context/jobs/{j}/", ["get"]),
    ("/my/projects/{p}/keys/", ["get", "post"]),
    ("/my/projects/{p}/keys/{k}/", ["delete"]),
    ("/my/projects/{p}/usage/", ["get"]),
    ("/my/projects/{p}/quotas/", ["get"]),
    ("/my/projects/{p}/provider/", ["get", "put"]),
    ("/my/projects/{p}/audit/", ["get"]),
    ("/my/projects/{p}/agents/{a}/tools/", ["get", "post"]),
    ("/my/projects/{p}/agents/{a}/tools/{t}/", ["get", "patch", "delete"]),
    ("/my/projects/{p}/secrets/", ["get", "post"]),
    ("/my/projects/{p}/secrets/{n}/", ["put", "delete"]),
    ("/my/projects/{p}/chat/{s}/runs/", ["get"]),
    ("/my/projects/{p}/chat/{s}/runs/{r}/", ["get"]),
    ("/my/projects/{p}/chat/{s}/runs/{r}/cancel/", ["post"]),
    ("/my/projects/{p}/chat/{s}/regenerate/", ["post"]),
    ("/my/projects/{p}/runs/{r}/approve/", ["post"]),
    ("/my/projects/{p}/runs/{r}/reject/", ["post"]),
    ("/my/projects/{p}/schedules/", ["get", "post"]),
    ("/my/projects/{p}/schedules/{sc}/", ["get", "patch", "delete"]),
    ("/my/projects/{p}/schedules/{sc}/fires/", ["get"]),
    ("/my/projects/{p}/webhooks/", ["get", "post"]),
    ("/my/projects/{p}/webhooks/{w}/", ["get", "patch", "delete"]),
    ("/my/projects/{p}/webhooks/{w}/rotate-secret/", ["post"]),
    ("/my/projects/{p}/webhooks/{w}/deliveries/", ["get"]),
    ("/my/projects/{p}/webhooks/{w}/deliveries/{d}/replay/", ["post"]),
    ("/my/projects/{p}/agents/{a}/versions/", ["get"]),
    ("/my/projects/{p}/agents/{a}/versions/{v}/", ["get"]),
    ("/my/projects/{p}/agents/{a}/versions/{v}/diff/", ["get"]),
    ("/my/projects/{p}/agents/{a}/versions/{v}/rollback/", ["post"]),
    ("/my/projects/{p}/retention/", ["get", "put"]),
    ("/my/projects/{p}/agents/{a}/context/files/", ["get", "post"]),
    ("/my/projects/{p}/agents/{a}/context/files/{doc}/", ["get", "delete"]),
    ("/my/projects/{p}/agents/{a}/memory/", ["get", "post"]),
    ("/my/projects/{p}/agents/{a}/memory/changes/", ["get"]),
    ("/my/projects/{p}/agents/{a}/memory/{lb}/", ["get", "patch", "delete"]),
    ("/my/projects/{p}/exports/", ["get", "post"]),
    ("/my/projects/{p}/exports/{j}/", ["get"]),
    ("/my/projects/{p}/exports/{j}/archive/", ["get"]),
]
VALID_BODIES = {
    "/my/projects/{p}/": {"name": "renamed"},
    "/my/projects/{p}/agents/": {"name": "intruder"},
    "/my/projects/{p}/agents/{a}/": {"name": "renamed"},
    "/my/projects/{p}/chat/": {"agent_id": "{a}"},
    "/my/projects/{p}/chat/{s}/messages/": {"content": "hello"},
    "/my/projects/{p}/runs/{r}/reject/": {"reason": "intruder"},
    "/my/projects/{p}/agents/{a}/context/": {"documents": ["hello"]},
    "/my/projects/{p}/keys/": {"name": "intruder", "scopes": ["read", "write", "chat"]},
    "/my/projects/{p}/provider/": {
        "base_url": "http://attacker.example/v1",
        "api_key": "stolen",
        "default_model": "",
        "allowed_models": [],
    },
    "/my/projects/{p}/agents/{a}/tools/": {"kind": "builtin", "name": "add_context"},
    "/my/projects/{p}/agents/{a}/tools/{t}/": {"description": "changed"},
    "/my/projects/{p}/secrets/": {"name": "OTHER", "value": "intruder"},
    "/my/projects/{p}/secrets/{n}/": {"value": "intruder"},
    "/my/projects/{p}/schedules/": {
        "agent_id": "{a}",
        "name": "intruder",
        "content": "hi",
        "kind": "cron",
        "cron": "* * * * *",
    },
    "/my/projects/{p}/schedules/{sc}/": {"enabled": False},
    "/my/projects/{p}/webhooks/": {"url": "https://example.com/h", "events": ["run.failed"]},
    "/my/projects/{p}/webhooks/{w}/": {"enabled": False},
    "/my/projects/{p}/retention/": {"sessions_days": 1},
    "/my/projects/{p}/agents/{a}/context/files/": {"url": "https://example.com/a.txt"},
    "/my/projects/{p}/agents/{a}/memory/": {"label": "intruder", "value": "x"},
    "/my/projects/{p}/agents/{a}/memory/{lb}/": {"value": "intruder"},
}


def _fill(template, ids):
    # A context job id: any id will do, the project or agent already is someone else's.
    return template.format(
        **{
            "j": "00000000-0000-4000-8000-000000000001",
            "k": "00000000-0000-4000-8000-000000000002",
            "v": "1",  # an agent version's number
            "doc": "00000000-0000-4000-8000-000000000003",  # a context document's id
            "lb": "persona",  # every agent of the world has a memory block of that label
            **ids,
        }
    )


def _body(template, ids):
    body = VALID_BODIES.get(template, {})
    return {k: v.format(**ids) if isinstance(v, str) else v for k, v in body.items()}


def _snapshot():
    return (
        sorted(Project.objects.values_list("id", "name", "updated_at")),
        sorted(Agent.objects.values_list("id", "name", "updated_at")),
        sorted(ChatSession.objects.values_list("id", "title")),
        sorted(Message.objects.values_list("id", "content", "status")),
        sorted(ProjectApiKey.objects.values_list("id", "revoked_at")),
        sorted(ProviderSettings.objects.values_list("project_id", "base_url", "updated_at")),
        sorted(Tool.objects.values_list("id", "name", "description", "updated_at")),
        sorted(ProjectSecret.objects.values_list("id", "name", "value")),
        sorted(Run.objects.values_list("id", "status")),
        sorted(Schedule.objects.values_list("id", "name", "enabled", "updated_at")),
        sorted(WebhookEndpoint.objects.values_list("id", "url", "enabled", "events")),
        sorted(WebhookDelivery.objects.values_list("id", "status", "next_attempt_at")),
        sorted(AgentVersion.objects.values_list("id", "number")),
        sorted(RetentionPolicy.objects.values_list("project_id", "sessions_days")),
        sorted(ArchiveJob.objects.values_list("id", "status")),
        sorted(MemoryBlock.objects.values_list("id", "label", "value", "updated_at")),
        sorted(ContextDocument.objects.values_list("id", "status")),
    )


def _tool_secret_and_run(project, agent, session):
    tool = Tool.objects.create(agent=agent, kind="builtin", name="search_context")
    MemoryBlock.objects.create(agent=agent, label="persona", value=f"of {project.id}")
    ProjectSecret.objects.create(project=project, name="API_TOKEN", value=f"v-{project.id}")
    # A finished answer: regenerating it would be allowed, were the session the caller's.
    answer = MessageFactory(session=session, role="assistant", status="done", content="hi")
    run = Run.objects.create(session=session, message=answer, agent=agent, status="running")
    schedule = schedule_create(
        project=project, agent=agent, session=session, name="s", content="hi", kind="cron",
        cron="0 9 * * *",
    )  # fmt: skip
    hook = WebhookEndpoint.objects.create(
        project=project, url="https://example.com/h", events=["run.completed"], secret="whsec_x"
    )
    delivery = WebhookDelivery.objects.create(
        id=f"msg_{uuid.uuid4().hex}", endpoint=hook, event_type="run.completed", body="{}"
    )
    return {"t": tool.id, "n": "API_TOKEN", "r": run.id, "sc": schedule.id, "w": hook.id,
            "d": delivery.id}  # fmt: skip


@pytest.fixture
def world(user, other_user):
    """The caller's project and a second one of theirs; another user's project."""
    mine = ProjectFactory(owner=user)
    my_agent = AgentFactory(project=mine)
    my_session = ChatSessionFactory(agent=my_agent, project=mine)
    MessageFactory(session=my_session)

    my_second = ProjectFactory(owner=user)
    second_agent = AgentFactory(project=my_second)
    second_session = ChatSessionFactory(agent=second_agent, project=my_second)

    theirs = ProjectFactory(owner=other_user)
    their_agent = AgentFactory(project=theirs)
    their_session = ChatSessionFactory(agent=their_agent, project=theirs)
    MessageFactory(session=their_session)
    their_key, _ = api_key_create(project=theirs, name="theirs", scopes=["read"])
    ids = {
        "mine": {"p": mine.id, "a": my_agent.id, "s": my_session.id},
        "second": {"p": my_second.id, "a": second_agent.id, "s": second_session.id},
        "theirs": {"p": theirs.id, "a": their_agent.id, "s": their_session.id, "k": their_key.id},
    }
    for (name, entry), (project, agent, session) in zip(
        ids.items(),
        [
            (mine, my_agent, my_session),
            (my_second, second_agent, second_session),
            (theirs, their_agent, their_session),
        ],
        strict=True,
    ):
        ids[name] = {**entry, **_tool_secret_and_run(project, agent, session)}
    return ids


def _foreign_id_sets(world):
    theirs, mine, second = world["theirs"], world["mine"], world["second"]
    yield "their project", theirs
    # The caller's own project with children of someone else's project...
    yield (
        "my project, their children",
        {**theirs, "p": mine["p"]},
    )
    # ...or of another of the caller's own projects: children never cross projects.
    yield (
        "my project, my other project's children",
        {
            "p": mine["p"],
            "a": second["a"],
            "s": second["s"],
            "t": second["t"],
            "n": "API_TOKEN",
            "r": second["r"],
            "sc": second["sc"],
            "w": second["w"],
            "d": second["d"],
        },
    )


def test_every_route_and_method_is_404_for_foreign_ids(api, world, redis_client):
    before = _snapshot()
    checked = 0
    for (label, ids), (template, methods) in itertools.product(_foreign_id_sets(world), ROUTES):
        children = ("{a}", "{s}", "{k}", "{sc}", "{w}")
        if not any(c in template for c in children) and ids["p"] == world["mine"]["p"]:
            continue  # the route names only the caller's own project: not a foreign id
        for method in methods:
            url = _fill(template, ids)
            response = getattr(api, method)(url, _body(template, ids), format="json")
            assert response.status_code == 404, (label, method.upper(), url, response.content)
            checked += 1
    assert checked >= 28  # the loop really ran: 14 for their project, 7 per child set
    assert _snapshot() == before, "a request with foreign ids changed the database"
    theirs = world["theirs"]["p"].hex
    assert not list(redis_client.scan_iter(match=f"uws:*:{theirs}:*")), (
        "probing another user's project created workspace state for it"
    )


def test_lists_never_show_foreign_rows(api, world):
    projects = api.get("/my/projects/").json()["projects"]
    assert {p["id"] for p in projects} == {str(world["mine"]["p"]), str(world["second"]["p"])}

    mine = world["mine"]
    agents = api.get(f"/my/projects/{mine['p']}/agents/").json()["agents"]
    assert [a["id"] for a in agents] == [str(mine["a"])]
    sessions = api.get(f"/my/projects/{mine['p']}/chat/").json()["sessions"]
    assert [s["id"] for s in sessions] == [str(mine["s"])]
    messages = api.get(f"/my/projects/{mine['p']}/chat/{mine['s']}/messages/").json()
    assert messages["total"] == 2


def test_unsupported_methods_never_succeed_on_foreign_ids(api, world):
    theirs = world["theirs"]
    for template, methods in ROUTES:
        for method in {"get", "post", "put", "patch", "delete"} - set(methods):
            response = getattr(api, method)(_fill(template, theirs), {}, format="json")
            assert response.status_code in (404, 405), (method, template, response.status_code)


def test_matrix_covers_every_route():
    """A per-project route added to the URLconf must be added to ROUTES above. (Operators'
    routes under /admin/ take a project id too; they are staff-only: test_operators.)"""
    served = set()

    def walk(patterns, prefix=""):
        for p in patterns:
            route = prefix + str(p.pattern)
            if hasattr(p, "url_patterns"):
                walk(p.url_patterns, route)
            else:
                served.add(route)

    walk(get_resolver().url_patterns)
    per_project = {
        "/"
        + r.replace("<uuid:project_id>", "{p}")
        .replace("<uuid:agent_id>", "{a}")
        .replace("<uuid:session_id>", "{s}")
        .replace("<uuid:job_id>", "{j}")
        .replace("<uuid:key_id>", "{k}")
        .replace("<uuid:tool_id>", "{t}")
        .replace("<uuid:run_id>", "{r}")
        .replace("<str:name>", "{n}")
        .replace("<uuid:schedule_id>", "{sc}")
        .replace("<uuid:webhook_id>", "{w}")
        .replace("<str:delivery_id>", "{d}")
        .replace("<int:number>", "{v}")
        .replace("<uuid:document_id>", "{doc}")
        .replace("<str:label>", "{lb}")
        for r in served
        if "<uuid:project_id>" in r and not r.startswith("admin/")
    }
    assert per_project <= {t for t, _ in ROUTES}, per_project - {t for t, _ in ROUTES}
