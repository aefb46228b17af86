"""Schemathesis over the app's OpenAPI schema, in-process: no request may be answered 5xx.

Bodies of the binary endpoints are read from the raw request, so the schema describes only
their paths and methods; schemathesis varies the path parameters (model names, key ids) and
the methods, and the hostile bodies are the business of ``tests/server/test_hostile.py`` and
the atheris harnesses beside this file. Bounded to a few examples per operation (about 10 s).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="pip install 'he-inference[dev]'")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from server import create_app  # noqa: E402
from tests.server.apps import settings as app_settings  # noqa: E402
from tests.server.apps import write_models  # noqa: E402

# schemathesis' own pytest plugin (``from_fixture``, ``parametrize``) does not run under
# pytest 9 yet, so each operation's strategy is driven by hypothesis directly.
BOUND = settings(
    max_examples=15, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root: Path = tmp_path_factory.mktemp("schema")
    write_models(root / "models")
    app = create_app(app_settings(root))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_no_operation_answers_a_server_error(api_schema: Any) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 8, [op.label for op in operations]
    for operation in operations:

        @BOUND
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:
            response = case.call()
            case.validate_response(response, checks=[not_a_server_error])
            if response.status_code >= 400:
                body = response.json()
                assert set(body) >= {"error", "detail"}, (case.path, body)
                assert "Traceback" not in response.text

        check()
