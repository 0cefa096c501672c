"""Files into an agent's context, end to end on a real worker: every supported type is
parsed and chunked by its structure, hits cite their document, page and section, the
same bytes twice add nothing, a bad or encrypted file is a job error with nothing
stored, URLs go through the egress guard, documents are listed, read back and deleted
with exactly their points, and bad input is a 4xx that writes nothing."""

from __future__ import annotations

import io

import docx
import pytest
from fpdf import FPDF
from pypdf import PdfReader, PdfWriter

from agents.models import Tool
from context.models import ContextDocument
from context.recovery import documents_lost_fail
from tests.factories import AgentFactory, ChatSessionFactory
from tests.local_http import RunbookServer
from tests.runtime.conftest import context_count
from tests.runtime.test_context import context_url, search
from tests.runtime.test_tools import ask, model_agent, of
from tests.workers import shared_pool_worker, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def files_url(agent):
    return context_url(agent) + "files/"


def make_pdf(pages: list[str]) -> bytes:
    pdf = FPDF()
    pdf.set_font("Helvetica", size=11)
    for text in pages:
        pdf.add_page()
        pdf.multi_cell(0, 6, text)
    return bytes(pdf.output())


def make_docx() -> bytes:
    document = docx.Document()
    document.add_heading("Returns", level=1)
    document.add_paragraph("Customers may return goods within thirty days.")
    document.add_heading("Warehouse codes", level=2)
    document.add_paragraph("Parcels go to bay WH-88213 on the north dock.")
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def upload(api, agent, name, data, content_type="application/octet-stream"):
    file = io.BytesIO(data)
    file.name = name
    return api.post(files_url(agent), {"file": file}, format="multipart")


def finished(api, agent, response):
    assert response.status_code == 202, response.content
    job_url = f"{context_url(agent)}jobs/{response.json()['job_id']}/"

    def ended():
        job = api.get(job_url).json()
        return job if job["status"] in ("done", "error") else None

    return wait_until(ended, timeout=60, what="file job")


def test_every_type_is_ingested_cited_deduplicated_and_deleted(live_worker, api, agent):
    pdf = make_pdf([
        "Chapter one. The interpreter reads the program.",
        "Chapter two. Set the limit with sys.setrecursionlimit and error QX-40217.",
        "Chapter three. Nothing else of note.",
    ])  # fmt: skip
    files = {
        "manual.pdf": pdf,
        "policy.docx": make_docx(),
        "page.html": b"<h1>Shipping</h1><p>Orders ship on weekdays via carrier ZT-5521.</p>",
        "notes.md": b"# Team\n\n## On call\n\nPage the on-call engineer at extension 7731.\n",
        "prices.csv": b"sku,price\nAB-1001,9.99\nAB-1002,19.99\n",
        "readme.txt": b"Plain text: the backup runs nightly at 02:15.\n\nSecond paragraph.",
    }
    for name, data in files.items():
        job = finished(api, agent, upload(api, agent, name, data))
        assert job["status"] == "done", (name, job)
    listed = api.get(files_url(agent)).json()["documents"]
    assert [d["source"] for d in listed] == list(files)
    assert {d["status"] for d in listed} == {"ready"}
    by_name = {d["source"]: d for d in listed}
    assert by_name["manual.pdf"]["pages"] == 3 and by_name["manual.pdf"]["file_type"] == "pdf"
    assert [by_name[n]["file_type"] for n in files] == ["pdf", "docx", "html", "markdown",
                                                         "csv", "text"]  # fmt: skip

    hits = api.get(context_url(agent), {"q": "QX-40217", "k": 3, "mode": "sparse"}).json()
    top = hits["results"][0]
    assert top["document_id"] == by_name["manual.pdf"]["id"] and top["page"] == 2
    assert top["source"] == "manual.pdf" and "QX-40217" in top["text"]
    top = search(api, agent, "WH-88213 bay")[0]
    assert top["source"] == "policy.docx" and top["section"] == "Returns / Warehouse codes"
    top = api.get(context_url(agent), {"q": "extension 7731", "mode": "hybrid"}).json()
    assert top["results"][0]["section"] == "Team / On call"

    # Read back: the text as parsed.
    text = api.get(files_url(agent) + f"{by_name['manual.pdf']['id']}/").json()["text"]
    assert "sys.setrecursionlimit" in text and "Chapter three" in text

    # The same bytes again: the same document, nothing added, no job.
    points = context_count(agent)
    again = upload(api, agent, "copy-of-manual.pdf", pdf)
    assert again.status_code == 200 and again.json()["created"] is False
    assert again.json()["id"] == by_name["manual.pdf"]["id"]
    assert context_count(agent) == points and ContextDocument.objects.count() == len(files)

    # Deleting a document takes exactly its points.
    pdf_chunks = by_name["manual.pdf"]["chunks"]
    response = api.delete(files_url(agent) + f"{by_name['manual.pdf']['id']}/")
    assert response.status_code == 204
    wait_until(lambda: context_count(agent) == points - pdf_chunks, what="points deleted")
    assert api.get(files_url(agent) + f"{by_name['manual.pdf']['id']}/").status_code == 404
    assert search(api, agent, "WH-88213 bay")[0]["source"] == "policy.docx"


