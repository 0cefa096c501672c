"""The test suite: real Redis and database from the environment (see Makefile)."""

import os
import re

from django.core.exceptions import ImproperlyConfigured

from .base import *  # noqa: F403
from .base import env, fernet_key_from

DEBUG = False
SECRET_KEY = "test-only-not-secret"
ALLOWED_HOSTS = ["*"]
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
# Short intervals so tests watch eviction, reaping and reconciling happen.
WORKSPACE_REVALIDATE_SECONDS = env.float("WORKSPACE_REVALIDATE_SECONDS", default=0.5)
AGENTBUS_RECONCILE_SECONDS = env.float("AGENTBUS_RECONCILE_SECONDS", default=0.5)
CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT = env.float("CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT", default=5)
CHAT_HEARTBEAT_SECONDS = env.float("CHAT_HEARTBEAT_SECONDS", default=1)
# The suite starts dozens of worker processes that never need it (its own test sets it).
WORKER_WARM_UP = env.bool("WORKER_WARM_UP", default=False)
# The suite runs a process per core and their worker processes at once: a team of engine
# threads would wait at every barrier for a core the others hold (the test of the teams
# sets its own).
EMBEDDINGS_THREADS = env.int("EMBEDDINGS_THREADS", default=1)
# Tests load config.asgi into their own process: its collector keeps Python's settings
# (tests.api.test_web_process sets it in a process of its own).
WEB_GC_THRESHOLD0 = env.int("WEB_GC_THRESHOLD0", default=0)
# WhiteNoise (in the middleware, as deployed) reads it; collectstatic is not run here.
STATIC_ROOT = VAR_DIR / "staticfiles"  # noqa: F405
STATIC_ROOT.mkdir(exist_ok=True)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}

if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":  # noqa: F405
    # A file, not :memory:, so worker processes started by tests see the same rows.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test.sqlite3")}  # noqa: F405

# Projects' provider keys are encrypted under a key derived from SECRET_KEY unless one
# is given (production requires its own).
PROVIDER_KEYS_FERNET_KEY = PROVIDER_KEYS_FERNET_KEY or fernet_key_from(SECRET_KEY)  # noqa: F405

# Parallel runs (pytest-xdist): each worker process gets a Redis database of its own
# (db 1 for gw0, 2 for gw1, ... on a throwaway server; on a shared one, the databases
# listed in TEST_REDIS_DATABASES, which the suite may empty, e.g. CI's "15,14"), its own
# Qdrant folder and, from pytest-django, its own test database. The suite empties the
# Redis database it is given, so parallel workers never share one; on a Redis that is
# neither (REDIS_URL given alone) the suite runs in one process. The assignment is made
# once, in the pytest worker; processes it starts inherit it.
_XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if _XDIST_WORKER and not os.environ.get("UWS_TEST_WORKER_ISOLATED"):
    _index = int(_XDIST_WORKER.removeprefix("gw"))
    _given = [d for d in env.list("TEST_REDIS_DATABASES", default=[]) if d]
    if _given:
        if _index >= len(_given):
            raise ImproperlyConfigured(
                f"TEST_REDIS_DATABASES lists {len(_given)} databases for more test workers"
            )
        _db = int(_given[_index])
    elif os.environ.get("REDIS_THROWAWAY"):
        _db = _index + 1
    else:
        raise ImproperlyConfigured(
            "parallel tests need a throwaway Redis (bin/with-redis --ephemeral without "
            "REDIS_URL) or TEST_REDIS_DATABASES: the suite empties the Redis database it "
            "is given"
        )
    REDIS_URL = re.sub(r"/\d*$", "", REDIS_URL.rstrip("/")) + f"/{_db}"  # noqa: F405
    CELERY_BROKER_URL = CELERY_RESULT_BACKEND = REDIS_URL
    CACHES["default"]["LOCATION"] = REDIS_URL  # noqa: F405
    QDRANT_PATH = f"{QDRANT_PATH}-{_XDIST_WORKER}"  # noqa: F405
    CELERY_BEAT_SCHEDULE_FILENAME = f"{CELERY_BEAT_SCHEDULE_FILENAME}-{_XDIST_WORKER}"  # noqa: F405
    # Not CELERY_BROKER_URL: Celery reads that variable before its settings, and tests
    # point this process's app at other brokers (tests.workers.broker_at).
    os.environ.update(UWS_TEST_WORKER_ISOLATED="1", REDIS_URL=REDIS_URL, QDRANT_PATH=QDRANT_PATH)
