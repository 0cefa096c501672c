"""A developer's machine and `make run`: debug on, an insecure key is acceptable."""

from .base import *  # noqa: F403
from .base import env

DEBUG = env.bool("DEBUG", default=True)
SECRET_KEY = env.str("SECRET_KEY", default="local-dev-only-not-secret-7c1f0e2a9b")
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["*"])

# Whitenoise serves admin and Swagger assets straight from the apps under uvicorn.
WHITENOISE_USE_FINDERS = True
STATIC_ROOT.mkdir(exist_ok=True)  # noqa: F405
