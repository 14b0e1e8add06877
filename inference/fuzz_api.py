"""Fuzz the OpenAI-compatible API against its own OpenAPI schema (:mod:`inference.openapi`) with schemathesis.

Every operation gets generated requests, valid ones (the schema's ``positive`` mode) and
invalid ones (``negative``: a field of the wrong type, out of range, missing), each sent
with a real key, and every answer is held to the schema: no 5xx, a documented status,
the documented content type, headers and body. Two disagreements between what the schema
says and what the server does are counted apart: an invalid body the server accepted
(2xx), and a valid one it refused with a 400 that no runtime condition explains.

Against a live server (``make fuzz``)::

    python -m inference.fuzz_api --base-url http://127.0.0.1:8000 --key KEY --cases 10000

prints the figures as JSON (cases, statuses, 5xx, schema violations, disagreements, each per
endpoint, with the first few failing requests) and exits 1 on any 5xx, violation or request
that got no answer. ``tests/inference/test_fuzz_api.py`` runs a short version in-process,
through the ASGI app. A 200 stream that ends in a server-side ``error`` event counts as a 5xx.

Generated bodies name the served model most of the time (else nearly every valid request
would be a 404), ask for a stream more often than the generator alone would, and ask for
at most ``--max-tokens`` tokens where they would be served (a ``max_tokens`` past the
model's context stays, to be refused): a fuzz run tests the API's edges, not the engine's
speed. Each path is also asked with the methods it does not serve (a documented 405).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import requests
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis import Case, GenerationMode, Response
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup, ServerError
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

SCHEMA_PATH = "/v1/openapi.json"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# share of the cases for each operation (what is left of a small operation's share goes to the next ones)
WEIGHTS = {
    "GET /v1/openapi.json": 0.01,
    "GET /v1/models": 0.02,
    "GET /v1/models/{model_id}": 0.07,
    "POST /v1/completions": 0.45,
    "POST /v1/chat/completions": 0.45,
}
MODEL_SHARE = 0.8  # of generated bodies and model ids, this many name the served model
STREAM_SHARE = 0.3  # of valid bodies that leave `stream` out, this many ask for a stream (the generator seldom does)
UNAUTHENTICATED_SHARE = 0.03  # of requests, this many go without a key or with a wrong one
NEGATIVE_SHARE = 0.4  # of each operation's cases, this many are generated to break the schema
WRONG_METHODS = frozenset(
    {"GET", "POST", "PUT", "PATCH", "DELETE"}
)  # asked of every path: the ones it does not serve get 405
EXAMPLES_KEPT = 5  # failing requests kept per endpoint and kind, for the report
BODY_CHARS = 600  # of a request's or response's body, this much goes in the report
# A schema-valid body may still be refused at run time: too long for the context or the
# tenant's tokens a minute, PII the policy refuses, a tier the policy does not allow, a chat
# the model's template refuses, logprobs of a redacted prompt asked of the cloud tier.
RUNTIME_400_CODES = frozenset({"context_length_exceeded", "tokens_exceed_limit", "pii_detected"})
RUNTIME_400_PARAMS = frozenset({"tier"})
RUNTIME_400_MESSAGES = ("chat template", "not served by the cloud tier")


@dataclass
class EndpointFigures:
    cases: int = 0
    statuses: Counter = field(default_factory=Counter)
    server_errors: int = 0  # 5xx, and streams that ended in a server error event (200 sent before it failed)
    violations: int = 0  # a check failed: undocumented status, content type, header or body
    accepted_invalid: int = 0  # a body the schema calls invalid, answered 2xx
    refused_valid: int = 0  # a body the schema calls valid, refused 400 for no runtime reason
    transport_errors: int = 0
    examples: dict[str, list[dict]] = field(default_factory=dict)

    def keep(self, kind: str, example: dict) -> None:
        kept = self.examples.setdefault(kind, [])
        if len(kept) < EXAMPLES_KEPT:
            kept.append(example)

    def as_dict(self) -> dict:
        return {
            "cases": self.cases,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "server_errors": self.server_errors,
            "violations": self.violations,
            "accepted_invalid": self.accepted_invalid,
            "refused_valid": self.refused_valid,
            "transport_errors": self.transport_errors,
            "examples": self.examples,
        }


@dataclass
class Report:
    endpoints: dict[str, EndpointFigures] = field(default_factory=dict)
    seconds: float = 0.0

    def total(self, name: str) -> int:
        return sum(getattr(figures, name) for figures in self.endpoints.values())

    @property
    def failed(self) -> bool:
        return bool(self.total("server_errors") or self.total("violations") or self.total("transport_errors"))

    def as_dict(self) -> dict:
        return {
            "cases": self.total("cases"),
            "server_errors": self.total("server_errors"),
            "violations": self.total("violations"),
            "accepted_invalid": self.total("accepted_invalid"),
            "refused_valid": self.total("refused_valid"),
            "transport_errors": self.total("transport_errors"),
            "seconds": round(self.seconds, 1),
            "endpoints": {name: figures.as_dict() for name, figures in self.endpoints.items()},
        }


@dataclass
class Target:
    """How to reach the API and what to ask of it."""

    send: Callable[[Case, dict[str, str]], Response]  # the case, sent with these headers
    key: str
    model: str
    max_tokens: int = 4
    context_length: int | None = None  # the served model's; max_tokens past it are left to be refused
    extra_check: Callable[[Case, Response], str | None] | None = None  # e.g. "nothing was charged"


def fuzz(schema: Any, target: Target, cases: int, seed: int = 0) -> Report:
    """Send about ``cases`` generated requests across ``schema``'s operations; the figures."""
    report = Report()
    rng = random.Random(seed)
    started = time.monotonic()
    left = 0
    operations = {f"{op.method.upper()} {op.path}": op for op in (r.ok() for r in schema.get_all_operations())}
    for name, weight in sorted(WEIGHTS.items(), key=lambda item: item[1]):
        operation = operations.pop(name, None)
        if operation is None:
            continue
        figures = report.endpoints[name] = EndpointFigures()
        budget = int(cases * weight) + left
        negative = int(budget * NEGATIVE_SHARE)
        for mode, n in ((GenerationMode.POSITIVE, budget - negative), (GenerationMode.NEGATIVE, negative)):
            _drive(
                operation,
                mode,
                n,
                rng.randrange(2**32),
                functools.partial(_one, target=target, rng=rng, figures=figures),
            )
        left = max(0, budget - figures.cases)
    for name in operations:  # an operation with no weight is still fuzzed a little
        figures = report.endpoints[name] = EndpointFigures()
        _drive(
            operations[name],
            GenerationMode.POSITIVE,
            20,
            rng.randrange(2**32),
            functools.partial(_one, target=target, rng=rng, figures=figures),
        )
    _wrong_methods(schema, target, report)
    report.seconds = time.monotonic() - started
    return report


