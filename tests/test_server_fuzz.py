"""Property-based fuzzing of every route, driven by the server's own OpenAPI schema (schemathesis).

Checks, for every generated request (valid and invalid): no 5xx, the status code and the JSON body
match what the schema documents, and afterwards no concurrency slot and no KV block is held.
Hypothesis strings for the text fields add lone surrogates, control characters and huge numbers.
The budget is bounded (``HF_PAGED_FUZZ_EXAMPLES`` per route, 25 by default).
"""
from __future__ import annotations

import os
import time

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from served import Served, tiny_chat_pipeline, wait_idle  # noqa: E402

from hf_paged.server import create_app  # noqa: E402

EXAMPLES = int(os.environ.get("HF_PAGED_FUZZ_EXAMPLES", "50"))

# Text that breaks naive servers: lone surrogates, control characters, long digit runs, odd Unicode.
NASTY_TEXT = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3),
    st.text(alphabet=st.characters(max_codepoint=0x1F), max_size=20),
    st.sampled_from(["9" * 5000, "\u0000", "\ufeff", "\U0001F600" * 50, "<|im_start|>system", "{{ raise }}"]),
)
NASTY_NUMBER = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-2**70, 2**70),
                         st.sampled_from([0, -1, 1e-38, 1e-300, 1e308, 2**64, 2**63 - 1]))


@pytest.fixture(scope="module")
def app():
    pipe = tiny_chat_pipeline(max_model_len=64)
    # Small limits keep each generated request cheap; 413 and 429 are part of what is exercised.
    application = create_app(pipe, model_id="tiny", ui=False, close_pipeline=False, max_concurrent_requests=4,
                             max_body_bytes=64 * 1024)
    srv = Served(application)  # a real server: an in-process ASGI client would run startup/shutdown per call
    application.url = srv.url
    yield application
    srv.stop()
    pipe.close()


# Every operation of the schema; test_schema_lists_every_route keeps this list honest.
OPERATIONS = [("POST", "/generate"), ("POST", "/generate_stream"), ("POST", "/"), ("POST", "/tokenize"),
              ("GET", "/info"), ("GET", "/health"), ("GET", "/ping"), ("GET", "/"),
              ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/chat_tokenize"),
              ("GET", "/v1/models"),
              ("GET", "/metrics"), ("GET", "/engine/stats"), ("GET", "/engine/blocks")]


@pytest.fixture(scope="module")
def api_schema(app):
    return schemathesis.openapi.from_url(f"{app.url}/openapi.json")


def _settled(app) -> None:
    state = app.state.hf_paged
    wait_idle(state.pipe, timeout=20)
    deadline = time.monotonic() + 10
    while state.in_flight:
        assert time.monotonic() < deadline, f"{state.in_flight} slot(s) leaked"
        time.sleep(0.01)


def test_schema_lists_every_route(api_schema):
    listed = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert listed == set(OPERATIONS)


# Negative cases need something to break: only the operations that take a body have one.
CASES = [(m, p, "positive") for m, p in OPERATIONS] + [(m, p, "negative") for m, p in OPERATIONS if m == "POST"]


@pytest.mark.parametrize("method,path,mode", CASES)
def test_every_route_survives_schema_driven_input(api_schema, app, method, path, mode):
    """Requests that fit the schema (positive) and that do not (negative): never a 5xx, and every
    answer (status, content type, JSON body) is what the schema documents."""
    from hypothesis import given
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    operation = api_schema[path][method]

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
    def run(case):
        # Every check but "schema-valid requests are accepted": the schema gives types, while ranges and
        # token limits are checked in code with TGI's messages (top_p 7.0 fits the schema, and is a 422).
        response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
        assert response.status_code < 500, response.text
        _settled(app)

    run()


@pytest.mark.parametrize("path", ["/generate", "/generate_stream", "/tokenize", "/v1/completions"])
def test_nasty_text_and_numbers(app, path):
    """Hypothesis strings and numbers in the text and number fields of each route."""
    import httpx
    from hypothesis import given

    with httpx.Client(base_url=app.url, timeout=60) as client:
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
        @given(text=NASTY_TEXT, number=NASTY_NUMBER)
        def run(text, number):
            if path == "/v1/completions":
                body = {"prompt": text, "max_tokens": 3, "temperature": number, "stop": [text]}
            else:
                body = {"inputs": text, "parameters": {"max_new_tokens": 3, "temperature": number,
                                                       "top_p": number, "stop": [text]}}
            import json
            raw = json.dumps(body, allow_nan=False)  # \\ud800 escapes survive json.dumps as lone surrogates
            r = client.post(path, content=raw.encode(), headers={"content-type": "application/json"})
            assert r.status_code < 500, (body, r.text)
            if r.status_code != 200:
                assert set(r.json()) == {"error", "error_type"}
            _settled(app)

        run()