def test_bad_and_encrypted_files_end_in_error_with_nothing_stored(live_worker, api, agent):
    writer = PdfWriter()
    writer.append(PdfReader(io.BytesIO(make_pdf(["secret page"]))))
    writer.encrypt("pw")
    encrypted = io.BytesIO()
    writer.write(encrypted)
    cases = {
        "locked.pdf": (encrypted.getvalue(), "encrypted"),
        "broken.pdf": (b"%PDF-1.7\nthis is not a pdf at all", "cannot be read"),
        "broken.docx": (b"PK\x03\x04 not a zip", "cannot be read"),
        # pypdf raises more than its own errors on malformed files (here
        # NotImplementedError): still a refusal, not a step that fails and stays running.
        "unknown-filter.pdf": (
            make_pdf(["filtered page"]).replace(b"/FlateDecode", b"/FlateDecodX"),
            "cannot be read",
        ),
        "latin1.txt": ("caf\u00e9".encode("latin-1"), "not UTF-8"),
        "blank.md": (b"   \n\n  ", "no text"),
    }
    for name, (data, reason) in cases.items():
        job = finished(api, agent, upload(api, agent, name, data))
        assert job["status"] == "error" and reason in job["error"], (name, job)
    documents = api.get(files_url(agent)).json()["documents"]
    assert {d["status"] for d in documents} == {"error"}
    assert all(d["chunks"] == 0 for d in documents)
    assert context_count(agent) == 0


def test_the_same_bytes_of_a_failed_document_are_ingested_again(
    live_worker, api, agent, file_server, runtime_settings
):
    """A file refused under a limit the operator has since raised: the same bytes given
    again queue the same document again (202), instead of answering it as already
    there (200) with its error for good; fetched from a URL, they replace it. Once they
    are ingested, they add nothing."""
    data = b"The spare keys for bay 12 hang in cabinet KC-4410, left of the door."
    runtime_settings.CONTEXT_FILE_MAX_CHARS = 20
    refused = upload(api, agent, "keys.txt", data)
    job = finished(api, agent, refused)
    assert job["status"] == "error" and "over 20 characters" in job["error"], job

    runtime_settings.CONTEXT_FILE_MAX_CHARS = 100_000
    again = upload(api, agent, "keys-v2.txt", data)
    assert again.json()["created"] is True
    assert again.json()["id"] == refused.json()["id"]
    assert again.json()["job_id"] != refused.json()["job_id"]
    assert again.json()["status"] == "queued" and again.json()["error"] == ""
    assert finished(api, agent, again)["status"] == "done"
    document = ContextDocument.objects.get()
    assert (document.status, document.source, document.error) == ("ready", "keys-v2.txt", "")
    assert search(api, agent, "KC-4410 cabinet")[0]["document_id"] == str(document.id)
    third = upload(api, agent, "keys.txt", data)
    assert third.status_code == 200 and third.json()["created"] is False

    # By URL: the bytes of a refused upload are fetched; the refused document goes.
    runtime_settings.CONTEXT_FILE_MAX_CHARS = 20
    refused = upload(api, agent, "runbook.md", RunbookServer.BODY)
    assert finished(api, agent, refused)["status"] == "error"
    runtime_settings.CONTEXT_FILE_MAX_CHARS = 100_000
    runtime_settings.EGRESS_ALLOW_NETWORKS = {"files": ["127.0.0.0/8"]}
    job = finished(api, agent, api.post(files_url(agent), {"url": file_server}, format="json"))
    assert job["status"] == "done" and "duplicate_of" not in job, job
    assert not ContextDocument.objects.filter(id=refused.json()["id"]).exists()
    assert ContextDocument.objects.get(id=job["document_id"]).status == "ready"


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("own_redis", ["empty"], indirect=True)
def test_a_document_whose_job_redis_lost_is_queued_again_by_its_bytes(
    own_redis, api, agent, runtime_settings
):
    """Redis restarted empty (no persistence) while a file waited on the bus: the job
    and its message are gone, and the document would read `queued` for good. The
    recovery pass ends it in error, saying so; its bytes given again queue it again,
    and a worker ingests it."""
    runtime_settings.RUN_REDISPATCH_SECONDS = 0
    data = b"Night shift hands over at 22:30 in room NS-7781."
    waiting = upload(api, agent, "handover.txt", data)
    assert waiting.status_code == 202, waiting.content
    other = upload(api, agent, "other.txt", b"Room NS-7782 is the quiet room.")
    own_redis.kill()  # a crash, and no persistence: it starts again empty
    own_redis.start()
    assert documents_lost_fail() == 2
    lost = api.get(files_url(agent) + f"{waiting.json()['id']}/").json()
    assert lost["status"] == "error" and "give the file again" in lost["error"], lost
    assert documents_lost_fail() == 0
    again = upload(api, agent, "handover.txt", data)
    assert again.status_code == 202, again.content
    assert again.json()["id"] == waiting.json()["id"]
    assert documents_lost_fail() == 0  # its new job is there
    with shared_pool_worker():
        job = finished(api, agent, again)
    assert job["status"] == "done", job
    assert ContextDocument.objects.get(id=waiting.json()["id"]).status == "ready"
    assert ContextDocument.objects.get(id=other.json()["id"]).status == "error"


