"""The OpenAPI 3.1 description of the OpenAI-compatible API (``/v1/``), served at ``GET /v1/openapi.json``.

Written by hand, next to what it describes: every range and allowed value comes from the
constant the server itself checks (``openai_api``'s serializers and limits, ``prompts``,
``admission``), so moving a limit moves the schema. ``tests/inference/test_openapi.py``
holds the two in step (every ``/v1/`` route is described; the request schemas name every
serializer field with its bounds), and ``tests/inference/test_fuzz_api.py`` fuzzes the app
against it (``python -m inference.fuzz_api`` does the same to a live server).

The schema describes what the server refuses as well as what it accepts: a body that
breaks it is answered 400 (a few runtime refusals are 400s too; the descriptions say
which). Integers must be written as JSON integers (``1``, not ``1.0``: the server does not
coerce, though JSON Schema calls ``1.0`` an integer), and text fields are trimmed of
surrounding whitespace before their length is checked.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse

from inference import openai_api
from inference.admission import MAX_TAGS
from inference.prompts import ROLES
from speculative.types import MAX_TOP_LOGPROBS
from tenants.tiers import Tier

OPENAPI_VERSION = "3.1.0"
DESCRIPTION = (
    "Tandem's OpenAI-compatible API. Authenticate with `Authorization: Bearer <API key>`. Errors come in OpenAI's "
    'shape (`{"error": {"message", "type", "param", "code"}}`); 429 and 503 carry Retry-After; '
    "every response carries x-request-id, and every authenticated one the x-ratelimit-* headers. Values are "
    'not coerced: integers are JSON integers (`1`, not `1.0` or `"1"`), booleans are `true`/`false`; `null` '
    "stands for an optional field's default. Text fields are trimmed of surrounding whitespace before their "
    "length is checked. Unknown fields are ignored, as OpenAI does; OpenAI's fields Tandem does not implement "
    "are accepted only at their default values."
)
SCHEMA_PATH = "/v1/openapi.json"
# the serializers' own bounds (DRF keeps the declared field instances on the class)
_CHAT_FIELDS = openai_api.ChatCompletionInputSerializer._declared_fields
_COMPLETION_FIELDS = openai_api.CompletionInputSerializer._declared_fields
MODEL_MAX_CHARS = _CHAT_FIELDS["model"].max_length
TIER_MAX_CHARS = _CHAT_FIELDS["tier"].max_length
USER_MAX_CHARS = _CHAT_FIELDS["user"].max_length
COMPLETION_LOGPROBS_MAX = _COMPLETION_FIELDS["logprobs"].max_value  # the legacy endpoint's: alternatives per token
TAG_KEY_MAX_CHARS = 64  # admission.validate: tags' keys
TAG_VALUE_MAX_CHARS = 256  # admission.validate: tags' values
NO_NUL = r"^[^\x00]*$"  # DRF's CharField refuses NUL characters
NOT_BLANK = r"^[^\x00]*[^\x00\s][^\x00]*$"  # ... and, unless blank is allowed, text that is only whitespace

REF = "#/components/schemas/"
CLOUD_LOGPROBS = "The cloud tier returns no logprobs: asked of a request routed there, a 400 (param `logprobs`)."


def _ref(name: str) -> dict:
    return {"$ref": REF + name}


def _nullable(schema: dict, **extra: Any) -> dict:
    """``schema`` or ``null``: every optional field takes ``null`` for its default (``_Strict``)."""
    return {"anyOf": [schema, {"type": "null"}], **extra}


# request bodies ------------------------------------------------------------------------------------
def _unsupported_fields() -> dict[str, dict]:
    """OpenAI's fields Tandem does not implement: only their defaults are accepted (``UNSUPPORTED_FIELDS``)."""
    return {
        name: {
            "enum": _distinct(defaults),
            "description": f"Not implemented by Tandem: only its default is accepted; anything else is a 400 "
            f"`unsupported_parameter` naming `{name}`.",
        }
        for name, defaults in openai_api.UNSUPPORTED_FIELDS.items()
    }


def _distinct(values: tuple[Any, ...]) -> list[Any]:
    """``values`` as a JSON Schema enum: 0 and 0.0 are one JSON number (the server takes either)."""
    out: list[Any] = []
    for value in values:
        if not any(value == seen and type(value) in (int, float) and type(seen) in (int, float) for seen in out):
            out.append(copy.deepcopy(value))
    return out


