from tests.contract.conftest import contract_qdrant_path, offline_runtime  # noqa: F401
