"""Fixtures shared by the whole suite.

Everything here is real: the Redis named by REDIS_URL (the Makefile starts a throwaway
bundled one when it is unset), the database named by DATABASE_URL (SQLite otherwise),
and Celery workers that consume real queues.
"""

from __future__ import annotations

import pytest
from django.db import connection, connections
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from common.redis import get_redis
from governance.quotas import KEY_NAMESPACE as QUOTA_NAMESPACE
from tests.factories import AgentFactory, ChatSessionFactory, ProjectFactory, UserFactory
from tests.migrated_template import setup_test_database, teardown_test_database
from tests.workers import shared_pool_worker, worker_processes
from workspaces.manager import get_worker_space_manager
from workspaces.redis import KEY_NAMESPACE

# The files that take longest, longest first (each one's setup, calls and teardowns added
# up, measured on a full run on two cores). With `--dist loadfile` each xdist process
# takes the next file in collection order when it has two tests left: the long files go
# out first and the short ones fill in behind them, instead of a long file collected
# last running alone at the end.
LONG_FILES = (
    "tests/contract/test_schemathesis_fuzzing.py",
    "tests/contract/test_schemathesis.py",
    "tests/runtime/test_durability.py",
    "tests/runtime/test_agent_calls.py",
    "tests/multihost/test_web_hosts.py",
    "tests/agentbus/test_reliability.py",
    "tests/runtime/test_approval.py",
    "tests/agentbus/test_shared_worker.py",
    "tests/runtime/test_runs.py",
    "tests/api/test_database_outage.py",
    "tests/browser/test_pages.py",
    "tests/runtime/test_tools.py",
    "tests/runtime/test_chat.py",
    "tests/lifecycle/test_archive_upload.py",
    "tests/runtime/test_sse.py",
    "tests/runtime/test_shutdown.py",
    "tests/lifecycle/test_archive_recovery.py",
    "tests/agentbus/test_flow_workers.py",
    "tests/multihost/test_worker_hosts.py",
    "tests/runtime/test_waits.py",
)


def pytest_configure(config):
    # xdist would otherwise hand out files by their number of tests, most first, which
    # undoes the order above (a file of one long test would go last).
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    def rank(item):
        path = item.nodeid.split("::", 1)[0]
        return LONG_FILES.index(path) if path in LONG_FILES else len(LONG_FILES)

    items.sort(key=rank)  # stable: the order within a file and among the rest is kept


@pytest.fixture(scope="session")
def django_db_setup(
    request, django_test_environment, django_db_blocker, django_db_modify_db_settings
):
    """pytest-django's, but the test database is a copy of a migrated template made once
    per set of migrations (tests.migrated_template), not migrated in every process."""
    verbosity = request.config.option.verbose
    with django_db_blocker.unblock():
        databases = setup_test_database(verbosity)
    yield
    with django_db_blocker.unblock():
        teardown_test_database(databases, verbosity)


# Tables only migrations write (post_migrate): the flush after a transactional test keeps
# them rather than emptying them for post_migrate to fill again.
MIGRATED_ROWS = {"django_content_type", "auth_permission"}


@pytest.fixture(autouse=True, scope="session")
def _flush_by_delete(django_db_setup):
    """A transactional test ends with Django's flush: on PostgreSQL a TRUNCATE of every
    table, which makes new files for each table and index (0.6 s a test under load),
    then the content types and permissions made again (0.3 s). The tables hold a test's
    few rows: DELETE empties them sooner (in one transaction: the foreign keys, all
    deferrable, are checked at its commit). Sequences are not reset, as before."""
    if connection.vendor != "postgresql":
        yield  # SQLite's flush deletes already
        return
    operations = type(connection.ops)
    truncate = operations.sql_flush

    def sql_flush(self, style, tables, *, reset_sequences=False, allow_cascade=False):
        if reset_sequences or allow_cascade:
            return truncate(
                self, style, tables, reset_sequences=reset_sequences, allow_cascade=allow_cascade
            )
        quote = self.quote_name
        return [f"DELETE FROM {quote(table)};" for table in tables if table not in MIGRATED_ROWS]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(operations, "sql_flush", sql_flush)
        yield


@pytest.fixture
def redis_client():
    return get_redis()


@pytest.fixture(autouse=True, scope="session")
def _fresh_redis_database():
    """The run starts from an empty Redis database: queues or registry entries a previous
    (interrupted) run left behind must not meet this one. The suite owns REDIS_URL's
    database (.ci/run gives it db 15; `make test` without REDIS_URL a throwaway server)."""
    get_redis().flushdb()


@pytest.fixture(autouse=True, scope="session")
def _close_database_pools(django_db_setup, django_db_blocker):
    """Hand the pooled connections back before the test database is dropped."""
    yield
    for each in connections.all():
        if getattr(each, "pool", None) is not None:
            each.close_pool()


@pytest.fixture(autouse=True)
def _clean_workspace_keys():
    """Each test starts with no workspace state in Redis and none in this process, and
    no quota counters (ids may be reused: SQLite hands out a rolled-back id again)."""
    client = get_redis()
    keys = list(client.scan_iter(match=f"{KEY_NAMESPACE}:*", count=1000))
    keys += list(client.scan_iter(match=f"{QUOTA_NAMESPACE}:*", count=1000))
    if keys:
        client.unlink(*keys)
    get_worker_space_manager().forget_all_unsafe()
    yield
    get_worker_space_manager().forget_all_unsafe()


@pytest.fixture
def user(db):
    return UserFactory()


@pytest.fixture
def other_user(db):
    return UserFactory()


def _client_for(user) -> APIClient:
    client = APIClient()
    token, _ = Token.objects.get_or_create(user=user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


@pytest.fixture
def api(user) -> APIClient:
    """An API client authenticated as `user` with a token."""
    return _client_for(user)


@pytest.fixture
def other_api(other_user) -> APIClient:
    return _client_for(other_user)


@pytest.fixture
def project(user):
    return ProjectFactory(owner=user)


@pytest.fixture
def agent(project):
    return AgentFactory(project=project)


@pytest.fixture
def session(agent):
    return ChatSessionFactory(agent=agent, project=agent.project)


@pytest.fixture
def rates(settings):
    """`rates(messages_user="3/min", ...)`: throttle rates for this test."""

    def set_rates(**rates):
        framework = dict(settings.REST_FRAMEWORK)
        framework["DEFAULT_THROTTLE_RATES"] = {**framework["DEFAULT_THROTTLE_RATES"], **rates}
        settings.REST_FRAMEWORK = framework

    return set_rates


@pytest.fixture
def live_worker(transactional_db):
    """A real Celery worker running in this process (threads pool, 2 threads).

    It follows the maintenance queue and the queues of active projects exactly as the
    shared pool does (the AgentBus bootstep: broadcasts plus the periodic reconcile), so
    tasks published through the AgentBus run for real. Yields the WorkController.
    """
    with shared_pool_worker() as worker:
        yield worker


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Each phase's report on its test (`item.report_call`...), for fixtures that say more
    when the test failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def worker_process(request, tmp_path):
    """Real worker subprocesses (tests.workers.worker_processes), killed after the test;
    after a failure, each prints its threads' stacks first."""

    def failed() -> bool:
        report = getattr(request.node, "report_call", None)
        return report is not None and report.failed

    with worker_processes(tmp_path, failed) as start:
        yield start
