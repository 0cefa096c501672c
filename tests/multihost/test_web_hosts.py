"""The service across five hosts (tests.multihost.stack): PostgreSQL, Redis, the LLM
server and beat on `services`; the Procfile's `web` on `web1` and `web2`; its `worker`
and `maintenance` on `worker1` and `worker2`. Every request goes over the bed's network.

- the acceptance path: a project and agent made on web 1, context posted on web 1 and
  found through web 2, messages posted on web 1 stream on web 2, the runs spread over
  both worker hosts, each answered once and each retrieving that context (one embedded
  store, owned by one worker host and served to the other), the project deleted (404
  on both web hosts after);
- a worker host's cable pulled for 10 s while clients post on both web hosts: every
  message answered, none twice, all within 60 s after it is plugged back;
- a worker host killed mid-answer: its runs answered by the other, none twice;
- a web host killed mid-stream: the client resumes on the other with `Last-Event-ID`
  and gets every event once.

Run alone: `pytest -m multihost`. Skipped, saying why, where namespaces, PostgreSQL's
binaries or the bundled Valkey are missing. Settings changed for speed (stack env):
RUN_LEASE_SECONDS=6, RUN_RECOVERY_SECONDS=2 (a dead worker's runs are taken back after
6 s instead of 30 s).
"""

from __future__ import annotations

import collections
import json
import threading
import time

import httpx
import pytest

from tests.multihost.stack import Stack, unavailable, wait

# The stack's start (seven Django processes, PostgreSQL) takes minutes on a loaded
# machine; each wait inside has its own bound.
pytestmark = [pytest.mark.multihost, pytest.mark.slow, pytest.mark.timeout(600)]

LEASE = 6


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("stack")
    env = {"RUN_LEASE_SECONDS": str(LEASE), "RUN_RECOVERY_SECONDS": "2"}
    try:
        with Stack(folder, env=env) as stack:
            yield stack
    except TimeoutError as exc:  # say which process did not come up
        logs = {p.stem: p.read_text(errors="replace")[-2000:] for p in folder.glob("*.log")}
        raise AssertionError(f"{exc}: {json.dumps(logs, indent=1)}") from exc


# --- helpers ---------------------------------------------------------------------------------


def make_project(client: httpx.Client, sessions: int, **agent_fields) -> tuple[str, list[str]]:
    project = client.post("/my/projects/", json={"name": "multihost"})
    assert project.status_code == 201, project.text
    pid = project.json()["id"]
    fields = {"name": "a", "model": "m", **agent_fields}
    agent = client.post(f"/my/projects/{pid}/agents/", json=fields)
    assert agent.status_code == 201, agent.text
    body = {"agent_id": agent.json()["id"]}
    made = [client.post(f"/my/projects/{pid}/chat/", json=body) for _ in range(sessions)]
    assert all(r.status_code == 201 for r in made), [r.text for r in made]
    return pid, [r.json()["id"] for r in made]


def post_message(client: httpx.Client, pid: str, sid: str, text: str = "hi?") -> int:
    response = client.post(f"/my/projects/{pid}/chat/{sid}/messages/", json={"content": text})
    assert response.status_code == 202, response.text
    return response.json()["assistant_message_id"]


class Events:
    """One session's SSE, read in a thread: (id, type, data) in order."""

    def __init__(self, stack: Stack, web: str, pid: str, sid: str, cursor: str | None = "0"):
        self.events: list[tuple[str, str, dict]] = []
        self.error: Exception | None = None
        self.url = f"{stack.url(web)}/my/projects/{pid}/chat/{sid}/events/"
        self.headers = {"Authorization": f"Token {stack.token}"}
        if cursor is not None:
            self.headers["Last-Event-ID"] = cursor
        self.connected = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            with httpx.stream("GET", self.url, headers=self.headers, timeout=15) as response:
                assert response.status_code == 200, response.read()
                self.connected.set()
                event: dict = {}
                for line in response.iter_lines():
                    if self.stop.is_set():
                        return
                    if not line:
                        if "id" in event:
                            self.events.append(
                                (event["id"], event.get("event", ""), json.loads(event["data"]))
                            )
                        event = {}
                    elif not line.startswith(":") and ":" in line:
                        name, _, value = line.partition(":")
                        event[name] = value.strip()
        except Exception as exc:  # the host went away, or the test ended
            self.error = exc
        finally:
            self.connected.set()

    def completed(self) -> collections.Counter:
        return collections.Counter(
            data.get("message_id") for _, kind, data in self.events if kind == "message.completed"
        )

    def close(self) -> None:
        self.stop.set()


def statuses(stack: Stack, ids: list[int]) -> collections.Counter:
    rows = stack.sql("select status from agents_message where id = any(%s)", (ids,))
    return collections.Counter(status for (status,) in rows)


def all_done(stack: Stack, ids: list[int]) -> bool:
    return statuses(stack, ids).get("done", 0) == len(ids)