def _generation_properties() -> dict[str, dict]:
    """What both completion endpoints accept (``_GenerationInputSerializer``)."""
    seed_min, seed_max = openai_api.SEED_RANGE
    text_no_nul = {"type": "string", "pattern": NO_NUL}
    return {
        "model": {
            "type": "string",
            "minLength": 1,
            "maxLength": MODEL_MAX_CHARS,
            "pattern": NOT_BLANK,
            "description": "A model id from GET /v1/models; an unknown one is a 404 `model_not_found`.",
        },
        "max_tokens": _nullable(
            {"type": "integer", "minimum": 1},
            description=f"At most this many tokens; default: {openai_api.DEFAULT_MAX_TOKENS} or what is left of the "
            "model's context (GET /v1/models/{model_id}: `tandem.context_length`). More than the context has "
            "room for is a 400 `context_length_exceeded`; more than the tenant's tokens a minute, a 400 "
            "`tokens_exceed_limit`.",
        ),
        "temperature": _nullable(
            {"type": "number", "minimum": 0, "maximum": 2}, default=openai_api.DEFAULT_TEMPERATURE
        ),
        "top_p": _nullable({"type": "number", "minimum": 0, "maximum": 1}, default=1.0),
        "top_k": _nullable(
            {"type": "integer", "minimum": 0}, default=0, description="Tandem's extension: top-k sampling (0: off)."
        ),
        "tier": _nullable(
            {"type": "string", "enum": [t.value for t in Tier], "maxLength": TIER_MAX_CHARS},
            description="Tandem's extension: ask for a tier. The tenant's routing policy may refuse it (400, "
            "param `tier`).",
        ),
        "seed": _nullable({"type": "integer", "minimum": seed_min, "maximum": seed_max}),
        "stop": _nullable(
            {
                "anyOf": [
                    {"type": "string", "minLength": 1},
                    {
                        "type": "array",
                        "maxItems": openai_api.MAX_STOP,
                        "items": {"type": "string", "minLength": 1},
                    },
                ]
            }
        ),
        "n": {"enum": [1, None], "description": "Only one choice per request."},
        "stream": _nullable({"type": "boolean"}, default=False),
        "stream_options": _nullable(
            {"type": "object", "properties": {"include_usage": _nullable({"type": "boolean"}, default=False)}}
        ),
        "user": _nullable({**text_no_nul, "maxLength": USER_MAX_CHARS}, default=""),
        "metadata": _nullable(
            {
                "type": "object",
                "maxProperties": MAX_TAGS,
                "propertyNames": {"maxLength": TAG_KEY_MAX_CHARS},
                "additionalProperties": {**text_no_nul, "maxLength": TAG_VALUE_MAX_CHARS},
            },
            description=f"Tags on the ledger row: at most {MAX_TAGS} pairs, `user` counting as one.",
        ),
        **_unsupported_fields(),
    }


def _chat_request() -> dict:
    text_part = {
        "type": "object",
        "required": ["type", "text"],
        "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
    }
    message = {
        "type": "object",
        "required": ["role", "content"],
        "properties": {
            "role": {"enum": list(ROLES)},
            "content": {"anyOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": text_part}]},
        },
        "description": "Only text: other keys (`name`, `tool_call_id`) are ignored, other content parts refused.",
    }
    properties = {
        **_generation_properties(),
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": message,
            "description": "A chat the model's chat template refuses (roles that do not alternate, say) is a 400.",
        },
        "max_completion_tokens": _nullable(
            {"type": "integer", "minimum": 1}, description="Takes precedence over `max_tokens`."
        ),
        "logprobs": _nullable({"type": "boolean"}, default=False, description=CLOUD_LOGPROBS),
        "top_logprobs": _nullable(
            {"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS},
            description="Needs `logprobs: true`.",
        ),
    }
    return {
        "type": "object",
        "required": ["model", "messages"],
        "properties": properties,
        # top_logprobs needs logprobs set to true (ChatCompletionInputSerializer.validate)
        "dependentSchemas": {
            "top_logprobs": {
                "anyOf": [
                    {"properties": {"top_logprobs": {"type": "null"}}},
                    {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}},
                ]
            }
        },
    }


def _completion_request() -> dict:
    prompt = {"type": "string", "minLength": 1, "maxLength": settings.TANDEM_MAX_PROMPT_CHARS}
    properties = {
        **_generation_properties(),
        "prompt": {
            "anyOf": [prompt, {"type": "array", "minItems": 1, "maxItems": 1, "items": prompt}],
            "description": "One prompt: a string, or a list holding exactly one (no token arrays, no batches).",
        },
        "logprobs": _nullable(
            {"type": "integer", "minimum": 0, "maximum": COMPLETION_LOGPROBS_MAX},
            description=f"How many alternatives per token (0: only the chosen token's). {CLOUD_LOGPROBS}",
        ),
    }
    return {"type": "object", "required": ["model", "prompt"], "properties": properties}


