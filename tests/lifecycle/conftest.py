# The runtime tests' fixtures (embedded Qdrant in a temporary folder, the local
# OpenAI-protocol server, a Redis of the test's own), for the lifecycle tests that run
# agents or kill workers for real.
from tests.runtime.conftest import (  # noqa: F401
    fake_openai,
    own_redis,
    qdrant_path,
    runtime_settings,
)
