# The runtime tests' fixtures (embedded Qdrant in a temporary folder, the local
# OpenAI-protocol server), for the lifecycle tests that run agents for real.
from tests.runtime.conftest import fake_openai, qdrant_path, runtime_settings  # noqa: F401