# responses --------------------------------------------------------------------------------------
def _object(properties: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "required": list(properties) if required is None else required, "properties": properties}


NULL = {"type": "null"}
STRING = {"type": "string"}
INTEGER = {"type": "integer"}
NUMBER = {"type": "number"}
DECIMAL = {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]+)?$"}  # money and GPU time: exact decimals as text


def _components() -> dict[str, dict]:
    route = _object(
        {
            "tier": {"enum": [t.value for t in Tier]},
            "reason": STRING,
            "degraded": {"type": "boolean"},
            "policy_version": STRING,
        }
    )
    summary = _object(
        {
            "request_id": STRING,
            "prompt_tokens": INTEGER,
            "completion_tokens": INTEGER,
            "total_tokens": INTEGER,
            "drafted_tokens": DECIMAL,
            "accepted_tokens": INTEGER,
            "acceptance_rate": NUMBER,
            "gpu_ms": DECIMAL,
            "cost": {"type": "object", "additionalProperties": DECIMAL},
            "outcome": STRING,
            "finish_reason": STRING,
            "ttft_ms": {"type": ["number", "null"]},
            "duration_ms": NUMBER,
            "tokens_per_s": NUMBER,
            "route": _ref("Route"),
            "legs": {"type": "array", "items": {"type": "object"}},
        },
        required=["request_id", "prompt_tokens", "completion_tokens", "total_tokens", "cost", "outcome", "route"],
    )
    top_logprob = _object({"token": STRING, "logprob": NUMBER, "bytes": {"type": "array", "items": INTEGER}})
    chat_logprobs = _object(
        {
            "content": {
                "type": "array",
                "items": _object(
                    {**top_logprob["properties"], "top_logprobs": {"type": "array", "items": top_logprob}}
                ),
            },
            "refusal": NULL,
        }
    )
    completion_logprobs = _object(
        {
            "tokens": {"type": "array", "items": STRING},
            "token_logprobs": {"type": "array", "items": NUMBER},
            "top_logprobs": {"type": "array", "items": {"type": "object", "additionalProperties": NUMBER}},
            "text_offset": NULL,
        }
    )
    finish_reason = {"enum": ["stop", "length", ""]}
    head = {"id": STRING, "created": INTEGER, "model": STRING, "system_fingerprint": NULL}
    chat_choice = _object(
        {
            "index": {"const": 0},
            "message": _object({"role": {"const": "assistant"}, "content": STRING, "refusal": NULL}),
            "logprobs": {"anyOf": [_ref("ChatLogprobs"), NULL]},
            "finish_reason": finish_reason,
        }
    )
    text_choice = _object(
        {
            "index": {"const": 0},
            "text": STRING,
            "logprobs": {"anyOf": [_ref("CompletionLogprobs"), NULL]},
            "finish_reason": finish_reason,
        }
    )
    usage = _object({"prompt_tokens": INTEGER, "completion_tokens": INTEGER, "total_tokens": INTEGER})
    whole = {"usage": _ref("Usage"), "tandem": _ref("TandemSummary")}
    # a chunk's "tandem": the token's provenance (and a new route), or, on the finish chunk, the summary
    chunk_tandem = {
        "anyOf": [
            _object({"provenance": STRING, "route": _ref("Route")}, required=["provenance"]),
            _ref("TandemSummary"),
        ]
    }

    def chunk(obj: str, choice: dict) -> dict:
        return _object(
            {
                **head,
                "object": {"const": obj},
                "choices": {"type": "array", "maxItems": 1, "items": choice},
                "usage": {"anyOf": [_ref("Usage"), NULL]},
                "tandem": chunk_tandem,
            },
            required=[*head, "object", "choices"],
        )

    chat_chunk_choice = _object(
        {
            "index": {"const": 0},
            "delta": _object({"role": {"const": "assistant"}, "content": STRING}, required=[]),
            "logprobs": {"anyOf": [_ref("ChatLogprobs"), NULL]},
            "finish_reason": {"anyOf": [finish_reason, NULL]},
        }
    )
    text_chunk_choice = _object(
        {
            "index": {"const": 0},
            "text": STRING,
            "logprobs": {"anyOf": [_ref("CompletionLogprobs"), NULL]},
            "finish_reason": {"anyOf": [finish_reason, NULL]},
        }
    )
    error_object = _object(
        {"message": STRING, "type": STRING, "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}
    )
    model = _object(
        {
            "id": STRING,
            "object": {"const": "model"},
            "created": INTEGER,
            "owned_by": STRING,
            "tandem": _object({"context_length": INTEGER, "description": STRING}),
        }
    )
    return {
        "ChatCompletionRequest": _chat_request(),
        "CompletionRequest": _completion_request(),
        "Route": route,
        "TandemSummary": summary,
        "Usage": usage,
        "ChatLogprobs": chat_logprobs,
        "CompletionLogprobs": completion_logprobs,
        "ChatCompletion": _object(
            {**head, "object": {"const": "chat.completion"}, "choices": _array_of_one(chat_choice), **whole}
        ),
        "TextCompletion": _object(
            {**head, "object": {"const": "text_completion"}, "choices": _array_of_one(text_choice), **whole}
        ),
        "ChatCompletionChunk": chunk("chat.completion.chunk", chat_chunk_choice),
        "TextCompletionChunk": chunk("text_completion", text_chunk_choice),
        "Error": _object({"error": _ref("ErrorObject")}),
        "ErrorObject": error_object,
        # an error after the stream began (status and headers are gone): one event, then the stream ends
        "StreamError": _object(
            {"error": _ref("ErrorObject"), "retry_after": {"type": ["integer", "null"]}}, required=["error"]
        ),
        "Model": model,
        "ModelList": _object({"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Model")}}),
    }


