"""The batch endpoints' part of the /v1/ OpenAPI document (``inference.openapi`` merges it in)."""

from __future__ import annotations

from batches.lines import ENDPOINTS
from batches.models import BatchStatus
from batches.selectors import MAX_LIST_LIMIT
from batches.services import COMPLETION_WINDOWS, MAX_METADATA_PAIRS
from inference.openapi import INTEGER, NULL, STRING, _errors, _headers, _object, _ref

NOT_FOUND = {
    "description": "No file or batch of this id in the key's tenant (another tenant's is answered alike)",
    "headers": _headers(authenticated=True),
    "content": {"application/json": {"schema": _ref("Error")}},
}
CONFLICT = {
    "description": "The batch has ended: it can no longer be cancelled",
    "headers": _headers(authenticated=True),
    "content": {"application/json": {"schema": _ref("Error")}},
}


def _ok(description: str, schema: dict, media: str = "application/json") -> dict:
    return {"description": description, "headers": _headers(authenticated=True), "content": {media: {"schema": schema}}}


FILE_IN_USE = {
    "description": "The file is the input of a batch that has not ended: cancel the batch first",
    "headers": _headers(authenticated=True),
    "content": {"application/json": {"schema": _ref("Error")}},
}


def _operation(
    operation_id: str, summary: str, ok: dict, *, not_found: bool = False, conflict: dict | None = None, **extra
) -> dict:
    responses = {"200": ok, **_errors(400, 401, 403, 405, 500)}
    if not_found:
        responses["404"] = NOT_FOUND
    if conflict is not None:
        responses["409"] = conflict
    return {"operationId": operation_id, "summary": summary, **extra, "responses": responses}


def _id_parameter(name: str, description: str) -> list[dict]:
    return [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": {"type": "string", "minLength": 1},
            "description": description,
        }
    ]


def batch_paths() -> dict[str, dict]:
    file_id = _id_parameter("file_id", "A file id from POST /v1/files, or a batch's output or error file id")
    batch_id = _id_parameter("batch_id", "A batch id from POST /v1/batches")
    upload = {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": _object(
                    {
                        "file": {"type": "string", "contentMediaType": "application/octet-stream"},
                        "purpose": {"const": "batch"},
                    }
                )
            }
        },
    }
    create = {"required": True, "content": {"application/json": {"schema": _ref("BatchCreateRequest")}}}
    listing = [
        {
            "name": "after",
            "in": "query",
            "required": False,
            "schema": STRING,
            "description": "A batch id: the page after it",
        },
        {
            "name": "limit",
            "in": "query",
            "required": False,
            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT},
        },
    ]
    return {
        "/v1/files": {
            "get": _operation(
                "listFiles",
                "The tenant's files, newest first",
                _ok("A page", _ref("FileList")),
                not_found=True,  # an `after` that names no file of the tenant's
                parameters=[
                    {**listing[0], "description": "A file id: the page after it"},
                    listing[1],
                    {
                        "name": "purpose",
                        "in": "query",
                        "required": False,
                        "schema": {"enum": ["batch", "batch_output"]},
                    },
                ],
            ),
            "post": _operation(
                "createFile", "Upload a batch input file (JSONL)", _ok("The file", _ref("File")), requestBody=upload
            ),
        },
        "/v1/files/{file_id}": {
            "parameters": file_id,
            "get": _operation("retrieveFile", "One file", _ok("The file", _ref("File")), not_found=True),
            "delete": _operation(
                "deleteFile",
                "Delete a file (its bytes; the id answers 404 after)",
                _ok("Deleted", _ref("FileDeleted")),
                not_found=True,
                conflict=FILE_IN_USE,
            ),
        },
        "/v1/files/{file_id}/content": {
            "parameters": file_id,
            "get": _operation(
                "downloadFile", "A file's bytes", _ok("The file's JSONL", STRING, "application/jsonl"), not_found=True
            ),
        },
        "/v1/batches": {
            "get": _operation(
                "listBatches",
                "The tenant's batches, newest first",
                _ok("A page", _ref("BatchList")),
                not_found=True,  # an `after` that names no batch of the tenant's
                parameters=listing,
            ),
            "post": _operation(
                "createBatch",
                "Run a file's requests as a batch",
                _ok("The batch", _ref("Batch")),
                not_found=True,
                requestBody=create,
            ),
        },
        "/v1/batches/{batch_id}": {
            "parameters": batch_id,
            "get": _operation("retrieveBatch", "One batch", _ok("The batch", _ref("Batch")), not_found=True),
        },
        "/v1/batches/{batch_id}/cancel": {
            "parameters": batch_id,
            "post": _operation(
                "cancelBatch",
                "Stop starting its requests",
                _ok("The batch", _ref("Batch")),
                not_found=True,
                conflict=CONFLICT,
            ),
        },
    }


def _list_of(item: str) -> dict:
    """OpenAI's list object (``batches.apis._page``) of ``item`` objects."""
    return _object(
        {
            "object": {"const": "list"},
            "data": {"type": "array", "items": _ref(item)},
            "first_id": {"anyOf": [STRING, NULL]},
            "last_id": {"anyOf": [STRING, NULL]},
            "has_more": {"type": "boolean"},
        }
    )


def batch_schemas() -> dict[str, dict]:
    timestamp = {"anyOf": [INTEGER, NULL]}
    counts = _object({"total": INTEGER, "completed": INTEGER, "failed": INTEGER})
    batch = _object(
        {
            "id": STRING,
            "object": {"const": "batch"},
            "endpoint": {"enum": list(ENDPOINTS)},
            "errors": {"anyOf": [{"type": "object"}, NULL]},
            "input_file_id": STRING,
            "completion_window": {"enum": list(COMPLETION_WINDOWS)},
            "status": {"enum": list(BatchStatus.values)},
            "output_file_id": {"anyOf": [STRING, NULL]},
            "error_file_id": {"anyOf": [STRING, NULL]},
            "created_at": INTEGER,
            "in_progress_at": timestamp,
            "expires_at": timestamp,
            "finalizing_at": timestamp,
            "completed_at": timestamp,
            "failed_at": timestamp,
            "expired_at": timestamp,
            "cancelling_at": timestamp,
            "cancelled_at": timestamp,
            "request_counts": counts,
            "metadata": {"anyOf": [{"type": "object", "additionalProperties": STRING}, NULL]},
        }
    )
    return {
        "File": _object(
            {
                "id": STRING,
                "object": {"const": "file"},
                "bytes": INTEGER,
                "created_at": INTEGER,
                "expires_at": INTEGER,
                "filename": STRING,
                "purpose": {"enum": ["batch", "batch_output"]},
                "status": {"const": "processed"},
                "status_details": NULL,
            }
        ),
        "FileList": _list_of("File"),
        "FileDeleted": _object({"id": STRING, "object": {"const": "file"}, "deleted": {"const": True}}),
        "Batch": batch,
        "BatchList": _list_of("Batch"),
        "BatchCreateRequest": _object(
            {
                "input_file_id": {"type": "string", "minLength": 1, "maxLength": 64},
                "endpoint": {"enum": list(ENDPOINTS)},
                "completion_window": {"enum": list(COMPLETION_WINDOWS)},
                "metadata": {
                    "anyOf": [
                        {"type": "object", "maxProperties": MAX_METADATA_PAIRS, "additionalProperties": STRING},
                        NULL,
                    ]
                },
            },
            required=["input_file_id", "endpoint", "completion_window"],
        ),
    }
