"""Sending webhook deliveries: the webhooks worker drains an endpoint at a time.

- **Kicked, not one task per delivery.** A run's end (or the sweep, or a replay) *kicks*
  the endpoints concerned: a Redis counter per endpoint (`webhooks:kick:<id>`); the kick
  that finds it at 0 puts one drain task on the webhooks queue, later kicks only count.
  The drain ends by deleting the counter if it still holds the value it read before its
  last empty pass (compare and delete), else it drains again: no kick is lost, and a
  burst of 1,000 completions is a handful of tasks per endpoint.
- **A drain** claims the endpoint's due deliveries in batches
  (`SELECT … FOR UPDATE SKIP LOCKED LIMIT WEBHOOK_DRAIN_BATCH`, oldest first, on the
  partial index of pending deliveries per endpoint, so other endpoints' backlogs are not
  read; the claim moves `next_attempt_at` a lease ahead, so a crashed drain's batch is due
  again after LEASE_SECONDS: at least once), POSTs them over up to WEBHOOK_SEND_LANES of
  the endpoint's kept-alive connections at once (the first alone, so a failing endpoint
  gets one attempt; the helper threads are the batch's own, so a hanging endpoint holds
  none that others need), and writes the outcome of the batch in one transaction (the
  attempts in one INSERT, the delivered ones in one UPDATE). A delivery recorded while a
  batch is out waits for that batch: its sends ahead divided by the lanes.
- **The egress guard** is kept: the endpoint's host is resolved and checked
  (`common.egress.check_url`, purpose `webhooks`) before its connections are made, again
  every WEBHOOK_RESOLVE_SECONDS and after any connection error; connections go to the
  checked address (Host header, TLS server name and certificate check keep the host).
  They are kept per endpoint (a urllib3 pool each, a third of httpx's CPU per request:
  no redirects, no retries, no proxy).
- **A failure backs the endpoint off as a whole** (WEBHOOK_BACKOFF_SECONDS): the failed
  deliveries (those in flight with it too) count an attempt, the rest of the batch goes
  back untried, and the kick
  counter is parked until the backoff ends, so completions for a dead endpoint start no
  tasks. Then one delivery probes it (`blocked_until` holds a probe lease); a success
  drains the rest. A dead endpoint holds at most one worker thread (its probe, up to
  WEBHOOK_TIMEOUT_SECONDS), never the live endpoints' drains.
- **An attempt's answer has WEBHOOK_TIMEOUT_SECONDS in all.** urllib3's read timeout
  bounds each read, so an endpoint that sends a byte now and then would hold an attempt
  for as long as it liked; one thread per process (`_Deadlines`) shuts the connection of
  an answer past its time, and the attempt fails as a timeout.
- **Slow endpoints get parallel drains**: a drain whose full batch took longer than
  WEBHOOK_DRAIN_SPLIT_SECONDS starts another drain of the same endpoint. Each drain holds
  a slot of `webhooks:inflight:<id>` per lane; one finding fewer than its lanes free
  sends over those, one finding none ends: at most WEBHOOK_ENDPOINT_CONCURRENCY attempts
  are ever in flight to one endpoint.
- Order: an endpoint's deliveries leave oldest first within a drain; lanes, retries,
  replays and parallel drains can reorder them (receivers order by the body's
  `timestamp`).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import certifi
import urllib3
from celery import current_app
from django.conf import settings
from django.db import connection, transaction
from django.db.models import F, Q
from django.utils import timezone
from standardwebhooks.webhooks import Webhook

from agentbus import WEBHOOK_QUEUE
from common.egress import WEBHOOKS, EgressRefused, check_url
from workspaces.redis import scoped

from .models import WebhookAttempt, WebhookDelivery, WebhookEndpoint

logger = logging.getLogger(__name__)

DRAIN_TASK = "automation.drain_webhooks"
# A claimed batch is due again after this long if its drain dies (at least once); a
# drain stops sending a batch before it runs out and gives the rest back.
LEASE_SECONDS = 60
# The kick counter of an endpoint outlives a drain that died by this long at most.
KICK_TTL_SECONDS = 2 * LEASE_SECONDS

_KICK = "webhooks:kick:"
_SLOT = "webhooks:inflight:"

# INCR, with a TTL on the first kick (a dead drain's counter does not stay forever).
_KICK_LUA = """
local n = redis.call('incr', KEYS[1])
if n == 1 then redis.call('expire', KEYS[1], ARGV[1]) end
return n
"""
# Take up to ARGV[1] of an endpoint's ARGV[2] attempt slots; returns how many were taken.
_SLOTS_LUA = """
local want, cap = tonumber(ARGV[1]), tonumber(ARGV[2])
local n = redis.call('incrby', KEYS[1], want)
redis.call('expire', KEYS[1], ARGV[3])
if n - want >= cap then redis.call('decrby', KEYS[1], want) return 0 end
if n > cap then redis.call('decrby', KEYS[1], n - cap) return want - (n - cap) end
return want
"""
# Delete the counter if no kick came since the drain read it (or it is gone).
_DONE_LUA = """
local v = redis.call('get', KEYS[1])
if (not v) or v == ARGV[1] then redis.call('del', KEYS[1]) return 1 end
return 0
"""


def signature_headers(*, secret: str, msg_id: str, body: str, at: datetime) -> dict[str, str]:
    """The Standard Webhooks headers of `body` (the standardwebhooks package signs:
    `v1,` + base64 HMAC-SHA256 of `id.timestamp.body` under the secret's bytes)."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id=msg_id, timestamp=at, data=body),
    }