def _array_of_one(items: dict) -> dict:
    return {"type": "array", "minItems": 1, "maxItems": 1, "items": items}


def _event_stream(chunk: str) -> dict:
    """An SSE body: each event's ``data`` is a chunk, a mid-stream error, or ``[DONE]`` (comments are keep-alives)."""
    json_data = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [_ref(chunk), _ref("StreamError")]},
    }
    return {
        "schema": {
            "type": "object",
            "required": ["data"],
            "properties": {"event": {"const": "message"}, "data": {"anyOf": [{"const": "[DONE]"}, json_data]}},
        }
    }


# headers and error responses ------------------------------------------------------------------------
RATE_LIMIT_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
)
DURATION = r"^(0s|[0-9]+ms|([0-9]+m)?[0-9]+s)$"  # inference.limits.duration


def _headers(*, authenticated: bool, extra: tuple[str, ...] = ()) -> dict:
    """Every response's ``x-request-id``; the key's rate-limit state once it authenticated; and ``extra``."""
    headers: dict[str, dict] = {"x-request-id": {"$ref": "#/components/headers/RequestId"}}
    if authenticated:
        headers |= {name: {"$ref": f"#/components/headers/{name}"} for name in RATE_LIMIT_HEADERS}
    headers |= {name: {"$ref": f"#/components/headers/{name}"} for name in extra}
    return headers


def _header_components() -> dict[str, dict]:
    def header(description: str, schema: dict) -> dict:
        return {"description": description, "required": True, "schema": schema}

    counts = {
        name: header("OpenAI's rate-limit header", {"type": "string", "pattern": r"^[0-9]+$"})
        for name in RATE_LIMIT_HEADERS
    }
    counts |= {
        name: header(
            "OpenAI's rate-limit header: time until the bucket is full", {"type": "string", "pattern": DURATION}
        )
        for name in RATE_LIMIT_HEADERS
        if name.startswith("x-ratelimit-reset")
    }
    return {
        "RequestId": header(
            "The ledger's request id: the client's X-Request-Id when well-formed, else a new one", {"type": "string"}
        ),
        **counts,
        "Retry-After": header("Seconds worth waiting before a retry", {"type": "string", "pattern": r"^[0-9]+$"}),
        "WWW-Authenticate": header("The scheme to authenticate with", {"const": "Bearer"}),
        "Allow": header("The methods this path serves", {"type": "string"}),
    }


ERROR_STATUSES: dict[int, tuple[str, bool, tuple[str, ...]]] = {
    # status: (what it means, sent after authentication (rate-limit headers), extra headers)
    400: ("Invalid request: the body breaks this schema, or a runtime check refused it (see `error.param`)", True, ()),
    401: ("No API key, or an invalid or revoked one", False, ("WWW-Authenticate",)),
    402: ("The tenant's hard budget has no room for this request's worst case", True, ()),
    403: ("The key lacks the scope, or its member the role, this endpoint needs", True, ()),
    404: ("The model does not exist", True, ()),
    405: ("Method not allowed", False, ("Allow",)),
    409: ("This X-Request-Id was already used; send a new one", True, ()),
    429: ("Past the tenant's or key's rate limit", True, ("Retry-After",)),
    500: ("Internal error (a bug: quote the request id)", False, ()),
    502: ("The engine failed before anything was delivered", True, ()),
    503: ("Overloaded, or no tier may serve the model now", True, ("Retry-After",)),
}


