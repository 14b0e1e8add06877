"""The platform's request errors: one hierarchy, mapped once at each adapter's edge.

Every error carries what the adapters need: an HTTP status, an OpenAI error ``type`` and
``code``, and a message a person can act on. The OpenAI API turns one into its error
body (``{"error": {"message", "type", "param", "code"}}``), the websocket into an
``error`` frame with the same fields. Errors raised before a stream starts charge
nothing; errors in the middle of a stream charge exactly what was delivered.
"""

from __future__ import annotations


class GatewayError(Exception):
    status = 500
    type = "server_error"
    code: str | None = "internal_error"

    retry_after: int | None = None  # seconds worth waiting before a retry (429 and 503 say it: Retry-After)

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, retry_after: int | None = None
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if retry_after is not None:
            self.retry_after = retry_after

    def as_dict(self) -> dict:
        """The OpenAI error object (the value of the ``error`` key)."""
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class RequestIdConflict(InvalidRequest):
    """A request id is used once: a retry must send a new one (the message never says whose it was)."""

    status = 409
    code = "duplicate_request_id"


class ContextTooLong(InvalidRequest):
    code = "context_length_exceeded"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class BudgetExceeded(GatewayError):
    status = 402
    type = "insufficient_quota"
    code = "budget_exceeded"
    may_fit_later = False  # money other requests hold may come back (inference.holds waits for it briefly)


class ModelNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"
    retry_after = 1


class Overloaded(GatewayError):
    status = 503
    type = "server_error"
    code = "overloaded"
    retry_after = 1


class UpstreamFailed(GatewayError):
    """The engine failed in the middle of a stream (after some tokens may have been delivered)."""

    status = 502
    type = "server_error"
    code = "engine_error"


def unexpected(exc: BaseException, request_id: str) -> GatewayError:
    """What an adapter answers for an exception nothing else caught: 503 when the database is unreachable
    (restarting, failing over: retrying helps), else a 500 that names the request id."""
    from django.db import InterfaceError, OperationalError

    if isinstance(exc, OperationalError | InterfaceError):
        return Overloaded(
            f"the platform's database is unavailable; retry shortly (request id {request_id})",
            code="database_unavailable",
            retry_after=2,
        )
    return GatewayError(f"internal error; quote request id {request_id} when reporting it")