def backoff_seconds(failures: int) -> float:
    steps = settings.WEBHOOK_BACKOFF_SECONDS
    return steps[min(max(failures, 1), len(steps)) - 1]


# --- Kicks ------------------------------------------------------------------------------


def endpoints_kick(endpoints: list[tuple]) -> int:
    """Have each (owner id, project id, endpoint id) drained soon: a drain task for those
    with none on its way or running. Returns how many tasks were sent."""
    sent = 0
    for owner_id, project_id, endpoint_id in endpoints:
        redis = scoped(owner_id, project_id)
        kicks = redis.script(_KICK_LUA, keys=[f"{_KICK}{endpoint_id}"], args=[KICK_TTL_SECONDS])
        if int(kicks) == 1:
            # By name: the task module (automation.tasks) imports this one.
            current_app.send_task(
                DRAIN_TASK, kwargs={"endpoint_id": str(endpoint_id)}, queue=WEBHOOK_QUEUE
            )
            sent += 1
    return sent


def kick_reset(*, owner_id, project_id, endpoint_id) -> None:
    """Forget a parked kick counter (the endpoint's backoff was lifted)."""
    scoped(owner_id, project_id).delete(f"{_KICK}{endpoint_id}")


# --- Connections ------------------------------------------------------------------------


class _Deadlines:
    """Shuts the connection of an answer that outlasts its time (granularity: GRAIN
    seconds, so a burst of attempts wakes the thread a few times a second, not once
    per attempt); the blocked read then fails."""

    GRAIN = 0.25

    def __init__(self) -> None:
        self._reset()
        # A forked child has no thread of its parent's: it starts its own.
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._live: dict[int, urllib3.connection.HTTPConnection] = {}
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, conn: urllib3.connection.HTTPConnection, seconds: float) -> int:
        token = next(self._tokens)
        with self._cond:
            self._live[token] = conn
            heapq.heappush(self._heap, (time.monotonic() + seconds, token))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="webhook-deadlines", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        return token

    def done(self, token: int) -> bool:
        """Whether the connection was cut (its time ran out before this)."""
        with self._cond:
            return self._live.pop(token, None) is None

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                wait = self._heap[0][0] - time.monotonic()
                if wait > 0:
                    self._cond.wait(max(wait, self.GRAIN))
                    continue
                now, late = time.monotonic(), []
                while self._heap and self._heap[0][0] <= now:
                    conn = self._live.pop(heapq.heappop(self._heap)[1], None)
                    if conn is not None:
                        late.append(conn)
            for conn in late:
                try:
                    if conn.sock is not None:
                        conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # closed meanwhile


