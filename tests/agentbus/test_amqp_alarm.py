"""The bus on a RabbitMQ whose memory alarm is raised: the broker then reads nothing more
from a connection that publishes. A publish that meets the alarm fails at once and the
next ones are refused without touching the broker, health names the alarm, a chat
message is still accepted and its run dispatched once the alarm clears, and nothing
waits on the broker for longer than AMQP_TIMEOUT_SECONDS. The alarm holds the whole
node: these tests start one of their own (tests.rabbitmq.private_rabbitmq)."""

from __future__ import annotations

import contextlib
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import amqp
import pytest
from amqp.exceptions import NotFound
from kombu import Connection
from kombu.exceptions import OperationalError

from agentbus import active, broker_health
from agentbus.broker import BrokerBlocked, amqp_blocked, amqp_depths
from agentbus.queues import project_queue
from chat.dispatch import runs_recover
from chat.models import Run
from config.celery_app import app
from tests.agentbus import tasks
from tests.agentbus.conftest import send
from tests.factories import AgentFactory, ChatSessionFactory, ProjectFactory
from tests.rabbitmq import private_rabbitmq, private_rabbitmq_unavailable
from tests.workers import broker_at, wait_for

# The first publish meets the alarm: the broker's `connection.blocked` arrives within
# milliseconds of it. The bound leaves a loaded machine room, and stays far below the
# broker's own bound on a wait (AMQP_TIMEOUT_SECONDS), which `alarmed` raises to 60 s.
MET = 10.0
# A publish refused while the alarm is known does not touch the broker (nor Redis: no
# queue, no mark, which the test checks); well under MET even on a loaded machine.
REFUSED = 0.5


@pytest.fixture(scope="module")
def node():
    reason = private_rabbitmq_unavailable()
    if reason:
        pytest.skip(reason)
    with contextlib.ExitStack() as stack:
        try:
            node = stack.enter_context(private_rabbitmq())
        except RuntimeError as exc:
            pytest.skip(f"could not start a RabbitMQ node of the test's own: {exc}")
        yield node


@pytest.fixture
def alarmed(node, settings):
    """This process's app on the private node, its memory alarm cleared afterwards."""
    settings.AMQP_BLOCKED_RETRY_SECONDS = 0.5
    options = app.conf.broker_transport_options
    app.conf.broker_transport_options = {**options, "read_timeout": 60, "write_timeout": 60}
    with broker_at(node.url):
        settings.CELERY_BROKER_URL = node.url
        try:
            yield node
        finally:
            node.memory_alarm(False)
            app.conf.broker_transport_options = options


def on_broker(queue: str) -> int | None:
    """Messages in `queue` (None: no such queue), asked on a connection that never
    publishes, which the alarm does not block."""
    with Connection(app.conf.broker_url, connect_timeout=5) as conn:
        try:
            return conn.default_channel.queue_declare(queue=queue, passive=True)[1]
        except NotFound:
            return None


def timed(fn, *args, **kwargs) -> tuple[object, float]:
    started = time.monotonic()
    try:
        outcome = fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001  (the outcome the test looks at)
        outcome = exc
    return outcome, time.monotonic() - started


def test_a_publish_that_meets_the_alarm_fails_at_once_and_the_next_are_refused(alarmed):
    known, fresh = uuid.uuid4(), uuid.uuid4()
    send(tasks.record, project_id=known)
    assert on_broker(project_queue(known)) == 1
    alarmed.memory_alarm(True)

    outcome, took = timed(send, tasks.record, project_id=known)
    assert isinstance(outcome, BrokerBlocked) and took < MET, (outcome, took)
    # Refused without touching Redis or the broker: no mark, no queue.
    outcome, took = timed(send, tasks.record, project_id=fresh)
    assert isinstance(outcome, BrokerBlocked) and took < REFUSED, (outcome, took)
    assert project_queue(fresh) not in active.active_queues()
    assert on_broker(project_queue(fresh)) is None

    report, took = timed(broker_health)
    assert report["healthy"] is False and "alarm" in report["error"], report
    assert took < MET

    # Many at once, once the refusal has lapsed: each meets the alarm, and gives up.
    assert wait_for(lambda: not amqp_blocked(app.conf.broker_url), timeout=5)
    with ThreadPoolExecutor(10) as pool:
        outcomes = list(pool.map(lambda _: timed(send, tasks.record, project_id=fresh), range(10)))
    assert all(isinstance(o, BrokerBlocked) and took < MET for o, took in outcomes), outcomes

    alarmed.memory_alarm(False)
    published = wait_for(
        lambda: not isinstance(timed(send, tasks.record, project_id=fresh)[0], BrokerBlocked),
        timeout=10,
    )
    assert published
    assert wait_for(lambda: (on_broker(project_queue(fresh)) or 0) >= 1)
    assert broker_health()["healthy"] is True


