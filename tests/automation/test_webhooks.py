"""Webhooks: endpoints through the API, Standard Webhooks signatures (the spec's test
vector), deliveries recorded with a run's end and sent by a real worker over HTTP
(an endpoint drained in batches: live endpoints get every event once while a dead one
backs off), retries with backoff, the log and the replay."""

from __future__ import annotations

import json
import socket
import time
from datetime import UTC, datetime, timedelta

import pytest
from django.utils import timezone
from standardwebhooks.webhooks import Webhook

from automation.delivery import _claim, endpoint_drain
from automation.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from automation.webhooks import deliveries_due, signature_headers
from chat.models import Run
from chat.state import run_end
from tests.local_http import RawEndpoint
from tests.workers import wait_until
from workspaces.redis import scoped

pytestmark = pytest.mark.django_db(transaction=True)


def _hooks_url(project) -> str:
    return f"/my/projects/{project.id}/webhooks/"


def _end_a_run(api, session, status=Run.Status.DONE) -> Run:
    """A message's run, ended through chat.state (the one run-end path)."""
    url = f"/my/projects/{session.project_id}/chat/{session.id}/messages/"
    assert api.post(url, {"content": "q"}, format="json").status_code == 202
    run = Run.objects.filter(session=session).order_by("-created_at").first()
    Run.objects.filter(id=run.id).update(status=Run.Status.RUNNING)
    assert run_end(run=run, status=status, content="a", error="boom" if status == "error" else "")
    return run