def _wrong_methods(schema: Any, target: Target, report: Report) -> None:
    """Each path asked with the methods it does not serve: a documented 405 (``Allow``, OpenAI's error body)."""
    operations = [r.ok() for r in schema.get_all_operations()]
    served: dict[str, set[str]] = {}
    for operation in operations:
        served.setdefault(operation.path, set()).add(operation.method.upper())
    for operation in operations:
        figures = report.endpoints.setdefault(f"{operation.method.upper()} {operation.path}", EndpointFigures())
        for method in sorted(WRONG_METHODS - served[operation.path]):
            names = re.findall(r"{(\w+)}", operation.path)  # a model that exists; other ids (files, batches) none
            case = operation.Case(
                path_parameters={n: target.model if n == "model_id" else f"no-such-{n}" for n in names} or None
            )
            case.method = method
            headers = {"Authorization": f"Bearer {target.key}"}
            figures.cases += 1
            response = target.send(case, headers)
            figures.statuses[response.status_code] += 1
            failures = [] if response.status_code == 405 else [f"{method} answered {response.status_code}, not 405"]
            try:
                case.validate_response(response, checks=CHECKS, headers=headers)
            except (Failure, FailureGroup) as exc:
                failures += [
                    f"{f.title}: {f.message}" for f in (exc.exceptions if isinstance(exc, FailureGroup) else [exc])
                ]
            if failures:
                figures.violations += 1
                figures.keep("violations", _example(case, response) | {"failures": failures})


