"""Admin lists over tables of 100,000s of rows (runs, messages, usage, audit): the same
queries whatever the row count, counts that stop at a limit (or the planner's estimate
when unfiltered) and say so, search by id through the indexes, and on PostgreSQL an
index path for every query a list page makes on the big tables."""

from __future__ import annotations

import json
import re
import uuid

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from chat.models import Message, Run
from common.admin_pagination import LargeTablePaginator
from governance.models import AuditEvent, RunUsage
from tests.factories import AgentFactory, ChatSessionFactory, ProjectFactory, UserFactory
from tests.observability.test_admin_pages import make_run

BIG_TABLES = ("agents_run", "agents_message", "governance_runusage", "governance_auditevent")
postgresql_only = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="query plans and estimates of PostgreSQL"
)


@pytest.fixture
def staff(client, db):
    client.force_login(UserFactory(is_staff=True, is_superuser=True))
    return client


def listed(staff, path: str) -> set[str]:
    response = staff.get(path)
    assert response.status_code == 200, path
    return {str(r.pk) for r in response.context["cl"].result_list}


def queries_of(staff, path: str) -> list[str]:
    with CaptureQueriesContext(connection) as queries:
        assert staff.get(path).status_code == 200, path
    return [q["sql"] for q in queries.captured_queries]


@pytest.mark.parametrize(
    "path",
    ["/admin/governance/runusage/", "/admin/chat/message/", "/admin/chat/run/?q=the+model"],
)
def test_lists_cost_the_same_queries_for_3_rows_as_for_30(staff, session, path):
    other = ChatSessionFactory(agent=AgentFactory(project=ProjectFactory()))
    for i in range(3):
        make_run(session if i % 2 else other, ago=i, error="the model failed")
    few = queries_of(staff, path)
    for i in range(27):
        make_run(other if i % 2 else session, ago=10 + i, error="the model failed")
    many = queries_of(staff, path)
    assert len(many) == len(few), many
    assert len(listed(staff, path)) >= 30


def test_counts_stop_at_the_limit_and_say_so(staff, session, monkeypatch):
    monkeypatch.setattr(LargeTablePaginator, "count_limit", 5)
    for i in range(7):
        make_run(session, ago=i, model="gpt-x")
    failed = make_run(session, model="gpt-y", status=Run.Status.ERROR, error="boom")

    sql = queries_of(staff, "/admin/chat/run/?model=gpt-x")
    page = staff.get("/admin/chat/run/?model=gpt-x").content.decode()
    assert "more than 5 runs" in page
    counts = [q for q in sql if "COUNT(" in q]
    assert counts and all("LIMIT 6" in q for q in counts), counts
    # The first page is whole; pages past the limit are not offered.
    assert len(listed(staff, "/admin/chat/run/?model=gpt-x")) == 7

    exact = staff.get("/admin/chat/run/?status__exact=error")
    assert re.search(r"\b1 run\b", exact.content.decode())
    assert {str(r.pk) for r in exact.context["cl"].result_list} == {str(failed.id)}

    # Usage totals are read for a bounded selection only.
    usage = staff.get("/admin/governance/runusage/?outcome=done")
    assert "more than 5 runs (choose a day or a project" in usage.context["title"]
    totals = staff.get(f"/admin/governance/runusage/?outcome={Run.Status.ERROR}")
    assert totals.context["title"].startswith("Run usage: 1 runs, 15 tokens")


@postgresql_only
def test_an_unfiltered_list_shows_the_planners_estimate(staff, session, monkeypatch):
    monkeypatch.setattr(LargeTablePaginator, "count_limit", 5)
    for i in range(9):
        make_run(session, ago=i)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE agents_run")  # what autovacuum keeps up to date
    sql = queries_of(staff, "/admin/chat/run/")
    assert not [q for q in sql if "COUNT(" in q], sql
    assert "about 9 runs" in staff.get("/admin/chat/run/").content.decode()


def test_run_search_by_id_goes_through_the_indexes(staff, session):
    other = ChatSessionFactory(agent=AgentFactory(project=ProjectFactory()))
    mine = make_run(session)
    theirs = make_run(other)
    failed = make_run(other, status=Run.Status.ERROR, error="quota exceeded for gpt-y")
    trace = uuid.uuid4().hex
    Run.objects.filter(id=mine.id).update(trace_id=trace)

    def found(term: str) -> set[str]:
        return listed(staff, f"/admin/chat/run/?q={term}")

    assert found(str(mine.id)) == {str(mine.id)}
    assert found(mine.id.hex.upper()) == {str(mine.id)}
    assert str(mine.id) in found(str(mine.id)[:8])  # the list's short id
    assert found(str(other.id)) == {str(theirs.id), str(failed.id)}
    assert found(trace) == {str(mine.id)}
    assert found(str(theirs.message_id)) == {str(theirs.id)}
    assert found("quota+exceeded") == {str(failed.id)}
    assert found(str(uuid.uuid4())) == set()
    sql = " ".join(queries_of(staff, f"/admin/chat/run/?q={mine.id}"))
    assert "UPPER(" not in sql and "::text" not in sql, sql


