"""What every bench sets before Django starts, in one place.

A bench begins with

    ROOT = Path(__file__).resolve().parent.parent
    if __name__ == "__main__":
        sys.path[:0] = [str(ROOT)]
        from bench.harness import bootstrap

        bootstrap("chat", capacity=True, offline=True)

and its docstring names what `capacity` and `offline` change, so the printed figures say
what they were measured with.
"""

from __future__ import annotations

import atexit
import os
import re
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Printed with the results by the benches that raise the throttles.
THROTTLES_NOTE = "throttles raised to 1000000/min (unless THROTTLE_* set)"


def bootstrap(name: str, *, capacity: bool = False, offline: bool = False, **settings: str) -> None:
    """Set the environment the bench and the services it starts run with, then start Django.

    - `name`: its folder, `var/bench-<name>` (unless VAR_DIR is set).
    - Redis: REDIS_URL, the broker and the result backend all on it. Benches flush the Redis
      they use, so without REDIS_URL a Redis of the bench's own is started (and stopped at
      exit), never the machine's shared one.
    - `capacity`: the API's throttles raised to 1000000/min (unless THROTTLE_* is set), so
      the service's capacity is measured, not its rate limits.
    - `offline`: the offline provider, the bundled embedder, Qdrant local mode.
    - `settings`: further variables, set as given (before the defaults above, so a
      REDIS_URL given here is the one used).
    """
    os.environ.update(settings)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
    os.environ.setdefault("DEBUG", "false")
    os.environ.setdefault("SECRET_KEY", "bench-only-not-secret")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    os.environ.setdefault("VAR_DIR", str(ROOT / "var" / f"bench-{name}"))
    Path(os.environ["VAR_DIR"]).mkdir(parents=True, exist_ok=True)
    if not os.environ.get("REDIS_URL"):
        os.environ["REDIS_URL"] = _own_redis()
    os.environ["CELERY_BROKER_URL"] = os.environ["REDIS_URL"]
    os.environ["CELERY_RESULT_BACKEND"] = os.environ["REDIS_URL"]
    if capacity:
        for scope in ("MESSAGES", "SEARCHES", "INGESTS"):
            for per in ("USER", "PROJECT"):
                os.environ.setdefault(f"THROTTLE_{scope}_{per}", "1000000/min")
    if offline:
        for variable in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "EMBEDDINGS_BASE_URL", "QDRANT_URL"):
            if variable not in settings:
                os.environ[variable] = ""
    import django  # noqa: PLC0415 (only once the environment above is set)

    django.setup()


def procfile(name: str, **values: str) -> list[str]:
    """The Procfile's `name` line as a command, its ${VAR:-default}s at `values` or their
    defaults, run by this Python."""
    lines = (ROOT / "Procfile").read_text().splitlines()
    line = next(ln for ln in lines if ln.startswith(f"{name}:")).split(":", 1)[1]
    line = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: values.get(m[1], m[2]), line)
    parts = [p for p in line.split() if "=" not in p or p.startswith("-")]
    return [sys.executable, "-m", *parts]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _own_redis() -> str:
    from tests.redis_server import PrivateRedis  # noqa: PLC0415 (a bench without REDIS_URL)

    server = PrivateRedis().start()
    atexit.register(server.stop)
    return server.url
