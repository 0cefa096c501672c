# The live server of the contract tests, for the API tests that need real HTTP (SSE).
from tests.contract.conftest import (  # noqa: F401
    asgi_server,
    contract_qdrant_path,
    offline_runtime,
    token_user,
)