def wait_answered(stack: Stack, ids: list[int], timeout: float, what: str) -> None:
    """Wait until every answer is done; past the timeout, fail saying where the ones
    left stand (message and run status, the run's worker, starts and lease)."""
    try:
        wait(lambda: all_done(stack, ids), timeout, what, 0.5)
    except TimeoutError as exc:
        rows = stack.sql(
            "select m.id, m.status, r.status, r.worker, r.starts, r.attempt,"
            " r.lease_expires_at, r.dispatched_at, r.error from agents_message m"
            " left join agents_run r on r.message_id = m.id"
            " where m.id = any(%s) and m.status <> 'done' order by m.id",
            (ids,),
        )
        left = "\n".join(f"  {row}" for row in rows[:40])
        logs = [f"{host}-{kind}" for host in stack.workers for kind in ("worker", "maintenance")]
        pytest.fail(
            f"{exc}: {len(rows)} of {len(ids)} not done, by status"
            f" {dict(statuses(stack, ids))}; now {stack.sql('select now()')[0][0]};"
            f" worker hosts beating {sorted(stack.live_workers())}\n"
            f"(message, message status, run status, worker, starts, attempt, lease,"
            f" dispatched, error):\n{left}\n"
            + "".join(f"\n{name}'s log:\n{stack.log(name, 1500)}" for name in logs)
        )


def completions(stack: Stack, pid: str, sids: list[str]) -> collections.Counter:
    """message.completed events per message over the sessions' whole Redis streams
    (read straight from the services host's Redis): a message answered twice shows twice."""
    counts: collections.Counter = collections.Counter()
    client = stack.redis()
    for sid in sids:
        for key in client.scan_iter(match=f"*:stream:{sid}", count=1000):
            for _, fields in client.xrange(key):
                if fields.get("type") == "message.completed":
                    counts[json.loads(fields["data"])["message_id"]] += 1
    return counts


def hosts_of(stack: Stack, ids: list[int]) -> collections.Counter:
    """Which worker host's process wrote the runs of these answers (Run.worker is
    hostname:pid; the namespaces share a hostname, the pids tell the hosts apart)."""
    rows = stack.sql("select worker from agents_run where message_id = any(%s)", (ids,))
    pids = {str(p.pid): host for host, procs in stack.procs.items() for p in procs}
    return collections.Counter(pids.get(worker.rpartition(":")[2], worker) for (worker,) in rows)


# --- tests -------------------------------------------------------------------------------------


def add_context(web1: httpx.Client, web2: httpx.Client, pid: str, text: str) -> str:
    """Context posted on web 1 and stored by a worker host; the id of its point, as a
    search through web 2 finds it."""
    (agent,) = web1.get(f"/my/projects/{pid}/agents/").json()["agents"]
    url = f"/my/projects/{pid}/agents/{agent['id']}/context/"
    job = web1.post(url, json={"documents": [text]})
    assert job.status_code == 202, job.text
    job_url = f"{url}jobs/{job.json()['job_id']}/"
    wait(lambda: web2.get(job_url).json()["status"] == "done", 120, "the context stored")
    hits = web2.get(url, params={"q": text, "k": 5}).json()["results"]
    (found,) = [h for h in hits if h["kind"] == "document" and h["text"] == text]
    return found["id"]


def test_acceptance_across_hosts(stack):
    # About 2 s an answer: one worker host's 8 slots fill before the 16 are posted.
    stack.llm(delay=0.4, tokens=6)
    with stack.client("web1") as web1, stack.client("web2") as web2:
        # top_k 40: the 16 answers' own exchanges, stored as they end, never crowd the
        # document out of what each run retrieves.
        pid, sids = make_project(web1, 16, params={"top_k": 40})
        # One embedded store for both worker hosts: the owner's (context.store_owner).
        point = add_context(web1, web2, pid, "The office cat is called Barsik.")
        streams = [Events(stack, "web2", pid, sid) for sid in sids]
        assert all(s.connected.wait(30) and s.error is None for s in streams)
        answers = [post_message(web1, pid, sid, "What is the office cat called?") for sid in sids]

        def streamed():
            return all(s.completed()[a] for s, a in zip(streams, answers, strict=True))

        wait(streamed, 60, "every answer on web 2's streams")
        for stream in streams:
            stream.close()
        for stream, answer in zip(streams, answers, strict=True):
            assert stream.completed() == {answer: 1}
            done = next(d for _, k, d in stream.events if k == "message.completed")
            assert done["content"].split() == [f"t{i}" for i in range(6)]  # the model's words
        assert all_done(stack, answers)
        served = hosts_of(stack, answers)
        print(f"\nruns per worker host: {dict(served)}")
        assert set(served) == {"worker1", "worker2"}, served
        # Every run, on either worker host, retrieved the context posted on web 1.
        rows = stack.sql("select citations from agents_message where id = any(%s)", (answers,))
        assert all(point in {c["id"] for c in cited} for (cited,) in rows), rows

        assert web2.delete(f"/my/projects/{pid}/").status_code == 204
        for client in (web1, web2):
            assert client.get(f"/my/projects/{pid}/").status_code == 404
            assert client.get(f"/my/projects/{pid}/chat/{sids[0]}/events/").status_code == 404


