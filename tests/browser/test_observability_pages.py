"""The operators' new pages in a real browser (Debian's chromium through Playwright, as
tests/browser/test_pages.py): runs list and a run's timeline, usage and audit with
project names, the deployment's and a project's dashboards with their charts drawn by
the vendored Chart.js. Each is screenshotted; no request may leave the machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from django.utils import timezone

from chat.models import Run
from governance.models import AuditEvent
from observability.services import rollup_minutes
from tests.browser.test_pages import CHROMIUM, LAUNCH_ARGS, site, sync_api  # noqa: F401
from tests.factories import AgentFactory, ChatSessionFactory, UserFactory
from tests.observability.test_admin_pages import make_run

pytestmark = pytest.mark.slow

SHOTS = Path(os.environ.get("BROWSER_SCREENSHOTS", "/tmp/uws-observability-screens"))


@pytest.fixture
def world(site):  # noqa: F811
    """Rows first: the ORM refuses to run while Playwright's event loop does."""
    UserFactory(username="operator", is_staff=True, is_superuser=True)
    session = ChatSessionFactory(
        agent=AgentFactory(
            name="helper", project__name="Support bot", project__owner__username="alice"
        ),  # fmt: skip
        title="first chat",
    )
    now = timezone.now()
    steps = [
        {"type": "tool", "attempt": 1, "step": 1, "call_id": "c1", "name": "weather",
         "arguments": '{"city": "Oslo"}', "status": "done", "result": "sunny, 21 C",
         "started_at": now.isoformat(), "finished_at": now.isoformat()},
        {"type": "tool", "attempt": 1, "step": 1, "call_id": "c2", "name": "calendar",
         "arguments": "{}", "status": "error", "result": "error: HTTP 500",
         "started_at": now.isoformat(), "finished_at": now.isoformat()},
    ]  # fmt: skip
    for i in range(12):
        make_run(session, ago=60 * (i % 4) + 70, status=Run.Status.ERROR if i % 5 == 0 else "done")
    run = make_run(session, ago=70, steps=steps, status=Run.Status.ERROR, error="the model failed")
    AuditEvent.objects.create(
        project_id=session.project_id, username="alice", credential="token", method="POST",
        path="/my/projects/", action="create", status_code=201,
    )  # fmt: skip
    rollup_minutes(now=now, minutes=8)
    return session, run


@pytest.fixture
def wide_page(site):  # noqa: F811
    blocked: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        context = browser.new_context(viewport={"width": 1366, "height": 900})

        def only_the_site(route):
            if route.request.url.startswith(site.url):
                route.continue_()
            else:
                blocked.append(route.request.url)
                route.abort()

        context.route("**/*", only_the_site)
        page = context.new_page()
        page.set_default_timeout(20_000)
        yield page, blocked
        context.close()
        browser.close()


def _fits(page, selector: str) -> bool:
    """The element's right edge is inside the window (nothing cut off at 1366 px)."""
    return page.evaluate(
        f"() => document.querySelector({selector!r}).getBoundingClientRect().right"
        " <= window.innerWidth"
    )


@pytest.mark.timeout(600)
def test_operators_pages_render_offline_and_are_screenshotted(site, world, wide_page):  # noqa: F811
    session, run = world
    page, blocked = wide_page
    SHOTS.mkdir(parents=True, exist_ok=True)

    page.goto(f"{site.url}/admin/")
    page.get_by_label("Username").fill("operator")
    page.get_by_label("Password").fill("pw-123456")
    page.get_by_role("button", name="Log in").click()
    page.get_by_role("link", name="Runs").first.wait_for()

    page.goto(f"{site.url}/admin/chat/run/")
    rows = page.locator("#result_list tbody tr")
    assert rows.count() == 13
    assert "Support bot" in rows.first.inner_text() and "helper" in rows.first.inner_text()
    assert page.locator("#changelist-filter", has_text="model").is_visible()
    page.screenshot(path=str(SHOTS / "runs.png"), full_page=True)

    page.goto(f"{site.url}/admin/chat/run/{run.id}/change/")
    timeline = page.locator("#run-timeline")
    assert "step 1: weather" in timeline.inner_text()
    assert "error: HTTP 500" in timeline.inner_text()
    assert "the model failed" in page.locator("#run-links").inner_text()
    assert page.locator("#run-usage", has_text="gpt-x").is_visible()
    page.screenshot(path=str(SHOTS / "run.png"), full_page=True)
    page.locator("#run-links").get_by_role("link", name="Support bot", exact=True).click()
    page.wait_for_url(f"**/admin/projects/project/{session.project_id}/change/")

    page.goto(f"{site.url}/admin/governance/runusage/")
    assert "Support bot" in page.locator("#result_list tbody tr").first.inner_text()
    assert _fits(page, "#result_list thead th:last-child"), "the usage table is cut off"
    page.screenshot(path=str(SHOTS / "usage.png"), full_page=True)

    page.goto(f"{site.url}/admin/governance/auditevent/")
    assert "Support bot" in page.locator("#result_list tbody tr").first.inner_text()
    page.screenshot(path=str(SHOTS / "audit.png"), full_page=True)

    project_dashboard = f"/admin/dashboard/projects/{session.project_id}/?hours=1"
    for name, path in (("dashboard", "/admin/dashboard/?hours=1"),
                       ("dashboard-project", project_dashboard)):  # fmt: skip
        page.goto(f"{site.url}{path}")
        page.wait_for_function("() => window.Chart && Chart.getChart('chart-runs')")
        drawn = page.evaluate(
            "() => ['chart-runs', 'chart-ttft', 'chart-tokens', 'chart-queue', 'chart-busy']"
            ".map(id => { const c = Chart.getChart(id); return c ? c.data.datasets.length : 0 })"
        )
        assert all(n >= 1 for n in drawn), drawn
        runs = page.evaluate("() => Chart.getChart('chart-runs').data.datasets[0].data")
        assert sum(runs) == 13, runs
        page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)

    page.goto(f"{site.url}/admin/metrics")
    assert "uws_project_runs_24h" in page.content()
    assert blocked == []