def docx_of(paragraphs: int, chars: int) -> bytes:
    """A DOCX of `paragraphs` paragraphs of `chars` characters: repeated text packs to
    a few KB whatever it unpacks to."""
    document = docx.Document()
    for i in range(paragraphs):
        document.add_paragraph(f"{i:06d} " + "a" * chars)
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def test_a_docx_past_its_unpacked_size_or_text_is_refused_before_it_is_read_whole(
    live_worker, api, agent, settings
):
    """A few KB that unpack to far more (a zip bomb) is refused from the zip's directory,
    before python-docx reads it; one within that but over the text limit is refused as
    its paragraphs are read, not once all are. Nothing is stored."""
    settings.CONTEXT_FILE_MAX_UNPACKED_BYTES = 1_500_000  # the template is 0.8 MB
    settings.CONTEXT_FILE_MAX_CHARS = 50_000
    packed = docx_of(2_000, 1_000)  # about 2.9 MB unpacked
    assert len(packed) < 100_000
    job = finished(api, agent, upload(api, agent, "bomb.docx", packed))
    assert job["status"] == "error", job
    assert "unpacks to" in job["error"] and "limits are 1500000 bytes" in job["error"], job

    job = finished(api, agent, upload(api, agent, "long.docx", docx_of(400, 1_000)))
    assert job["status"] == "error" and "over 50000 characters" in job["error"], job
    assert context_count(agent) == 0
    assert {d["status"] for d in api.get(files_url(agent)).json()["documents"]} == {"error"}


def test_nul_characters_in_a_file_are_taken_out_not_a_stuck_job(live_worker, api, agent):
    """PostgreSQL's text refuses NUL: a file holding one (a text file with stray bytes, a
    PDF whose font maps to it) failed the document's write on every try, and the job
    read `running` until its record expired."""
    job = finished(api, agent, upload(api, agent, "nul.txt", b"Bay 4 holds WH-1\x00\x007 kits"))
    assert job["status"] == "done", job
    document = ContextDocument.objects.get(id=job["document_id"])
    assert document.text == "Bay 4 holds WH-17 kits"
    assert search(api, agent, "WH-17 kits")[0]["text"] == "Bay 4 holds WH-17 kits"


@pytest.fixture
def file_server():
    server = RunbookServer().start()
    yield server.url
    server.stop()


def test_a_url_goes_through_the_egress_guard(
    live_worker, api, agent, file_server, runtime_settings
):
    response = api.post(files_url(agent), {"url": file_server}, format="json")
    job = finished(api, agent, response)
    assert job["status"] == "error" and "non-public address" in job["error"]
    assert context_count(agent) == 0

    runtime_settings.EGRESS_ALLOW_NETWORKS = {"files": ["127.0.0.0/8"]}
    response = api.post(files_url(agent), {"url": file_server, "name": "runbook"}, format="json")
    job = finished(api, agent, response)
    assert job["status"] == "done", job
    top = api.get(context_url(agent), {"q": "qctl-restart-9", "mode": "sparse"}).json()
    assert top["results"][0]["source"] == "runbook" and top["results"][0]["section"] == "Runbook"
    # The same bytes by URL again: the job says which document has them, nothing added.
    points = context_count(agent)
    job = finished(api, agent, api.post(files_url(agent), {"url": file_server}, format="json"))
    assert job["status"] == "done" and job["duplicate_of"]
    assert context_count(agent) == points
    assert ContextDocument.objects.filter(agent=agent, status="ready").count() == 1


