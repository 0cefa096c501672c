"""What operators see of the LLM endpoint (health's `llm`)."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit, urlunsplit

from django.conf import settings

from .providers import llm_configured

OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"


def llm_endpoint() -> str | None:
    """The LLM endpoint agents answer through, safe to show (no credentials in it), or
    None for the offline provider."""
    if not llm_configured():
        return None
    parts = urlsplit(settings.OPENAI_BASE_URL or OPENAI_DEFAULT_BASE_URL)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def llm_health() -> dict:
    """Which LLM endpoint agents answer through and whether it answers (health's `llm`):
    a GET of its /models with the configured key, which is never reported. Unhealthy
    when it cannot be reached or refuses the key."""
    endpoint = llm_endpoint()
    if endpoint is None:
        return {
            "healthy": True,
            "provider": "offline",
            "endpoint": None,
            "detail": "no OPENAI_BASE_URL or OPENAI_API_KEY: the offline provider answers",
        }
    report = {
        "provider": "openai",
        "endpoint": endpoint,
        "default_model": settings.LLM_DEFAULT_MODEL or None,
        "api_key_set": bool(settings.OPENAI_API_KEY),
    }
    if not settings.LLM_DEFAULT_MODEL:
        report["note"] = "LLM_DEFAULT_MODEL is unset: agents without a model cannot answer"
    base = (settings.OPENAI_BASE_URL or OPENAI_DEFAULT_BASE_URL).rstrip("/")
    probe = urllib.request.Request(f"{base}/models", method="GET")
    if settings.OPENAI_API_KEY:
        probe.add_header("Authorization", f"Bearer {settings.OPENAI_API_KEY}")
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(probe, timeout=settings.LLM_HEALTH_TIMEOUT_SECONDS) as r:
            status = r.status
    except urllib.error.HTTPError as exc:  # it answered, with an error status
        status = exc.code
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return {**report, "healthy": False, "reachable": False,
                "error": f"the LLM endpoint could not be reached: {reason}"}  # fmt: skip
    report.update(
        reachable=True,
        status_code=status,
        latency_ms=round((time.perf_counter() - started) * 1000, 2),
    )
    if status in (401, 403):
        return {**report, "healthy": False, "error": f"the LLM endpoint refused the key ({status})"}
    return {**report, "healthy": True}
