import os

from django.core.wsgi import get_wsgi_application

# Production unless told otherwise: `make run` and the tests name theirs.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.production")

from common.tracing import django_instrument, tracing_setup  # noqa: E402

# OTEL_* set: Django's request spans (before the handler loads its middleware).
if tracing_setup("uws-web"):
    django_instrument()
application = get_wsgi_application()

from governance.secrets import fernet_keys_required_valid  # noqa: E402  (after setup)

fernet_keys_required_valid()
