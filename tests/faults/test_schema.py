"""schemathesis against the pipeline's ``/openapi.json``: generated requests, valid and not.

Every operation the schema documents is called with requests that hypothesis builds from
it (within the schema and, in negative mode, outside it). Each answer must be no 5xx, have
a status code the schema lists for that operation, and a body that matches the schema of
that status code. The server is a real pipeline on a small context (``max_model_len``
64), so a valid request is answered in well under a second even with a large ``n``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.openapi import from_url

from modkit import Pipeline

KEY = "schema-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = 60  # per operation: a few hundred requests in all, about a minute on two cores


@pytest.fixture(scope="module")
def pipeline() -> Iterator[Pipeline]:
    with Pipeline.launch(ports="auto", num_kv_blocks=64, max_model_len=64, api_key=KEY, progress=False) as p:
        yield p


@pytest.fixture(scope="module")
def api_schema(pipeline: Pipeline) -> schemathesis.BaseSchema:
    return from_url(f"{pipeline.url}/openapi.json", headers=AUTH)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_5xx_and_every_answer_as_the_schema_documents(case: schemathesis.Case, pipeline: Pipeline) -> None:
    case.call_and_validate(
        base_url=pipeline.url,
        headers=AUTH,
        timeout=60,
        checks=[not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance],
    )
