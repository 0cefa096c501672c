"""The test suite: real Redis and database from the environment (see Makefile)."""

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