_deadlines = _Deadlines()


# How much of an answer's body is read (the status is the answer: the body is not used).
# A longer body is left unread and its connection closed, so an endpoint that answers
# with gigabytes costs a delivery thread 64 KiB, not the gigabytes.
ANSWER_BODY_MAX_BYTES = 64 * 1024


class _AnswerBounded:
    """A connection whose answer (status, headers, body) must come within
    WEBHOOK_TIMEOUT_SECONDS in all, and whose body is read up to
    ANSWER_BODY_MAX_BYTES (the pool is asked not to preload it)."""

    def getresponse(self):
        token = _deadlines.watch(self, settings.WEBHOOK_TIMEOUT_SECONDS)
        try:
            response = super().getresponse()
            if len(response.read(ANSWER_BODY_MAX_BYTES + 1, decode_content=False)) > (
                ANSWER_BODY_MAX_BYTES
            ):
                self.close()  # the rest stays unread: not a connection to use again
        except Exception as exc:
            if _deadlines.done(token):  # urllib3 reports it as a read timeout
                raise TimeoutError("no whole answer in time") from exc
            raise
        if _deadlines.done(token):
            # Cut: what was read may look whole (headers end at the end of the stream).
            raise TimeoutError("no whole answer in time")
        return response


class _Connection(_AnswerBounded, urllib3.connection.HTTPConnection):
    pass


class _TLSConnection(_AnswerBounded, urllib3.connection.HTTPSConnection):
    pass


class _Pool(urllib3.HTTPConnectionPool):
    ConnectionCls = _Connection


class _TLSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _TLSConnection


