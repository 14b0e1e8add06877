"""The OpenAPI document of /v1/ (``inference.openapi``): complete, valid, in step with the serializers, served."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator

import httpx
import jsonschema_rs
import pytest
import schemathesis
from django.urls import URLPattern, URLResolver, get_resolver
from rest_framework import serializers
from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR

from config.asgi import application
from inference import errors, openai_api
from inference.openapi import ERROR_STATUSES, SCHEMA_PATH, openapi_schema

API_PREFIX = "v1/"
COMPLETION_PATHS = ("/v1/chat/completions", "/v1/completions")
REQUESTS = {
    "ChatCompletionRequest": openai_api.ChatCompletionInputSerializer,
    "CompletionRequest": openai_api.CompletionInputSerializer,
}


def v1_routes() -> Iterator[str]:
    """Every URL pattern under /v1/ in the URL configuration, as an OpenAPI path (``<path:x>`` -> ``{x}``)."""

    def walk(patterns, prefix: str) -> Iterator[str]:
        for pattern in patterns:
            route = prefix + str(pattern.pattern)
            if isinstance(pattern, URLResolver):
                yield from walk(pattern.url_patterns, route)
            elif isinstance(pattern, URLPattern) and route.startswith(API_PREFIX):
                if pattern.name == "not-found":  # the catch-all: OpenAI's 404 for any path no endpoint serves
                    continue
                yield "/" + re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", route)

    return walk(get_resolver().url_patterns, "")


def test_every_v1_route_is_described_and_nothing_else():
    routes = set(v1_routes())
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/{model_id}", SCHEMA_PATH} <= routes
    assert routes == set(openapi_schema()["paths"])


def test_schema_validates_as_openapi_3_1_and_its_schemas_as_json_schema_2020_12():
    document = openapi_schema()
    assert document["openapi"].startswith("3.1")
    OPENAPI_31_VALIDATOR.validate(document)
    schemathesis.openapi.from_dict(copy.deepcopy(document)).validate()
    for name, schema in document["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(schema), name


def test_every_operation_documents_bearer_auth_and_its_error_statuses():
    document = openapi_schema()
    assert document["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "A Tandem API key",
    }
    assert document["security"] == [{"bearerAuth": []}]
    # every status the platform's errors map to reaches the completion endpoints (the gateway raises them all)
    statuses = {error.status for error in all_subclasses(errors.GatewayError)} | {openai_api.MethodNotAllowed.status}
    for path in COMPLETION_PATHS:
        documented = {int(code) for code in document["paths"][path]["post"]["responses"]}
        assert statuses | {200} <= documented, (path, statuses - documented)
    for path in ("/v1/models", "/v1/models/{model_id}"):
        assert {"200", "401", "403", "405"} <= set(document["paths"][path]["get"]["responses"])
    assert "404" in document["paths"]["/v1/models/{model_id}"]["get"]["responses"]
    assert document["paths"][SCHEMA_PATH]["get"]["security"] == []


def all_subclasses(cls: type[errors.GatewayError]) -> set[type[errors.GatewayError]]:
    found: set[type[errors.GatewayError]] = set()
    for sub in cls.__subclasses__():
        found |= {sub} | all_subclasses(sub)
    return found


def test_error_responses_carry_the_error_object_and_their_headers():
    document = openapi_schema()
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            for code, response in operation["responses"].items():
                headers = set(response["headers"])
                assert "x-request-id" in headers, (path, code)
                if code != "200":
                    assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
                if code in ("429", "503"):
                    assert "Retry-After" in headers, (path, code)
                if code == "401":
                    assert "WWW-Authenticate" in headers and "x-ratelimit-limit-requests" not in headers
                if code == "200" and path != SCHEMA_PATH:
                    assert "x-ratelimit-remaining-tokens" in headers, path
    assert set(ERROR_STATUSES) >= {400, 401, 402, 403, 404, 405, 409, 429, 502, 503}


def test_completions_document_json_and_event_stream_answers():
    document = openapi_schema()
    for path in COMPLETION_PATHS:
        content = document["paths"][path]["post"]["responses"]["200"]["content"]
        assert set(content) == {"application/json", "text/event-stream"}


@pytest.mark.parametrize("component", sorted(REQUESTS))
def test_request_schema_names_every_serializer_field_with_its_bounds(component):
    schema = openapi_schema()["components"]["schemas"][component]
    fields = REQUESTS[component]().fields
    properties = schema["properties"]
    assert set(properties) == set(fields) | set(openai_api.UNSUPPORTED_FIELDS), "no field missing, none invented"
    assert set(schema["required"]) == {name for name, field in fields.items() if field.required}
    for name, field in fields.items():
        branch = non_null(properties[name])
        for attribute, keyword in (("min_value", "minimum"), ("max_value", "maximum"), ("max_length", "maxLength")):
            bound = getattr(field, attribute, None)
            if bound is not None:
                assert branch.get(keyword) == bound, (name, keyword)
        if not field.required:
            assert {"type": "null"} in properties[name].get("anyOf", []) or None in properties[name].get("enum", ()), (
                f"{name}: null stands for its default"
            )
        if isinstance(field, serializers.CharField) and not field.allow_blank:
            assert branch.get("minLength", 0) >= 1 or "enum" in branch, name


def test_unsupported_fields_accept_only_their_defaults():
    properties = openapi_schema()["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    for name, defaults in openai_api.UNSUPPORTED_FIELDS.items():
        assert all(value in properties[name]["enum"] for value in defaults), name


def non_null(schema: dict) -> dict:
    """A nullable field's non-null branch (``anyOf: [X, null]`` -> X)."""
    branches = [b for b in schema.get("anyOf", [schema]) if b != {"type": "null"}]
    return branches[0] if len(branches) == 1 else schema


@pytest.mark.asyncio
async def test_openapi_json_is_served_without_a_key_and_only_to_get():
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        got = await http.get(SCHEMA_PATH)
        posted = await http.post(SCHEMA_PATH, json={})
    assert got.status_code == 200
    assert got.headers["content-type"] == "application/json"
    assert got.json() == openapi_schema()
    assert got.headers["x-request-id"]
    assert posted.status_code == 405
    assert posted.headers["allow"] == "GET"
    assert posted.json()["error"]["code"] == "method_not_allowed"
