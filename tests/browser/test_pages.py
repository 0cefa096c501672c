"""What a person sees, in a real browser: Debian's chromium, headless, driven by
Playwright (never a browser Playwright downloads). Every request the pages make to
anywhere but the server under test is blocked and recorded, so the docs must work
offline: Swagger UI and ReDoc come from the app's own static files.

Skips, saying why, where chromium (or the playwright package) is missing; .ci/run
installs chromium with apt when it is.
"""

from __future__ import annotations

import os
import re
import shutil

import pytest

from tests.contract.live import LiveServer
from tests.factories import AgentFactory, ChatSessionFactory, MessageFactory, UserFactory
from workspaces.manager import get_worker_space

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is missing")
if not (os.path.exists(CHROMIUM) and os.access(CHROMIUM, os.X_OK)) and not shutil.which(CHROMIUM):
    pytest.skip(
        f"no chromium at {CHROMIUM}: install Debian's (apt-get install -y chromium) or set "
        "CHROMIUM to one; .ci/run installs it",
        allow_module_level=True,
    )


@pytest.fixture
def site(transactional_db, offline_runtime):
    server = LiveServer(static=True).start()
    yield server
    server.stop()


@pytest.fixture
def browser_page(site):
    """A page whose requests may reach only the server under test."""
    blocked: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900})

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


def test_swagger_ui_and_redoc_work_offline(site, browser_page):
    page, blocked = browser_page
    page.goto(f"{site.url}/api/docs/")
    page.get_by_text("User Worker Space API").first.wait_for()
    for tag in ("Authentication", "Projects", "Agents", "Context", "Chat", "Operators"):
        assert page.locator(".opblock-tag", has_text=tag).count() >= 1, tag
    assert page.get_by_text("Create a project").first.is_visible()
    assert page.get_by_text("Follow a session's events (Server-Sent Events)").first.is_visible()
    assert page.get_by_role("button", name=re.compile("Authorize")).is_visible()
    # An operation opens to its documented answers, errors included.
    page.get_by_text("Create an agent").first.click()
    page.locator(".responses-table").first.wait_for()
    assert page.locator(".response-col_status", has_text="409").first.is_visible()

    page.goto(f"{site.url}/api/redoc/")
    page.locator("h1", has_text="User Worker Space API").first.wait_for()
    # ReDoc's own menu lists the operations by their summaries.
    page.locator("[role=menuitem]", has_text="Chat").first.click()
    page.get_by_text("Send a message; the agent answers through the bus").first.wait_for()
    assert blocked == [], f"the docs reached out of the machine: {blocked}"


def test_the_root_page_leads_everywhere(site, browser_page):
    page, blocked = browser_page
    page.goto(f"{site.url}/")
    for name in ("API", "API docs (Swagger UI)", "Admin", "Flower"):
        assert page.get_by_role("link", name=name, exact=True).is_visible(), name
    page.get_by_role("link", name="API docs (Swagger UI)").click()
    page.get_by_text("User Worker Space API").first.wait_for()
    assert blocked == []


@pytest.fixture
def admin_world(site):
    """Everything in the database before the browser starts (the ORM refuses to run
    while Playwright's event loop does)."""
    UserFactory(username="operator", is_staff=True, is_superuser=True)
    session = ChatSessionFactory(
        agent=AgentFactory(
            name="helper", project__name="Support bot", project__owner__username="alice"
        ),
        title="first chat",
    )
    for i in range(25):
        MessageFactory(session=session, content=f"line {i}", role="user" if i % 2 else "assistant")
    MessageFactory(
        session=session, content="", status="error", error="the LLM provider could not be reached"
    )
    project = session.project
    get_worker_space(user_id=project.owner_id, project_id=project.id)  # a registered workspace
    return session


def test_an_operator_finds_their_way_in_the_admin(site, admin_world, browser_page):
    session = admin_world
    page, blocked = browser_page

    page.goto(f"{site.url}/admin/")
    page.get_by_label("Username").fill("operator")
    page.get_by_label("Password").fill("pw-123456")
    page.get_by_role("button", name="Log in").click()
    page.get_by_role("link", name="Projects").first.wait_for()

    # Projects: owner, counts that link to the agents and sessions.
    page.goto(f"{site.url}/admin/projects/project/")
    row = page.locator("#result_list tr", has_text="Support bot")
    assert "alice" in row.inner_text()
    assert (
        page.get_by_text("By owner").first.is_visible()
        or page.locator("#changelist-filter").is_visible()
    )
    row.get_by_role("link", name="1").first.click()  # its one agent
    page.wait_for_url(re.compile(r"/admin/agents/agent/\?project__id__exact="))
    assert page.locator("#result_list", has_text="helper").is_visible()

    # Messages: newest first, the error column, status badges.
    page.goto(f"{site.url}/admin/chat/message/")
    first_row = page.locator("#result_list tbody tr").first
    assert "the LLM provider could not be reached" in first_row.inner_text()
    assert first_row.locator(".status-badge", has_text="error").is_visible()

    # The session page: its conversation read-only, a page at a time.
    page.goto(f"{site.url}/admin/chat/chatsession/{session.id}/change/")
    conversation = page.locator("#conversation")
    assert "26 messages" in conversation.inner_text()
    assert conversation.locator("textarea").count() == 0
    assert "page 1 of 2" in conversation.inner_text()
    conversation.get_by_role("link", name=re.compile("next")).click()
    page.wait_for_url(re.compile(r"mp=2"))
    assert "the LLM provider could not be reached" in page.locator("#conversation").inner_text()

    # Workspaces: a state badge, the owner's and the project's names, readable times.
    page.goto(f"{site.url}/admin/workspaces/workspace/")
    row = page.locator("#result_list tbody tr", has_text="Support bot")
    assert row.locator(".state-badge", has_text="Initialized").is_visible()
    text = row.inner_text()
    assert "alice" in text and "ago" in text
    assert not re.search(r"\d{4}-\d\d-\d\dT\d\d:", text), "raw ISO timestamps"
    page.screenshot(path=os.environ.get("BROWSER_SCREENSHOT", "/tmp/uws-admin-workspaces.png"))
    assert blocked == []