def test_filters_offer_recent_values_and_keep_the_chosen_one(staff, session):
    make_run(session, model="gpt-x")
    RunUsage.objects.update(provider="openai")
    page = staff.get("/admin/governance/runusage/").content.decode()
    assert "?provider=openai" in page and f"?outcome={Run.Status.DONE}" in page
    chosen = staff.get("/admin/governance/runusage/?provider=elsewhere").content.decode()
    assert "?provider=elsewhere" in chosen
    assert staff.get("/admin/chat/run/?model=gone-model").status_code == 200
    AuditEvent.objects.create(
        project_id=session.project_id, username="x", credential="token", method="PATCH",
        path="/x", action="update", status_code=200,
    )  # fmt: skip
    assert "?method=PATCH" in staff.get("/admin/governance/auditevent/").content.decode()
    # Messages filter by project through their session, without a scan for the choices.
    assert listed(staff, f"/admin/chat/message/?project={session.project_id}") == {
        str(m.pk) for m in Message.objects.filter(session__project=session.project)
    }


# Plan nodes that pass rows on as they come: a Limit above them stops the scan below.
STREAMING = {"Subquery Scan", "Result", "Gather", "Nested Loop", "Hash Join", "Memoize"}


def whole_scans(node: dict, above: tuple[str, ...] = ()) -> list[str]:
    """The big tables a plan reads whole: a sequential scan with no Limit above it, or
    only behind a node that first takes every row (a sort, an aggregate, a hash)."""
    found = []
    if node["Node Type"] == "Seq Scan" and node.get("Relation Name") in BIG_TABLES:
        for kind in reversed(above):
            if kind == "Limit":
                break
            if kind not in STREAMING:
                found.append(node["Relation Name"])
                break
        else:
            found.append(node["Relation Name"])
    for child in node.get("Plans", ()):
        found += whole_scans(child, (*above, node["Node Type"]))
    return found


@postgresql_only
@pytest.mark.parametrize(
    "path",
    [
        "/admin/chat/run/",
        "/admin/chat/run/?model=gpt-x",
        "/admin/chat/run/?status__exact=error",
        "/admin/chat/run/?q={run.id}",
        "/admin/chat/run/?q={run.trace_id}",
        "/admin/chat/run/?project={run.session.project_id}",
        "/admin/governance/runusage/",
        "/admin/governance/auditevent/",
        "/admin/chat/message/",
    ],
)
def test_no_query_of_a_big_list_reads_its_table_whole(staff, session, path):
    """With sequential scans priced out, a plan that still reads a big table whole has
    no index to take: what 100,000s of rows would cost on every page."""
    run = make_run(session, model="gpt-x")
    Run.objects.filter(id=run.id).update(trace_id=uuid.uuid4().hex)
    run.refresh_from_db()
    path = path.format(run=run)
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")  # for this test's transaction
        sql = queries_of(staff, path)
        for query in sql:
            if not query.startswith("SELECT") or not any(t in query for t in BIG_TABLES):
                continue
            cursor.execute(f"EXPLAIN (FORMAT JSON) {query}")
            plan = cursor.fetchone()[0]
            plan = json.loads(plan) if isinstance(plan, str) else plan
            assert not whole_scans(plan[0]["Plan"]), (path, query, plan)


def test_the_project_filter_links_keep_the_other_filters(staff, session):
    make_run(session, status=Run.Status.ERROR, error="boom")
    page = staff.get("/admin/chat/run/?status__exact=error").content.decode()
    assert f'href="?status__exact=error&amp;project={session.project_id}"' in page
    chosen = staff.get(f"/admin/chat/run/?project={session.project_id}")
    assert f'class="selected"><a href="?project={session.project_id}"' in re.sub(
        r"\s+", " ", chosen.content.decode()
    ).replace('"> <a', '"><a')
    assert listed(staff, f"/admin/chat/run/?status__exact=error&project={session.project_id}")


def test_the_message_list_reads_the_head_of_each_text_not_the_whole(staff, session):
    for n in range(3):
        Message.objects.create(
            session=session,
            role="assistant",
            content=f"answer {n} " + "x" * 100_000,
            error="e" * 10_000,
        )
    with CaptureQueriesContext(connection) as queries:
        response = staff.get("/admin/chat/message/")
    assert response.status_code == 200
    page = response.content.decode()
    # The row shows the first 80 characters, the checkbox's label the first 40.
    assert "answer 2 " + "x" * 71 + "<" in page
    assert "Select this object for an action - assistant: answer 2 " + "x" * 31 + '"' in page
    # The list's query reads the texts only through the head it shows.
    (listing,) = [
        q["sql"]
        for q in queries.captured_queries
        if 'FROM "agents_message"' in q["sql"] and "ORDER BY" in q["sql"]
    ]
    selected = listing.split(' FROM "agents_message"', 1)[0]
    bare = re.sub(r'(LEFT|SUBSTR)\("agents_message"\."(content|error)"', "", selected, flags=re.I)
    assert '"agents_message"."content"' not in bare, selected
    assert '"agents_message"."error"' not in bare, selected

    # The delete action still works on that list (its confirmation reads each message).
    ids = [str(pk) for pk in Message.objects.values_list("pk", flat=True)]
    confirm = staff.post(
        "/admin/chat/message/", {"action": "delete_selected", "_selected_action": ids}
    )
    assert confirm.status_code == 200 and "Are you sure" in confirm.content.decode()
