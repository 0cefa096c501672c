"""The API answers as its schema says, to requests generated from it (schemathesis'
fuzzing phase, `--checks all`): the other phases are in test_schemathesis.py."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


# The fuzzing takes 85 s alone and up to twice that on two shared cores, over the
# suite's 120 s hang guard: its own subprocess timeout (900 s) bounds it instead.
@pytest.mark.timeout(900)
def test_generated_requests_are_answered_as_the_schema_says(schemathesis_run):
    code, summary = schemathesis_run("fuzzing")
    assert code == 0, summary
    assert "Tested:" in summary
