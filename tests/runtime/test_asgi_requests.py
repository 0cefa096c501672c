"""Requests that are no event stream nor waiting search are served as WSGI serves them:
their start, middleware chain and close in one step on a fixed set of threads
(common.asgi), under uvicorn."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx

from common.asgi import UPLOAD_FRAMING_BYTES
from projects.models import Project
from tests.runtime.conftest import token_for


def _request_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("request")}


def test_requests_run_on_a_fixed_set_of_threads(asgi, user, settings):
    base = f"http://127.0.0.1:{asgi.port}/my/projects/"
    headers = {"Authorization": f"Token {token_for(user)}"}
    with httpx.Client(headers=headers, timeout=30) as client:
        created = [client.post(base, json={"name": f"p{i}"}) for i in range(3)]
        assert [r.status_code for r in created] == [201] * 3
        listed = [client.get(base) for _ in range(20)]
        # Bad input through the same path: a 400 in the API's shape, nothing written.
        refused = client.post(base, json={"name": ""})
        missing = client.get(base + "00000000-0000-0000-0000-000000000000/")
    assert {r.status_code for r in listed} == {200}
    assert len(listed[-1].json()["projects"]) == 3
    assert refused.status_code == 400 and refused.json()["code"] == "invalid"
    assert missing.status_code == 404
    assert Project.objects.filter(owner=user).count() == 3
    # 25 requests, never more threads than requests admitted at once, all of them reused.
    assert 0 < len(_request_threads()) <= settings.WEB_MAX_CONCURRENT_REQUESTS


def _raw(port: int, head: bytes, body: bytes = b"") -> bytes:
    """Send a request's head and `body` (not all of what the head announces), then read
    the answer until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_a_body_past_its_limit_is_refused_before_it_is_read(asgi, user, agent, settings):
    """Django's ASGI handler reads a whole body (to a temporary file) before anything
    else runs: one request, even unauthenticated, could fill the disk. A body past
    DATA_UPLOAD_MAX_MEMORY_SIZE, or past an upload's own limit, is a 413: at once when
    its Content-Length says so, and as soon as that many bytes came when it is sent in
    chunks. An upload within its limit still goes through."""
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 64 * 1024
    settings.CONTEXT_FILE_MAX_BYTES = 256 * 1024
    host = f"Host: 127.0.0.1:{asgi.port}\r\n"

    # Announced: 10 GB, nothing of it sent.
    head = f"POST /my/projects/ HTTP/1.1\r\n{host}Content-Type: application/json\r\n"
    answer = _raw(asgi.port, (head + "Content-Length: 10737418240\r\n\r\n").encode())
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"code":"payload_too_large"' in answer.replace(b" ", b"")

    # Chunked, no length: refused once past the limit, though the body has not ended.
    chunk = b"x" * 8192
    body = (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 9  # 72 KiB, and no last chunk
    answer = _raw(asgi.port, (head + "Transfer-Encoding: chunked\r\n\r\n").encode(), body)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert f"larger than {64 * 1024} bytes".encode() in answer

    # An upload's own limit: within it a file goes through, past it a 413 unread.
    files = f"/my/projects/{agent.project_id}/agents/{agent.id}/context/files/"
    headers = {"Authorization": f"Token {token_for(user)}"}
    kept = b"The dock keys are in cabinet KC-4410.\n" * 3000  # 111 KiB
    response = httpx.post(f"http://127.0.0.1:{asgi.port}{files}", headers=headers,
                          files={"file": ("keys.txt", kept)}, timeout=30)  # fmt: skip
    assert response.status_code == 202, response.text
    head = f"POST {files} HTTP/1.1\r\n{host}Authorization: Token {token_for(user)}\r\n"
    answer = _raw(asgi.port, (head + "Content-Length: 1073741824\r\n\r\n").encode())
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert f"larger than {256 * 1024 + UPLOAD_FRAMING_BYTES} bytes".encode() in answer


def test_a_body_sent_slowly_holds_no_slot_of_other_requests(asgi, user, settings):
    """As many requests as a process runs at once send their heads and the first byte of
    their bodies, and hold: another request is still answered at once (it waited its
    turn behind them, WEB_ADMISSION_WAIT_SECONDS, then a 503, when a body was read
    inside the turn), and the held ones are served once their bodies come."""
    settings.WEB_MAX_CONCURRENT_REQUESTS = 2
    settings.WEB_ADMISSION_WAIT_SECONDS = 20
    token = token_for(user)
    held = []
    for i in range(settings.WEB_MAX_CONCURRENT_REQUESTS):
        body = json.dumps({"name": f"slow-{i}"}).encode()
        sock = socket.create_connection(("127.0.0.1", asgi.port), timeout=30)
        sock.sendall(
            f"POST /my/projects/ HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Token {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body[:1]
        )
        held.append((sock, body))
    try:
        started = time.monotonic()
        response = httpx.get(
            f"http://127.0.0.1:{asgi.port}/my/projects/",
            headers={"Authorization": f"Token {token}"}, timeout=30,
        )  # fmt: skip
        took = time.monotonic() - started
        assert response.status_code == 200, response.text
        assert took < settings.WEB_ADMISSION_WAIT_SECONDS / 2, took
        for sock, body in held:
            sock.sendall(body[1:])
            assert sock.recv(65536).startswith(b"HTTP/1.1 201")
    finally:
        for sock, _ in held:
            sock.close()
    assert Project.objects.filter(owner=user, name__startswith="slow-").count() == 2


def test_a_body_that_stops_coming_is_a_408_and_let_go(asgi, user, settings):
    """A client that sends part of a body and stops would hold what it sent (in memory,
    up to FILE_UPLOAD_MAX_MEMORY_SIZE, then on disk) for as long as it keeps the
    connection open: after WEB_BODY_IDLE_SECONDS with nothing more, it is a 408. A body
    that keeps coming, however slowly, is read."""
    settings.WEB_BODY_IDLE_SECONDS = 1
    token = token_for(user)
    head = (
        f"POST /my/projects/ HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Token {token}\r\n"
        "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n"
    )
    started = time.monotonic()
    answer = _raw(asgi.port, head.format(1_000_000).encode(), b'{"name": "' + b"x" * 500_000)
    took = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"code":"request_timeout"' in answer.replace(b" ", b"")
    assert took < 10, took

    settings.WEB_BODY_IDLE_SECONDS = 5
    body = json.dumps({"name": "trickled"}).encode()
    with socket.create_connection(("127.0.0.1", asgi.port), timeout=30) as sock:
        sock.sendall(head.format(len(body)).encode())
        for i in range(0, len(body), 4):  # a client that sends slowly, and keeps sending
            sock.sendall(body[i : i + 4])
            time.sleep(0.25)
        assert sock.recv(65536).startswith(b"HTTP/1.1 201")
    assert list(Project.objects.filter(owner=user).values_list("name", flat=True)) == ["trickled"]
