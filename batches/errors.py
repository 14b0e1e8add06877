"""The batch API's errors: the platform's request errors (``inference.errors``), with batch codes.

They subclass the gateway's hierarchy, so the one mapping at the API's edge
(``inference.openai_api.error_response``) answers them in OpenAI's error shape.
"""

from __future__ import annotations

from inference.errors import InvalidRequest


class InvalidBatchInput(InvalidRequest):
    """A file or batch request the service refuses (400); nothing is stored or charged."""


class BatchObjectNotFound(InvalidRequest):
    """No file or batch of this id in the caller's tenant (404: another tenant's looks exactly like none)."""

    status = 404
    code = "not_found"


class BatchStateConflict(InvalidRequest):
    """The batch is in a state that refuses the action (cancel a completed batch): 409."""

    status = 409
    code = "invalid_state"