def test_the_signature_matches_the_specs_test_vector():
    # Standard Webhooks' published vector (the spec's reference libraries' tests).
    headers = signature_headers(
        secret="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        msg_id="msg_p5jXN8AQM9LWM0D4loKWxJek",
        body='{"test": 2432232314}',
        at=datetime.fromtimestamp(1614265330, UTC),
    )
    assert headers == {
        "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "webhook-timestamp": "1614265330",
        "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    }


def test_an_endpoint_is_made_with_a_secret_shown_once(api, project, receiver_factory):
    receiver = receiver_factory()
    response = api.post(
        _hooks_url(project), {"url": receiver.url, "events": ["run.completed"]}, format="json"
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["secret"].startswith("whsec_")
    assert WebhookEndpoint.objects.get(id=body["id"]).secret == body["secret"]
    listed = api.get(_hooks_url(project)).json()["webhooks"]
    assert [w["id"] for w in listed] == [body["id"]] and "secret" not in listed[0]
    assert "secret" not in api.get(f"{_hooks_url(project)}{body['id']}/").json()


@pytest.mark.parametrize(
    "payload",
    [
        {"url": "http://127.0.0.1:9/hook", "events": ["run.completed"]},  # not allowed
        {"url": "ftp://example.com/", "events": ["run.completed"]},
        {"url": "https://example.com/", "events": []},
        {"url": "https://example.com/", "events": ["run.exploded"]},
        {"url": "https://example.com/", "events": ["run.completed"], "secret": "mine"},
    ],
)
def test_a_bad_endpoint_is_a_400_and_writes_nothing(api, project, payload):
    response = api.post(_hooks_url(project), payload, format="json")
    assert response.status_code == 400, response.content
    assert not WebhookEndpoint.objects.exists()


def test_another_users_endpoints_are_404(other_api, api, project, receiver_factory):
    receiver = receiver_factory()
    hook = api.post(
        _hooks_url(project), {"url": receiver.url, "events": ["run.completed"]}, format="json"
    ).json()
    base = f"{_hooks_url(project)}{hook['id']}/"
    assert other_api.get(_hooks_url(project)).status_code == 404
    assert other_api.post(_hooks_url(project), {}, format="json").status_code == 404
    for method, url in [
        ("get", base),
        ("patch", base),
        ("delete", base),
        ("get", base + "deliveries/"),
        ("post", base + "rotate-secret/"),
        ("post", base + "deliveries/msg_x/replay/"),
    ]:
        assert getattr(other_api, method)(url).status_code == 404, (method, url)
    assert WebhookEndpoint.objects.filter(id=hook["id"]).exists()


def test_a_run_end_is_delivered_signed_by_the_webhooks_worker(
    api, session, receiver_factory, webhooks_worker
):
    receiver = receiver_factory()
    failed_only = receiver_factory()
    hook = api.post(
        _hooks_url(session.project),
        {"url": receiver.url, "events": ["run.completed", "run.failed"]},
        format="json",
    ).json()
    api.post(
        _hooks_url(session.project),
        {"url": failed_only.url, "events": ["run.failed"]},
        format="json",
    )
    run = _end_a_run(api, session)
    wait_until(lambda: receiver.received, what="the delivery")
    got = receiver.received[0]
    payload = Webhook(hook["secret"]).verify(got["body"], got["headers"])
    assert payload["type"] == "run.completed"
    assert payload["data"]["run_id"] == str(run.id)
    assert payload["data"]["status"] == "done"
    delivery = WebhookDelivery.objects.get(endpoint_id=hook["id"])
    assert got["headers"]["webhook-id"] == delivery.id
    wait_until(
        lambda: WebhookDelivery.objects.get(id=delivery.id).status == "delivered",
        what="delivered",
    )
    assert failed_only.received == []  # not subscribed to completions
    log = api.get(f"{_hooks_url(session.project)}{hook['id']}/deliveries/").json()
    assert log["deliveries"][0]["status"] == "delivered"
    assert log["deliveries"][0]["log"][0]["status_code"] == 204

    _end_a_run(api, session, status=Run.Status.ERROR)
    wait_until(lambda: len(receiver.received) == 2 and failed_only.received, what="failures")
    assert json.loads(failed_only.received[0]["body"])["type"] == "run.failed"


def test_a_failing_endpoint_is_retried_with_backoff_then_replayed(
    api, session, receiver_factory, settings
):
    settings.WEBHOOK_BACKOFF_SECONDS = [60, 600]
    receiver = receiver_factory(status=500)
    hook = api.post(
        _hooks_url(session.project), {"url": receiver.url, "events": ["run.completed"]},
        format="json",
    ).json()  # fmt: skip
    _end_a_run(api, session)
    _end_a_run(api, session)
    first, second = WebhookDelivery.objects.filter(endpoint_id=hook["id"]).order_by("created_at")
    drained = endpoint_drain(endpoint_id=hook["id"])
    assert drained == {"delivered": 0, "failed": 1, "state": "backoff"}
    endpoint = WebhookEndpoint.objects.get(id=hook["id"])
    assert endpoint.consecutive_failures == 1
    assert endpoint.blocked_until > timezone.now() + timedelta(seconds=50)
    # The first failure backs the endpoint off: the other delivery waits untried.
    assert len(receiver.received) == 1
    assert WebhookDelivery.objects.get(id=first.id).attempts == 1
    waiting = WebhookDelivery.objects.get(id=second.id)
    assert waiting.attempts == 0 and waiting.next_attempt_at == endpoint.blocked_until
    assert WebhookAttempt.objects.filter(delivery_id=first.id).get().status_code == 500
    # While it backs off, a drain sends nothing and the sweep leaves it.
    assert endpoint_drain(endpoint_id=hook["id"])["state"] == "backoff"
    assert len(receiver.received) == 1
    assert deliveries_due() == 0

    # Past the retry window, a failure gives the delivery up (one probe: the oldest).
    WebhookEndpoint.objects.filter(id=hook["id"]).update(blocked_until=None)
    WebhookDelivery.objects.filter(id=first.id).update(
        created_at=timezone.now() - timedelta(days=1), next_attempt_at=timezone.now()
    )
    assert endpoint_drain(endpoint_id=hook["id"])["failed"] == 1
    assert WebhookDelivery.objects.get(id=first.id).status == "failed"
    assert len(receiver.received) == 2

    # The endpoint is fixed; the owner replays the given-up delivery: same webhook-id.
    receiver.status = 200
    url = f"{_hooks_url(session.project)}{hook['id']}/deliveries/{first.id}/replay/"
    replayed = api.post(url)
    assert replayed.status_code == 202, replayed.content
    assert replayed.json()["status"] == "pending"
    assert endpoint_drain(endpoint_id=hook["id"])["delivered"] == 1
    assert receiver.received[-1]["headers"]["webhook-id"] == first.id
    assert WebhookDelivery.objects.get(id=first.id).status == "delivered"
    endpoint.refresh_from_db()
    assert endpoint.consecutive_failures == 0 and endpoint.blocked_until is None
    # The other delivery, once due, goes out.
    WebhookDelivery.objects.filter(id=second.id).update(next_attempt_at=timezone.now())
    assert endpoint_drain(endpoint_id=hook["id"])["delivered"] == 1
    assert WebhookDelivery.objects.get(id=second.id).status == "delivered"
    assert len(receiver.received) == 4


def test_a_refused_address_is_logged_as_a_failed_attempt(api, session, receiver_factory, settings):
    receiver = receiver_factory()
    hook = api.post(
        _hooks_url(session.project), {"url": receiver.url, "events": ["run.completed"]},
        format="json",
    ).json()  # fmt: skip
    settings.EGRESS_ALLOW_NETWORKS = {**settings.EGRESS_ALLOW_NETWORKS, "webhooks": []}
    _end_a_run(api, session)
    delivery = WebhookDelivery.objects.get(endpoint_id=hook["id"])
    assert endpoint_drain(endpoint_id=hook["id"])["failed"] == 1
    assert WebhookDelivery.objects.get(id=delivery.id).status == "pending"
    attempt = WebhookAttempt.objects.get(delivery_id=delivery.id)
    assert attempt.status_code is None and "non-public address" in attempt.error
    assert receiver.received == []


def test_deleting_the_project_removes_its_endpoints_and_log(api, session, receiver_factory):
    receiver = receiver_factory()
    api.post(
        _hooks_url(session.project), {"url": receiver.url, "events": ["run.completed"]},
        format="json",
    )  # fmt: skip
    _end_a_run(api, session)
    assert WebhookDelivery.objects.count() == 1
    assert api.delete(f"/my/projects/{session.project_id}/").status_code == 204
    assert not WebhookEndpoint.objects.exists() and not WebhookDelivery.objects.exists()


def test_an_endpoint_with_every_attempt_slot_taken_waits(api, session, receiver_factory, settings):
    settings.WEBHOOK_ENDPOINT_CONCURRENCY = 1
    receiver = receiver_factory()
    hook = api.post(
        _hooks_url(session.project), {"url": receiver.url, "events": ["run.completed"]},
        format="json",
    ).json()  # fmt: skip
    _end_a_run(api, session)
    delivery = WebhookDelivery.objects.get(endpoint_id=hook["id"])
    redis = scoped(session.project.owner_id, session.project_id)
    slot = f"webhooks:inflight:{hook['id']}"
    redis.incr(slot)  # a drain in flight (a hanging endpoint)
    assert endpoint_drain(endpoint_id=hook["id"])["state"] == "busy"
    assert receiver.received == []
    waiting = WebhookDelivery.objects.get(id=delivery.id)
    assert waiting.attempts == 0 and waiting.status == "pending"
    redis.decr(slot)
    assert endpoint_drain(endpoint_id=hook["id"])["delivered"] == 1
    assert int(redis.get(slot)) == 0


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/hook"


def test_live_endpoints_get_every_event_once_while_a_dead_one_backs_off(
    api, session, receiver_factory, webhooks_worker, settings
):
    settings.WEBHOOK_BACKOFF_SECONDS = [300]
    settings.WEBHOOK_DRAIN_BATCH = 4  # several batches per endpoint
    live = [receiver_factory() for _ in range(3)]
    hooks = [
        api.post(
            _hooks_url(session.project), {"url": r.url, "events": ["run.completed"]},
            format="json",
        ).json()
        for r in live
    ]  # fmt: skip
    # A dead endpoint: nothing listens on its port (connection refused).
    dead = WebhookEndpoint.objects.create(
        project=session.project,
        url=_closed_port_url(),
        events=["run.completed"],
        secret="whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    )
    runs = [str(_end_a_run(api, session).id) for _ in range(12)]

    def got(receiver) -> list[str]:
        return [json.loads(r["body"])["data"]["run_id"] for r in receiver.received]

    wait_until(lambda: all(len(got(r)) >= len(runs) for r in live), what="every live delivery")
    for receiver, hook in zip(live, hooks, strict=True):
        assert sorted(got(receiver)) == sorted(runs)  # nothing lost, nothing twice
        for r in receiver.received:
            Webhook(hook["secret"]).verify(r["body"], r["headers"])
        wait_until(
            lambda hook=hook: (
                not WebhookDelivery.objects.filter(endpoint_id=hook["id"])
                .exclude(status="delivered")
                .exists()
            ),
            what="all marked delivered",
        )
        assert set(
            WebhookAttempt.objects.filter(delivery__endpoint_id=hook["id"]).values_list(
                "number", flat=True
            )
        ) == {1}
    # The dead one got one attempt (then it backs off as a whole); none was lost.
    wait_until(
        lambda: WebhookAttempt.objects.filter(delivery__endpoint=dead).exists(),
        what="the dead endpoint's attempt",
    )
    dead.refresh_from_db()
    assert dead.consecutive_failures == 1 and dead.blocked_until > timezone.now()
    assert WebhookAttempt.objects.filter(delivery__endpoint=dead).count() == 1
    assert WebhookDelivery.objects.filter(endpoint=dead, status="pending").count() == len(runs)


def test_a_batch_whose_drain_died_is_sent_again_after_its_lease(
    api, session, receiver_factory, webhooks_worker
):
    receiver = receiver_factory()
    hook = api.post(
        _hooks_url(session.project), {"url": receiver.url, "events": ["run.completed"]},
        format="json",
    ).json()  # fmt: skip
    redis = scoped(session.project.owner_id, session.project_id)
    kick = f"webhooks:kick:{hook['id']}"
    redis.set(kick, 1)  # a drain is under way: the run's end starts none
    _end_a_run(api, session)
    # That drain claims the delivery and dies before sending it.
    (claimed,) = _claim(hook["id"], limit=10)
    assert deliveries_due() == 0  # leased: not due
    assert _claim(hook["id"], limit=10) == []  # nor claimable twice
    WebhookDelivery.objects.filter(id=claimed[0]).update(next_attempt_at=timezone.now())
    redis.delete(kick)  # its kick counter expired
    assert deliveries_due() == 1  # the lease ran out: the sweep kicks the endpoint
    wait_until(lambda: receiver.received, what="the delivery")
    assert [r["headers"]["webhook-id"] for r in receiver.received] == [claimed[0]]


def _runs_ended_while_no_drain_runs(api, session, hook_id: str, count: int) -> None:
    """`count` run ends recorded for the endpoint while its kick counter says a drain is
    under way (so none starts), then the counter gone, as after a drain that ended."""
    redis = scoped(session.project.owner_id, session.project_id)
    redis.set(f"webhooks:kick:{hook_id}", 1)
    for _ in range(count):
        _end_a_run(api, session)
    redis.delete(f"webhooks:kick:{hook_id}")


@pytest.mark.parametrize(("cap", "expected"), [(16, 4), (3, 3)])
def test_a_batch_goes_out_over_several_connections_at_once(
    api, session, receiver_factory, webhooks_worker, settings, cap, expected
):
    settings.WEBHOOK_SEND_LANES = 4
    settings.WEBHOOK_ENDPOINT_CONCURRENCY = cap  # attempts in flight, over all lanes
    # The first send goes alone; the others are answered once `expected` are in flight.
    receiver = receiver_factory(hold=expected)
    hook = api.post(
        _hooks_url(session.project), {"url": receiver.url, "events": ["run.completed"]},
        format="json",
    ).json()  # fmt: skip
    _runs_ended_while_no_drain_runs(api, session, hook["id"], 1 + 2 * expected)
    assert deliveries_due() == 1  # one drain, on the worker
    wait_until(
        lambda: (
            WebhookDelivery.objects.filter(endpoint_id=hook["id"], status="delivered").count()
            == 1 + 2 * expected
        ),
        what="all delivered",
    )
    assert receiver.most_in_flight == expected
    ids = [r["headers"]["webhook-id"] for r in receiver.received]
    assert sorted(ids) == sorted(set(ids))  # each once
    assert set(WebhookAttempt.objects.values_list("number", flat=True)) == {1}
    redis = scoped(session.project.owner_id, session.project_id)
    wait_until(lambda: int(redis.get(f"webhooks:inflight:{hook['id']}") or 0) == 0, what="slots")


def test_sends_in_flight_when_the_endpoint_fails_back_it_off_once(
    api, session, receiver_factory, settings
):
    settings.WEBHOOK_SEND_LANES = 4
    settings.WEBHOOK_BACKOFF_SECONDS = [60, 600]
    # 204 to the first (sent alone), then 500 to the next 4, sent at once.
    receiver = receiver_factory(hold=4, fail_from=2)
    hook = api.post(
        _hooks_url(session.project), {"url": receiver.url, "events": ["run.completed"]},
        format="json",
    ).json()  # fmt: skip
    _runs_ended_while_no_drain_runs(api, session, hook["id"], 12)
    assert endpoint_drain(endpoint_id=hook["id"]) == {
        "delivered": 1,
        "failed": 1,
        "state": "backoff",
    }
    assert len(receiver.received) == 5 and receiver.most_in_flight == 4
    endpoint = WebhookEndpoint.objects.get(id=hook["id"])
    assert endpoint.consecutive_failures == 1  # one failure of the endpoint, not four
    deliveries = WebhookDelivery.objects.filter(endpoint_id=hook["id"])
    sent = {r["headers"]["webhook-id"] for r in receiver.received}
    (delivered,) = [d for d in deliveries if d.status == "delivered"]
    assert delivered.id in sent
    failed = [d for d in deliveries if d.id in sent and d.id != delivered.id]
    untried = [d for d in deliveries if d.id not in sent]
    assert len(failed) == 4 and len(untried) == 7
    for delivery in failed:  # each failure logged, due again after the backoff
        assert delivery.status == "pending" and delivery.attempts == 1
        assert delivery.next_attempt_at == endpoint.blocked_until
        assert delivery.log.get().status_code == 500
    for delivery in untried:  # given back untried, waiting for the backoff too
        assert delivery.status == "pending" and delivery.attempts == 0
        assert delivery.next_attempt_at == endpoint.blocked_until
    redis = scoped(session.project.owner_id, session.project_id)
    assert int(redis.get(f"webhooks:inflight:{hook['id']}")) == 0


class _Trickler(RawEndpoint):
    """Answers a byte every `every` seconds (each well within any read timeout) for
    `seconds`: of its headers, or (`body`) of a body after whole headers."""

    def __init__(self, *, every: float, seconds: float, body: bool = False) -> None:
        self.every, self.seconds, self.body = every, seconds, body
        super().__init__()

    def answer(self, conn: socket.socket) -> None:
        if self.body:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        else:
            conn.sendall(b"HTTP/1.1 204 No Content\r\nX-Slow: ")
        ends = time.monotonic() + self.seconds
        while time.monotonic() < ends and not self.closed.wait(self.every):
            conn.sendall(b"a")
        conn.sendall(b"\r\n\r\n")


class _Flooder(RawEndpoint):
    """Answers 200 with an endless body, as fast as the client takes it; counts what it
    managed to send."""

    sent = 0

    def answer(self, conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"100000\r\n" + b"x" * 0x100000 + b"\r\n"
        while not self.closed.is_set():
            conn.sendall(chunk)
            self.sent += len(chunk)


@pytest.mark.parametrize("body", [False, True], ids=["headers", "body"])
def test_an_endpoint_that_answers_a_byte_at_a_time_is_cut_off_at_the_timeout(
    api, session, settings, body
):
    """urllib3's read timeout bounds each read: an endpoint that keeps sending a byte
    would hold its attempt (and a webhooks thread) for as long as it liked. The whole
    answer, its body included, has WEBHOOK_TIMEOUT_SECONDS."""
    settings.EGRESS_ALLOW_NETWORKS = {**settings.EGRESS_ALLOW_NETWORKS, "webhooks": ["127.0.0.0/8"]}
    settings.WEBHOOK_TIMEOUT_SECONDS = 1.0
    drained, took, attempt = _one_attempt(api, session, _Trickler(every=0.3, seconds=30, body=body))
    assert drained["failed"] == 1
    assert took < 5, took  # its 1 s, give or take the checker's grain and a loaded machine
    assert attempt.status_code is None and "timed out" in attempt.error, attempt.error


def _one_attempt(api, session, endpoint: RawEndpoint) -> tuple[dict, float, WebhookAttempt]:
    """A run's end delivered to `endpoint` by one drain: (what the drain says, how long
    it took, the attempt); the endpoint is stopped after."""
    try:
        hook = api.post(
            _hooks_url(session.project), {"url": endpoint.url, "events": ["run.completed"]},
            format="json",
        ).json()  # fmt: skip
        _end_a_run(api, session)
        started = time.monotonic()
        drained = endpoint_drain(endpoint_id=hook["id"])
        took = time.monotonic() - started
    finally:
        endpoint.stop()
    return drained, took, WebhookAttempt.objects.get(delivery__endpoint_id=hook["id"])


def test_an_endpoint_that_answers_an_endless_body_costs_a_delivery_64_kib(api, session, settings):
    """The status is the answer: the body is read up to 64 KiB and the rest left unread
    (its connection closed). Read whole, as it was, one such answer held 3.4 GB of the
    webhooks worker's memory within the 5 s timeout."""
    settings.EGRESS_ALLOW_NETWORKS = {**settings.EGRESS_ALLOW_NETWORKS, "webhooks": ["127.0.0.0/8"]}
    flooder = _Flooder()
    drained, took, attempt = _one_attempt(api, session, flooder)
    assert drained["delivered"] == 1 and attempt.status_code == 200, attempt.error
    assert took < 2, took
    # What the endpoint got into the connection before it was closed: the 64 KiB read
    # and what the sockets' buffers hold, not the gigabytes it would have sent.
    assert flooder.sent < 64 * 2**20, flooder.sent