@pytest.mark.django_db
def test_bad_input_is_4xx_and_writes_nothing(api, other_api, agent, redis_client, runtime_settings):
    runtime_settings.CONTEXT_FILE_MAX_BYTES = 100
    bad = [
        ({}, "multipart", 400),
        ({"url": "ftp://example.com/a.txt"}, "json", 400),
        ({"url": "not a url"}, "json", 400),
        ({"url": "https://example.com/a", "extra": 1}, "json", 400),
    ]
    for body, fmt, code in bad:
        assert api.post(files_url(agent), body, format=fmt).status_code == code, body
    assert upload(api, agent, "tool.exe", b"MZ\x90\x00").status_code == 400
    assert upload(api, agent, "empty.txt", b"").status_code == 400
    assert upload(api, agent, "big.txt", b"x" * 101).status_code == 413
    both = io.BytesIO(b"hello")
    both.name = "a.txt"
    response = api.post(files_url(agent), {"file": both, "url": "https://example.com/a"},
                        format="multipart")  # fmt: skip
    assert response.status_code == 400
    # Another owner's agent: 404 on every route.
    ok = io.BytesIO(b"hello")
    ok.name = "a.txt"
    assert other_api.post(files_url(agent), {"file": ok}, format="multipart").status_code == 404
    assert other_api.get(files_url(agent)).status_code == 404
    document = ContextDocument.objects.create(agent=agent, source="x.txt")
    for method in ("get", "delete"):
        assert getattr(other_api, method)(files_url(agent) + f"{document.id}/").status_code == 404
    sibling = AgentFactory(project=agent.project)
    assert api.get(files_url(sibling) + f"{document.id}/").status_code == 404
    assert list(ContextDocument.objects.values_list("source", flat=True)) == ["x.txt"]
    assert not list(redis_client.scan_iter("*context_job*"))


def test_answers_cite_the_chunks_they_drew_on(live_worker, api, project, redis_client, fake_openai):
    agent = model_agent(project, top_k=2, search_mode="sparse")
    pdf = make_pdf(["Intro page.", "The refund code is RF-99341 for damaged goods."])
    assert finished(api, agent, upload(api, agent, "refunds.pdf", pdf))["status"] == "done"
    document = ContextDocument.objects.get(agent=agent)
    session = ChatSessionFactory(agent=agent, project=project)

    kind, data, events, answer = ask(api, redis_client, session, "What is RF-99341?")
    assert kind == "message.completed", data
    first = data["citations"][0]
    assert first["index"] == 1 and first["document_id"] == str(document.id)
    assert first["page"] == 2 and first["source"] == "refunds.pdf"
    # The model was shown where each passage comes from.
    system = fake_openai.requests[0]["body"]["messages"][0]["content"]
    assert "[1] (source refunds.pdf, page 2) The refund code is RF-99341" in system
    listed = api.get(f"/my/projects/{project.id}/chat/{session.id}/messages/").json()
    stored = [m for m in listed["messages"] if m["id"] == answer.id][0]
    assert stored["citations"] == data["citations"]

    # An agent that searches by tool: the answer cites what its search found.
    Tool.objects.create(agent=agent, kind="builtin", name="search_context")
    fake_openai.turns = [{"tool_calls": [("search_context", {"query": "RF-99341"})]}]
    kind, data, events, answer = ask(api, redis_client, session, "And again?")
    assert kind == "message.completed", data
    (result,) = of(events, "tool.result")[-1:]
    # The remembered exchange that asked about it may score the same: order of ties is
    # the store's; what counts is that the document's chunk is cited with its page.
    (cited,) = [c for c in result["citations"] if c.get("document_id") == str(document.id)]
    assert cited["page"] == 2 and cited["source"] == "refunds.pdf", result
    assert [c["index"] for c in data["citations"]] == [None] * len(data["citations"])
    assert str(document.id) in [c.get("document_id") for c in data["citations"]]