def _error_response(status: int) -> dict:
    description, authenticated, extra = ERROR_STATUSES[status]
    return {
        "description": description,
        "headers": _headers(authenticated=authenticated, extra=extra),
        "content": {"application/json": {"schema": _ref("Error")}},
    }


def _errors(*statuses: int) -> dict[str, dict]:
    return {str(status): _error_response(status) for status in statuses}


def _completion_operation(*, summary: str, request: str, response: str, chunk: str, operation_id: str) -> dict:
    return {
        "post": {
            "operationId": operation_id,
            "summary": summary,
            "parameters": [{"$ref": "#/components/parameters/XRequestId"}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
            "responses": {
                "200": {
                    "description": "The completion: one JSON object, or with `stream: true` server-sent events "
                    "(`data: <chunk>` ..., then `data: [DONE]`; `: ...` comment lines keep a waiting stream alive)",
                    "headers": _headers(authenticated=True),
                    "content": {
                        "application/json": {"schema": _ref(response)},
                        "text/event-stream": _event_stream(chunk),
                    },
                },
                **_errors(400, 401, 402, 403, 404, 405, 409, 429, 500, 502, 503),
            },
        }
    }


def _model_operation(*, operation_id: str, summary: str, response: str, not_found: bool) -> dict:
    return {
        "get": {
            "operationId": operation_id,
            "summary": summary,
            "responses": {
                "200": {
                    "description": summary,
                    "headers": _headers(authenticated=True),
                    "content": {"application/json": {"schema": _ref(response)}},
                },
                **_errors(*((401, 403, 404, 405, 500) if not_found else (401, 403, 405, 500))),
            },
        }
    }


@functools.cache
def openapi_schema() -> dict:
    """The whole ``/v1/`` API as an OpenAPI 3.1 document (built once; callers get it as is: do not mutate)."""
    from batches.openapi import batch_paths, batch_schemas  # the batch app's endpoints, served under /v1/ too

    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Tandem OpenAI-compatible API",
            "version": "1",
            "description": DESCRIPTION,
        },
        "servers": [{"url": "/"}],
        "security": [{"bearerAuth": []}],
        "paths": {
            "/v1/chat/completions": _completion_operation(
                operation_id="createChatCompletion",
                summary="A chat completion",
                request="ChatCompletionRequest",
                response="ChatCompletion",
                chunk="ChatCompletionChunk",
            ),
            "/v1/completions": _completion_operation(
                operation_id="createCompletion",
                summary="A text completion",
                request="CompletionRequest",
                response="TextCompletion",
                chunk="TextCompletionChunk",
            ),
            "/v1/models": _model_operation(
                operation_id="listModels", summary="The models served here", response="ModelList", not_found=False
            ),
            "/v1/models/{model_id}": {
                "parameters": [
                    {
                        "name": "model_id",
                        "in": "path",
                        "required": True,
                        # ids may hold a slash ("org/name"): the route takes the rest of the path
                        "schema": {"type": "string", "minLength": 1},
                        "description": "A model id from GET /v1/models (it may hold a slash).",
                    }
                ],
                **_model_operation(operation_id="retrieveModel", summary="One model", response="Model", not_found=True),
            },
            SCHEMA_PATH: {
                "get": {
                    "operationId": "getOpenApiSchema",
                    "summary": "This document",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "This OpenAPI document",
                            "headers": _headers(authenticated=False),
                            "content": {
                                "application/json": {"schema": {"type": "object", "required": ["openapi", "paths"]}}
                            },
                        },
                        **_errors(405),
                    },
                }
            },
            **batch_paths(),
        },
        "components": {
            "schemas": _components() | batch_schemas(),
            "headers": _header_components(),
            "parameters": {
                "XRequestId": {
                    "name": "X-Request-Id",
                    "in": "header",
                    "required": False,
                    "description": "Your id for this request, kept on the ledger when it matches "
                    f"{openai_api.REQUEST_ID_RE.pattern} and does not start with 'req_' (else a new one is "
                    "made); each id is used once (409 on reuse).",
                    "schema": {"type": "string"},
                }
            },
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer", "description": "A Tandem API key"}},
        },
    }


@openai_api.openai_endpoint("GET")
async def openapi_json(request: HttpRequest, request_id: str) -> HttpResponse:
    """``GET /v1/openapi.json``: this document; no key needed (it says nothing about any tenant)."""
    return JsonResponse(openapi_schema())
