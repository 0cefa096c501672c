"""The API answers as its schema says: schemathesis fuzzes every operation of
/api/schema/ against the app under a live server (with a real worker behind it), with
every check it has (`--checks all`: status codes, content types, response bodies,
headers, valid data accepted, invalid data rejected, auth enforced, deleted objects
gone). Here: the schema's own examples, the coverage phase (each schema's boundaries
and every documented status) and the stateful runs that follow the schema's links from
a created project to its agents, sessions, messages and context jobs; the generated
requests are in test_schemathesis_fuzzing.py, a file of its own so the two halves run
in two test processes. Each run must find 0 failures.

The event stream is left out: a valid request opens a stream that never ends, which a
fuzzer cannot judge; test_client.py and tests/runtime/test_sse.py follow it instead.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.timeout(900)  # its own subprocess timeout bounds it, not the 120 s hang guard
def test_the_api_answers_as_its_schema_says(schemathesis_run):
    code, summary = schemathesis_run("examples,coverage,stateful")
    assert code == 0, summary
    assert "Tested:" in summary