@pytest.mark.django_db(transaction=True)
def test_a_chat_message_under_the_alarm_is_accepted_and_its_run_sent_once_it_clears(
    alarmed, api, user, settings, redis_client
):
    project = ProjectFactory(owner=user)
    agent = AgentFactory(project=project)
    first, second = (ChatSessionFactory(agent=agent, project=project) for _ in range(2))
    base = f"/my/projects/{project.id}/chat"
    posted = api.post(f"{base}/{first.id}/messages/", {"content": "hi"}, format="json")
    assert posted.status_code == 202
    assert on_broker(project_queue(project.id)) == 1
    alarmed.memory_alarm(True)

    posted, took = timed(
        api.post, f"{base}/{second.id}/messages/", {"content": "hello"}, format="json"
    )
    assert posted.status_code == 202 and took < MET, (posted.content, took)
    run = Run.objects.get(message_id=posted.json()["assistant_message_id"])
    # Its publish failed: the run is queued and unmarked, for the recovery pass.
    assert run.status == "queued" and run.attempt == 1

    # A context upload needs its job on the bus before it answers: 503, nothing kept
    # (but the rate limits' count of the attempt).
    def kept():
        return {k for k in redis_client.scan_iter(count=1000) if ":throttle_" not in k}

    keys = kept()
    uploaded, took = timed(
        api.post, f"/my/projects/{project.id}/agents/{agent.id}/context/",
        {"documents": ["x"]}, format="json",
    )  # fmt: skip
    assert uploaded.status_code == 503 and uploaded["Retry-After"], uploaded.content
    assert took < MET and kept() == keys

    alarmed.memory_alarm(False)
    settings.RUN_REDISPATCH_SECONDS = 0
    assert wait_for(lambda: runs_recover()["redispatched"], timeout=15, interval=0.2)
    run.refresh_from_db()
    assert run.status == "queued" and run.attempt == 2
    assert (on_broker(project_queue(project.id)) or 0) >= 2


@pytest.fixture
def short_waits():
    """AMQP_TIMEOUT_SECONDS of 1 s for the connections the app opens from here on."""
    kept = app.conf.broker_transport_options
    app.conf.broker_transport_options = {**kept, "read_timeout": 1, "write_timeout": 1}
    yield
    app.conf.broker_transport_options = kept


def test_a_wait_on_a_connection_the_alarm_blocked_ends(alarmed, short_waits):
    """A connection that published (a control broadcast on the app's pool, say) is not
    read by the broker during the alarm: a depth read on it waits AMQP_TIMEOUT_SECONDS
    (1 s here) at most, then fails, and the next one uses a new connection."""
    queue = project_queue(uuid.uuid4())
    send(tasks.record, project_id=uuid.UUID(queue.rsplit(".", 1)[1]))
    alarmed.memory_alarm(True)
    with app.pool.acquire(block=True) as conn:
        conn.default_channel.basic_publish(amqp.Message(b"x"), exchange="", routing_key="nowhere")

    depths, took = timed(amqp_depths, [queue])
    # Its 1 s, not the 60 s.
    assert isinstance(depths, OperationalError) and took < 10, (depths, took)
    assert amqp_depths([queue]) == {queue: 1}