def _drive(operation: Any, mode: GenerationMode, n: int, seed: int, each: Callable[[Case], None]) -> None:
    """Call ``each`` on up to ``n`` cases generated for ``operation`` (fewer where the inputs run out)."""
    if n <= 0:
        return
    strategy = operation.as_strategy(generation_mode=mode)

    @hypothesis.seed(seed)
    @hypothesis.settings(
        max_examples=n,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        derandomize=False,
    )
    @hypothesis.given(case=strategy)
    def run(case: Case) -> None:
        each(case)

    try:
        run()
    except hypothesis.errors.Unsatisfiable:  # nothing of this operation can be made invalid
        return


def _one(case: Case, target: Target, rng: random.Random, figures: EndpointFigures) -> None:
    _shape(case, target, rng)
    headers = _auth_headers(target.key, rng)
    figures.cases += 1
    try:
        response = target.send(case, headers)
    except (requests.RequestException, OSError) as exc:
        figures.transport_errors += 1
        figures.keep("transport_errors", _request_of(case) | {"error": repr(exc)})
        return
    figures.statuses[response.status_code] += 1
    if response.status_code >= 500 or _stream_server_error(response):
        figures.server_errors += 1
        figures.keep("server_errors", _example(case, response))
    try:
        case.validate_response(response, checks=CHECKS, headers=headers)
    except (Failure, FailureGroup) as exc:
        failures = [
            f for f in (exc.exceptions if isinstance(exc, FailureGroup) else [exc]) if not isinstance(f, ServerError)
        ]
        if failures:  # a 5xx is counted above; what else is wrong with the answer is a violation
            messages = [f"{f.title}: {f.message}" for f in failures]
            figures.violations += 1
            figures.keep("violations", _example(case, response) | {"failures": messages})
    extra = target.extra_check(case, response) if target.extra_check is not None else None
    if extra is not None:
        figures.violations += 1
        figures.keep("violations", _example(case, response) | {"failures": [extra]})
    _agreement(case, response, figures, "Authorization" in headers and headers["Authorization"].endswith(target.key))


def load_schema(raw: dict, app: Any = None) -> Any:
    """The schemathesis schema of the served document (``app``: an ASGI app to call in-process).

    Loaded from the document rather than by URL, since schemathesis leaves out the operation it
    was loaded from, and ``GET /v1/openapi.json`` is fuzzed too.
    """
    schema = schemathesis.openapi.from_dict(copy.deepcopy(raw))
    if app is not None:
        schema.app = app
    return schema


def _shape(case: Case, target: Target, rng: random.Random) -> None:
    """Name the served model most of the time, and keep token counts that would be served small.

    The model is swapped only in bodies generated valid, so that an invalid one stays invalid.
    """
    body = case.body
    if isinstance(body, dict):
        valid = case.meta is None or all(i.mode == GenerationMode.POSITIVE for i in case.meta.components.values())
        if valid and isinstance(body.get("model"), str) and rng.random() < MODEL_SHARE:
            body["model"] = target.model
        if valid and "stream" not in body and rng.random() < STREAM_SHARE:
            body["stream"] = True
        for name in ("max_tokens", "max_completion_tokens"):
            value = body.get(name)
            if (
                type(value) is int
                and value > target.max_tokens
                and (target.context_length is None or value <= target.context_length)
            ):
                body[name] = target.max_tokens
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_tokens"] = target.max_tokens
    if case.path_parameters and "model_id" in case.path_parameters and rng.random() < MODEL_SHARE / 2:
        case.path_parameters["model_id"] = target.model


def _auth_headers(key: str, rng: random.Random) -> dict[str, str]:
    roll = rng.random()
    if roll < UNAUTHENTICATED_SHARE / 2:
        return {}
    if roll < UNAUTHENTICATED_SHARE:
        return {"Authorization": "Bearer tk-not-a-key"}
    return {"Authorization": f"Bearer {key}"}