@dataclass
class _Target:
    """An endpoint's kept-alive connections (a urllib3 pool to its checked address: a
    third of httpx's CPU per request, which is most of a delivery's cost)."""

    url: str
    signer: Webhook
    secret: str
    scheme: str
    host: str
    port: int
    path: str
    host_header: str
    pool: urllib3.HTTPConnectionPool | None = None
    checked_at: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def of(cls, endpoint: WebhookEndpoint) -> _Target:
        parts = urlsplit(endpoint.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        default = (parts.scheme, port) in (("http", 80), ("https", 443))
        host = parts.hostname or ""
        shown = f"[{host}]" if ":" in host else host
        return cls(
            url=endpoint.url,
            secret=endpoint.secret,
            signer=Webhook(endpoint.secret),
            scheme=parts.scheme,
            host=host,
            port=port,
            path=(parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
            host_header=shown if default else f"{shown}:{port}",
        )

    def checked_pool(self) -> urllib3.HTTPConnectionPool:
        """The pool to the address the egress guard checked (raises EgressRefused); the
        host is checked again after WEBHOOK_RESOLVE_SECONDS or a connection error."""
        with self.lock:
            fresh = time.monotonic() - self.checked_at <= settings.WEBHOOK_RESOLVE_SECONDS
            if self.pool is not None and fresh:
                return self.pool
            _host, _port, address = check_url(self.url, purpose=WEBHOOKS)
            self.checked_at = time.monotonic()
            if self.pool is not None and self.pool.host == address.strip("[]"):
                return self.pool
            self.close()
            size = settings.WEBHOOK_ENDPOINT_CONCURRENCY
            common = {"maxsize": size, "block": False, "retries": False}
            if self.scheme == "https":
                # TLS to the checked address, with the endpoint's host as server name and
                # certificate name.
                self.pool = _TLSPool(
                    address, self.port, server_hostname=self.host, assert_hostname=self.host,
                    cert_reqs="CERT_REQUIRED", ca_certs=certifi.where(), **common,
                )  # fmt: skip
            else:
                self.pool = _Pool(address, self.port, **common)
            return self.pool

    def forget_address(self) -> None:
        with self.lock:
            self.checked_at = 0.0

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None


_targets: OrderedDict[str, _Target] = OrderedDict()
_targets_lock = threading.Lock()
# Kept endpoints' pools per process (least recently used closed beyond this).
MAX_TARGETS = 256


def _target(endpoint: WebhookEndpoint) -> _Target:
    key = str(endpoint.id)
    with _targets_lock:
        target = _targets.get(key)
        if target is not None and (target.url != endpoint.url or target.secret != endpoint.secret):
            _targets.pop(key).close()
            target = None
        if target is None:
            target = _targets[key] = _Target.of(endpoint)
            while len(_targets) > MAX_TARGETS:
                _targets.popitem(last=False)[1].close()
        _targets.move_to_end(key)
        return target


def _send(target: _Target, *, msg_id: str, body: str) -> tuple[int | None, str, int]:
    """(status code or None, error, milliseconds) of one POST (no redirects followed, no
    retries: a failure is the endpoint's, and backs it off)."""
    started = time.monotonic()
    try:
        pool = target.checked_pool()
    except EgressRefused as exc:
        return None, f"ConnectError: {exc}", int((time.monotonic() - started) * 1000)
    at = datetime.now(UTC)
    headers = {
        "host": target.host_header,
        "content-type": "application/json",
        "user-agent": "uws-webhooks/1",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": target.signer.sign(msg_id=msg_id, timestamp=at, data=body),
    }
    timeout = urllib3.Timeout(
        connect=settings.WEBHOOK_CONNECT_TIMEOUT_SECONDS, read=settings.WEBHOOK_TIMEOUT_SECONDS
    )
    try:
        response = pool.urlopen(
            "POST", target.path, body=body.encode(), headers=headers, timeout=timeout,
            retries=False, redirect=False, assert_same_host=False, preload_content=False,
        )  # fmt: skip
        response.release_conn()  # its body was read (or its connection closed) already
        status = response.status
        error = "" if 200 <= status < 300 else f"HTTP {status}"
        return status, error, int((time.monotonic() - started) * 1000)
    except urllib3.exceptions.HTTPError as exc:
        target.forget_address()  # checked again before the next attempt
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return None, error, int((time.monotonic() - started) * 1000)


# --- Draining ---------------------------------------------------------------------------


def claimable(endpoint_id, *, now: datetime, limit: int):
    """The claim's query: up to `limit` due deliveries of an endpoint, oldest first, that
    no other drain holds (index `delivery_endpoint_due`)."""
    return (
        WebhookDelivery.objects.select_for_update(skip_locked=True)
        .filter(
            endpoint_id=endpoint_id, status=WebhookDelivery.Status.PENDING, next_attempt_at__lte=now
        )
        .order_by("next_attempt_at", "created_at")
        .values_list("id", "body", "attempts", "created_at")[:limit]
    )


def _claim(endpoint_id, *, limit: int) -> list[tuple]:
    """(id, body, attempts, created_at) of up to `limit` due deliveries, leased."""
    now = timezone.now()
    with transaction.atomic():
        rows = list(claimable(endpoint_id, now=now, limit=limit))
        if rows:
            WebhookDelivery.objects.filter(id__in=[r[0] for r in rows]).update(
                next_attempt_at=now + timedelta(seconds=LEASE_SECONDS)
            )
    return rows


def _send_lanes(target: _Target, rows: list[tuple], *, lanes: int, stop_at: float) -> dict:
    """Send `rows` oldest first over up to `lanes` connections at once: the first alone
    (a failing endpoint gets one attempt, not one per lane), then the drain's thread and
    lanes - 1 helper threads of this batch only (a hanging endpoint holds threads of its
    own, never a pool others need). After a failure, or at `stop_at`, no new send starts;
    the ones in flight finish. Returns {delivery id: (status code or None, error,
    milliseconds)} of the rows tried."""
    queue = iter(rows)
    outcomes: dict[str, tuple] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()
    stop = threading.Event()

    def lane(sends: int = len(rows)) -> None:
        try:
            for _ in range(sends):
                if stop.is_set() or time.monotonic() > stop_at:
                    return
                with lock:
                    row = next(queue, None)
                if row is None:
                    return
                outcome = _send(target, msg_id=row[0], body=row[1])
                outcomes[row[0]] = outcome
                if not _ok(outcome[0]):
                    stop.set()
        except BaseException as exc:  # raised in the drain's thread below
            stop.set()
            errors.append(exc)

    lane(1)
    helpers = [
        threading.Thread(target=lane, daemon=True)
        for _ in range(min(lanes, len(rows) - 1) - 1)
        if not stop.is_set()
    ]
    for helper in helpers:
        helper.start()
    lane()
    for helper in helpers:
        helper.join()
    if errors:
        raise errors[0]
    return outcomes


def _ok(status_code: int | None) -> bool:
    return status_code is not None and 200 <= status_code < 300


def _batch(endpoint: WebhookEndpoint, rows: list[tuple], *, lanes: int) -> tuple[int, bool]:
    """Send a claimed batch and record it: (delivered, whether the endpoint failed)."""
    target = _target(endpoint)
    # Back to the pool while the endpoint is waited on: a hanging endpoint's drains must
    # not hold the process's database connections.
    connection.close()
    stop_at = time.monotonic() + LEASE_SECONDS - settings.WEBHOOK_TIMEOUT_SECONDS - 5
    outcomes = _send_lanes(target, rows, lanes=lanes, stop_at=stop_at)
    attempts = [
        WebhookAttempt(
            delivery_id=delivery_id,
            number=tried + 1,
            status_code=outcomes[delivery_id][0],
            error=outcomes[delivery_id][1][:2000],
            duration_ms=outcomes[delivery_id][2],
        )
        for delivery_id, _body, tried, _created in rows
        if delivery_id in outcomes
    ]
    delivered = [i for i, (status_code, _e, _ms) in outcomes.items() if _ok(status_code)]
    failed = [r for r in rows if r[0] in outcomes and not _ok(outcomes[r[0]][0])]
    untried = [r[0] for r in rows if r[0] not in outcomes]
    now = timezone.now()
    with transaction.atomic():
        WebhookAttempt.objects.bulk_create(attempts)
        if delivered:
            WebhookDelivery.objects.filter(id__in=delivered).update(
                status=WebhookDelivery.Status.DELIVERED,
                delivered_at=now,
                attempts=F("attempts") + 1,
                next_attempt_at=None,
            )
        if not failed:
            if untried:  # out of lease time: due again at once
                WebhookDelivery.objects.filter(id__in=untried).update(next_attempt_at=now)
            if delivered and (endpoint.consecutive_failures or endpoint.blocked_until):
                WebhookEndpoint.objects.filter(id=endpoint.id).update(
                    consecutive_failures=0, blocked_until=None
                )
                endpoint.consecutive_failures, endpoint.blocked_until = 0, None
            return len(delivered), False
        # One failure of the endpoint, however many of its sends in flight failed.
        failures = endpoint.consecutive_failures + 1
        blocked_until = now + timedelta(seconds=backoff_seconds(failures))
        WebhookEndpoint.objects.filter(id=endpoint.id).update(
            consecutive_failures=F("consecutive_failures") + 1, blocked_until=blocked_until
        )
        endpoint.consecutive_failures, endpoint.blocked_until = failures, blocked_until
        window = timedelta(seconds=settings.WEBHOOK_RETRY_WINDOW_SECONDS)
        expired = [r[0] for r in failed if r[3] + window <= blocked_until]
        retried = [r[0] for r in failed if r[3] + window > blocked_until]
        if expired:
            WebhookDelivery.objects.filter(id__in=expired).update(
                status=WebhookDelivery.Status.FAILED,
                next_attempt_at=None,
                attempts=F("attempts") + 1,
            )
        if retried:
            WebhookDelivery.objects.filter(id__in=retried).update(
                next_attempt_at=blocked_until, attempts=F("attempts") + 1
            )
        if untried:
            WebhookDelivery.objects.filter(id__in=untried).update(next_attempt_at=blocked_until)
    return len(delivered), True


def _probe_claim(endpoint: WebhookEndpoint) -> bool:
    """Take the probe slot of a failing endpoint (one probe at a time)."""
    now = timezone.now()
    return bool(
        WebhookEndpoint.objects.filter(
            Q(blocked_until__isnull=True) | Q(blocked_until__lte=now), id=endpoint.id
        ).update(blocked_until=now + timedelta(seconds=LEASE_SECONDS))
    )


def endpoint_drain(*, endpoint_id: str, sibling: bool = False) -> dict:
    """Send an endpoint's due deliveries until none is left, it fails, or (for the drain
    a kick started) no kick came since its last empty pass. Returns counts:
    `delivered`, `failed` (attempts that failed), `state` (`drained`, `backoff`,
    `busy`, `gone`)."""
    endpoint = (
        WebhookEndpoint.objects.select_related("project")
        .only("id", "url", "secret", "enabled", "consecutive_failures", "blocked_until",
              "project__id", "project__owner_id")
        .filter(id=endpoint_id)
        .first()
    )  # fmt: skip
    result = {"delivered": 0, "failed": 0, "state": "drained"}
    if endpoint is None:
        result["state"] = "gone"
        return result
    redis = scoped(endpoint.project.owner_id, endpoint.project_id)
    kick, slot = f"{_KICK}{endpoint.id}", f"{_SLOT}{endpoint.id}"
    if not endpoint.enabled:
        redis.delete(kick)
        result["state"] = "gone"
        return result
    cap = settings.WEBHOOK_ENDPOINT_CONCURRENCY
    lanes = int(
        redis.script(
            _SLOTS_LUA, keys=[slot], args=[settings.WEBHOOK_SEND_LANES, cap, KICK_TTL_SECONDS]
        )
    )
    if not lanes:
        result["state"] = "busy"  # as many attempts in flight as allowed: they carry on
        if not sibling:
            redis.delete(kick)  # the drains in flight find what this kick was for
        return result
    batch_size = settings.WEBHOOK_DRAIN_BATCH
    try:
        while True:
            seen = None if sibling else redis.get(kick)
            while True:
                if endpoint.blocked_until and endpoint.blocked_until > timezone.now():
                    _park(redis, kick, endpoint.blocked_until)
                    result["state"] = "backoff"
                    return result
                limit = batch_size
                if endpoint.consecutive_failures:
                    if not _probe_claim(endpoint):
                        endpoint.refresh_from_db(fields=["consecutive_failures", "blocked_until"])
                        if endpoint.blocked_until and endpoint.blocked_until > timezone.now():
                            continue  # parked above
                        return result
                    limit = 1
                rows = _claim(endpoint.id, limit=limit)
                if not rows:
                    if endpoint.consecutive_failures:  # the probe slot goes back
                        WebhookEndpoint.objects.filter(id=endpoint.id).update(blocked_until=None)
                        endpoint.blocked_until = None
                    break
                started = time.monotonic()
                count, failed = _batch(endpoint, rows, lanes=lanes)
                result["delivered"] += count
                result["failed"] += int(failed)
                if (
                    not failed
                    and len(rows) == limit == batch_size
                    and time.monotonic() - started > settings.WEBHOOK_DRAIN_SPLIT_SECONDS
                    and int(redis.get(slot) or 0) < cap
                ):
                    current_app.send_task(
                        DRAIN_TASK,
                        kwargs={"endpoint_id": str(endpoint.id), "sibling": True},
                        queue=WEBHOOK_QUEUE,
                    )
                redis.expire(kick, KICK_TTL_SECONDS)
            if sibling or int(
                redis.script(_DONE_LUA, keys=[kick], args=["" if seen is None else seen])
            ):
                return result
    finally:
        redis.decrby(slot, lanes)


def _park(redis, kick: str, until: datetime) -> None:
    """Hold the kick counter until a backoff ends: kicks meanwhile start no drain (the
    sweep kicks the endpoint once it is due)."""
    seconds = max(1, math.ceil((until - timezone.now()).total_seconds()))
    redis.set(kick, 1, ex=seconds)
