"""Production: refuses to start without its secrets; passes `manage.py check --deploy`."""

from django.core.exceptions import ImproperlyConfigured

from .base import *  # noqa: F403
from .base import env

# No default: a missing key is ImproperlyConfigured at start, not a guessable fallback.
SECRET_KEY = env.str("SECRET_KEY")
DEBUG = False
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS")
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])
# Encrypt projects' provider API keys and tool secrets at rest: their own secret,
# required (a list, PROVIDER_KEYS_FERNET_KEYS, or the single PROVIDER_KEYS_FERNET_KEY).
PROVIDER_KEYS_FERNET_KEYS = env.list("PROVIDER_KEYS_FERNET_KEYS", default=[])
PROVIDER_KEYS_FERNET_KEY = env.str("PROVIDER_KEYS_FERNET_KEY", default="")
if not (PROVIDER_KEYS_FERNET_KEYS or PROVIDER_KEYS_FERNET_KEY):
    raise ImproperlyConfigured(
        "Set the PROVIDER_KEYS_FERNET_KEYS (or PROVIDER_KEYS_FERNET_KEY) environment variable"
    )

SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=True)
SESSION_COOKIE_SECURE = True
CSRF_COOKIE_SECURE = True
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=31536000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = True
SECURE_HSTS_PRELOAD = True
SECURE_CONTENT_TYPE_NOSNIFF = True
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}
