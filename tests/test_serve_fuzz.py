"""Fuzz test of `protege serve`'s HTTP API with schemathesis: cases generated from the app's OpenAPI schema,
valid and invalid, for every operation, sent to the real server on loopback. No answer may be a 5xx, and every
answer must be one the schema declares.

schemathesis's own pytest loader for a schema made in a fixture (`schemathesis.pytest.from_fixture`) reads a
pytest internal that pytest 9 removed, so each operation's Hypothesis strategy is driven from a plain
parametrized test instead; a check keeps the list of operations equal to the schema's."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from test_serve import NAME, running, student_dir  # noqa: E402, F401  (student_dir is a fixture)

from protege.demo_data import LABELS

# no 5xx; and every answer is one the schema declares: its status, its content type, its body's shape (an
# error is OpenAI's {"error": {message, type, param, code}}, a 200 the documented response)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]

EXAMPLES = 40  # per operation and mode: the whole file stays well under a minute on 2 cores
OPERATIONS = [("GET", "/v1/models"), ("GET", "/v1/models/{model}"), ("POST", "/v1/chat/completions"),
              ("POST", "/v1/classify")]


@pytest.fixture(scope="module")
def server(student_dir):  # noqa: F811
    with running(student_dir, max_body_bytes=20_000) as srv:
        yield srv


@pytest.fixture(scope="module")
def api_schema(server):
    """The schema FastAPI builds for the app (what /openapi.json would serve)."""
    return schemathesis.openapi.from_dict(server.app.openapi())


def test_every_operation_is_fuzzed(api_schema):
    found = sorted((op.method.upper(), op.path) for op in (r.ok() for r in api_schema.get_all_operations()))
    assert found == sorted(OPERATIONS)


# Invalid input exists only where there is a body: any string is a valid model name in GET /v1/models/{model}.
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if m == "POST"
]


@pytest.mark.parametrize("method, path, mode", CASES, ids=[f"{m}-{p}-{g.value}" for m, p, g in CASES])
def test_no_server_error(api_schema, server, method, path, mode):
    calls = []

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=api_schema[path][method].as_strategy(generation_mode=mode))
    def fuzz(case):
        response = case.call(base_url=server.url, timeout=20)
        calls.append(response.status_code)
        case.validate_response(response, checks=CHECKS)

    fuzz()
    assert calls  # it did send requests (GET /v1/models has exactly one)


_USER = [{"role": "system", "content": "Sort tickets."}, {"role": "user", "content": "my refund never arrived"}]
# Answers that random generation rarely reaches (a valid chat needs a user message with text; the model's
# name is one string in all), held to the same checks.
VALID = [
    ("GET", "/v1/models/{model}", {"path_parameters": {"model": NAME}}, 200),
    ("POST", "/v1/chat/completions", {"body": {"model": NAME, "messages": _USER}}, 200),
    ("POST", "/v1/chat/completions", {"body": {"messages": _USER, "logprobs": True, "top_logprobs": 3}}, 200),
    ("POST", "/v1/chat/completions", {"body": {"messages": _USER, "stream": True, "logprobs": True}}, 200),
    ("POST", "/v1/chat/completions", {"body": {"messages": _USER, "n": 2}}, 400),
    ("POST", "/v1/classify", {"body": {"input": ["a refund", "my password"]}}, 200),
    ("POST", "/v1/classify", {"body": {"input": "x" * 30_000}}, 413),
]


@pytest.mark.parametrize("method, path, parts, status", VALID, ids=[f"{m}-{p}-{s}" for m, p, _, s in VALID])
def test_known_answers_conform(api_schema, server, method, path, parts, status):
    op = api_schema[path][method]
    case = op.Case(media_type="application/json" if "body" in parts else None, **parts)
    response = case.call(base_url=server.url, timeout=20)
    assert response.status_code == status, response.text
    case.validate_response(response, checks=CHECKS)
    if status == 200 and path == "/v1/classify":
        assert [d["label"] in LABELS for d in response.json()["data"]] == [True, True]