def test_worker_host_partitioned_10s_under_chat_load(stack):
    stack.llm(delay=0.05, tokens=10)
    with stack.client("web1") as web1, stack.client("web2") as web2:
        pid, sids = make_project(web1, 8)
        accepted: list[int] = []
        refused: collections.Counter = collections.Counter()
        stop = threading.Event()

        def client_loop(client, sid):
            path = f"/my/projects/{pid}/chat/{sid}/messages/"
            while not stop.is_set():
                try:
                    response = client.post(path, json={"content": "hi?"})
                except httpx.HTTPError as exc:
                    refused[type(exc).__name__] += 1
                else:
                    if response.status_code == 202:
                        accepted.append(response.json()["assistant_message_id"])
                    else:
                        refused[response.status_code] += 1
                time.sleep(0.5)

        threads = [
            threading.Thread(target=client_loop, args=(web1 if i % 2 else web2, sid))
            for i, sid in enumerate(sids)
        ]
        for thread in threads:
            thread.start()
        try:
            wait(lambda: len(accepted) >= 8, 30, "load running")
            stack.bed.link("worker1", up=False)
            cut = time.monotonic()
            time.sleep(10)  # the fault itself lasts 10 s
            stack.bed.link("worker1", up=True)
            back = time.monotonic()
            print(f"\nworker1 cut off for {back - cut:.1f} s")
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        wait_answered(stack, accepted, 60, f"{len(accepted)} answers")
        recovered = time.monotonic() - back
        counts = completions(stack, pid, sids)
        print(
            f"{len(accepted)} messages accepted, all answered {recovered:.1f} s after the "
            f"cable was back; per host {dict(hosts_of(stack, accepted))}; not accepted: "
            f"{dict(refused)}"
        )
        assert recovered <= 60
        assert not refused  # the web hosts and services never lost their cables
        assert {a: counts[a] for a in accepted} == {a: 1 for a in accepted}


def test_worker_host_killed_mid_answer(stack):
    stack.llm(delay=0.3, tokens=10)  # about 3 s an answer
    with stack.client("web1") as web1:
        pid, sids = make_project(web1, 12)
        answers = [post_message(web1, pid, sid) for sid in sids]

        def running_on_worker1():
            rows = stack.sql(
                "select worker from agents_run where message_id = any(%s) and status = 'running'",
                (answers,),
            )
            pid1 = {str(p.pid) for p in stack.procs["worker1"]}
            return sum(1 for (w,) in rows if w.rpartition(":")[2] in pid1)

        wait(running_on_worker1, 30, "answers running on worker1")
        stack.kill_host("worker1")
        killed = time.monotonic()
        wait_answered(stack, answers, 60, "every answer")
        recovered = time.monotonic() - killed
        counts = completions(stack, pid, sids)
        print(f"\nworker1 killed mid-answer: all {len(answers)} answered {recovered:.1f} s after")
        assert {a: counts[a] for a in answers} == {a: 1 for a in answers}
    stack.start_worker("worker1")  # back for the tests after this one
    stack.wait_ready()


def test_web_host_killed_mid_stream_resumes_on_the_other(stack):
    stack.llm(delay=0.2, tokens=20)  # about 4 s of deltas
    with stack.client("web2") as web2:
        pid, (sid,) = make_project(web2, 1)
        first = Events(stack, "web1", pid, sid, cursor=None)
        assert first.connected.wait(30) and first.error is None
        answer = post_message(web2, pid, sid)

        def deltas(events: Events) -> int:
            return sum(1 for _, kind, _d in events.events if kind == "message.delta")

        wait(lambda: deltas(first) >= 3, 30, "the answer streaming on web1")
        stack.kill_host("web1")
        wait(lambda: first.error is not None or not first.thread.is_alive(), 30, "web1 gone")
        last = first.events[-1][0]
        assert not first.completed(), "the answer must still be streaming at the kill"
        resumed = Events(stack, "web2", pid, sid, cursor=last)
        wait(lambda: resumed.completed()[answer], 30, "the rest of the answer on web2")
        resumed.close()
        whole = Events(stack, "web2", pid, sid, cursor="0")
        wait(lambda: whole.completed()[answer], 30, "the replay")
        whole.close()
        got = [e[0] for e in first.events] + [e[0] for e in resumed.events]
        expected = [e[0] for e in whole.events]
        print(
            f"\nweb1 killed after {len(first.events)} events; {len(resumed.events)} more "
            "on web2 with Last-Event-ID"
        )
        assert len(got) == len(set(got))  # nothing twice
        assert got == expected  # nothing lost
    stack.start_web("web1")
    stack.wait_ready()