def _agreement(case: Case, response: Response, figures: EndpointFigures, authenticated: bool) -> None:
    """Count the server disagreeing with the schema on what is a valid request body."""
    meta = case.meta
    if meta is None or not authenticated or case.operation.method.upper() != "POST":
        return
    modes = {str(location): info.mode for location, info in meta.components.items()}
    body_mode = modes.get(str(ParameterLocation.BODY))
    status = response.status_code
    if body_mode == GenerationMode.NEGATIVE and 200 <= status < 300:
        figures.accepted_invalid += 1
        figures.keep("accepted_invalid", _example(case, response))
    elif all(mode == GenerationMode.POSITIVE for mode in modes.values()) and status == 400:
        error = _error_of(response)
        if error.get("code") in RUNTIME_400_CODES or error.get("param") in RUNTIME_400_PARAMS:
            return
        if any(m in str(error.get("message")) for m in RUNTIME_400_MESSAGES) or _integral_float(
            case.body, error.get("param")
        ):
            return
        figures.refused_valid += 1
        figures.keep("refused_valid", _example(case, response))


def _integral_float(body: object, param: object) -> bool:
    """Whether the refused field holds a float such as 5.0: JSON Schema calls it an integer, the server does not."""
    value = body.get(param) if isinstance(body, dict) and isinstance(param, str) else None
    return isinstance(value, float) and value.is_integer()


def _stream_server_error(response: Response) -> bool:
    """Whether a 200 event stream ended in a server-side error event (a 5xx after the status was sent)."""
    if "text/event-stream" not in str(response.headers.get("content-type")):
        return False
    for line in response.content.decode("utf-8", "replace").splitlines():
        if line.startswith("data: {") and '"error"' in line:
            try:
                error = json.loads(line.removeprefix("data: ")).get("error")
            except ValueError:
                continue
            if isinstance(error, dict) and error.get("type") == "server_error" and error.get("code") != "overloaded":
                return True
    return False


def _error_of(response: Response) -> dict:
    try:
        error = json.loads(response.content)["error"]
    except (ValueError, KeyError, TypeError):
        return {}
    return error if isinstance(error, dict) else {}


def _request_of(case: Case) -> dict:
    return {
        "request": {
            "method": case.operation.method.upper(),
            "path": case.formatted_path,
            "path_parameters": case.path_parameters,
            "headers": {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"},
            "body": _truncated(json.dumps(case.body, default=repr)) if case.body is not None else None,
            "mode": case.meta.generation.mode.value if case.meta is not None else None,
        }
    }


def _example(case: Case, response: Response) -> dict:
    return _request_of(case) | {
        "response": {
            "status": response.status_code,
            "content_type": response.headers.get("content-type"),
            "body": _truncated(response.content.decode("utf-8", "replace")),
        }
    }


def _truncated(text: str) -> str:
    return text if len(text) <= BODY_CHARS else text[:BODY_CHARS] + f"... ({len(text)} chars)"


# against a live server --------------------------------------------------------------------------
def live_target(base_url: str, key: str, model: str, max_tokens: int, timeout_s: float) -> Target:
    session = requests.Session()
    base = base_url.rstrip("/")

    def send(case: Case, headers: dict[str, str]) -> Response:
        return case.call(base_url=base, session=session, headers=headers, timeout=timeout_s)

    detail = session.get(f"{base}/v1/models/{model}", headers={"Authorization": f"Bearer {key}"}, timeout=timeout_s)
    detail.raise_for_status()
    context_length = detail.json().get("tandem", {}).get("context_length")
    return Target(send=send, key=key, model=model, max_tokens=max_tokens, context_length=context_length)


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--key", required=True, help="a Tandem API key (make run prints the demo's)")
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--model", default="tandem-demo", help="the served model most generated bodies name")
    parser.add_argument("--max-tokens", type=int, default=4, help="the most tokens a served request asks for")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a request may take")
    args = parser.parse_args(list(argv) if argv is not None else None)
    document = requests.get(f"{args.base_url.rstrip('/')}{SCHEMA_PATH}", timeout=args.timeout)
    document.raise_for_status()
    schema = load_schema(document.json())
    target = live_target(args.base_url, args.key, args.model, args.max_tokens, args.timeout)
    report = fuzz(schema, target, args.cases, seed=args.seed)
    json.dump(report.as_dict(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
