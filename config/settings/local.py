"""A developer's machine and `make run`: debug on, an insecure key is acceptable."""

from .base import *  # noqa: F403
from .base import env, fernet_key_from

DEBUG = env.bool("DEBUG", default=True)
SECRET_KEY = env.str("SECRET_KEY", default="local-dev-only-not-secret-7c1f0e2a9b")
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["*"])
# honcho (make run) kills what has not stopped 5 s after Ctrl-C. A worker waits up to
# the soft-shutdown window for its runs to hand themselves back, then needs ~2 s to stop.
CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT = env.float("CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT", default=1)

# Whitenoise serves admin and Swagger assets straight from the apps under uvicorn.
WHITENOISE_USE_FINDERS = True
STATIC_ROOT.mkdir(exist_ok=True)  # noqa: F405

# Projects' provider keys are encrypted under a key derived from SECRET_KEY unless one
# is given (production requires its own).
PROVIDER_KEYS_FERNET_KEY = PROVIDER_KEYS_FERNET_KEY or fernet_key_from(SECRET_KEY)  # noqa: F405
