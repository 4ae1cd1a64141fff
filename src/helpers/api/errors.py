"""Every error the API returns is JSON of one shape, `{"error": {code, message, field, allowed}}`:
what went wrong, which field, and what is allowed. No traceback ever reaches a client."""

from __future__ import annotations

import json
import logging
import re
import secrets

from botocore.exceptions import ClientError
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from helpers.services.instance_images import InstanceImageError

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answer: status, a stable code, a message, and optionally the field at fault."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        allowed: str | None = None,
        headers: dict[str, str] | None = None,
        problems: list[dict] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"code": code, "message": message, "field": field, "allowed": allowed}
        if problems is not None:
            self.body["problems"] = problems
        self.headers = headers


class BodyTooLarge(Exception):
    """A request body over the route's limit (raised while it is being read)."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra
) -> JSONResponse:
    body = {"code": code, "message": message, "field": None, "allowed": None, **extra}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def too_large(limit: int) -> JSONResponse:
    return error_response(
        413,
        "body_too_large",
        f"the request body is over this route's limit of {limit} bytes",
        allowed=f"at most {limit} bytes",
    )


def _field(location: tuple) -> str | None:
    parts = [str(part) for part in location if part not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


#: What a field of the wrong type accepts, when its bounds say nothing (strict bodies).
_TYPES_ALLOWED = {
    "int_type": "an integer (not a string, boolean or fraction)",
    "float_type": "a number",
    "finite_number": "a finite number (not NaN or infinity)",
    "string_type": "a string",
    "bool_type": "true or false",
}


def _allowed(problem: dict) -> str | None:
    if problem.get("type") in _TYPES_ALLOWED:
        return _TYPES_ALLOWED[problem["type"]]
    context = problem.get("ctx") or {}
    bounds = []
    for key, word in (
        ("ge", ">="),
        ("gt", ">"),
        ("le", "<="),
        ("lt", "<"),
        ("multiple_of", "a multiple of"),
        ("min_length", "length >="),
        ("max_length", "length <="),
        ("pattern", "matching"),
        ("expected", "one of"),
    ):
        if key in context:
            bounds.append(f"{word} {context[key]}")
    return ", ".join(bounds) or None


#: AWS error codes of a service that is busy rather than broken: the same request may succeed
#: in a moment (DynamoDB's and S3's throttling, and their transient failures).
BUSY_CODES = frozenset(
    {
        "ThrottlingException",
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "SlowDown",
        "ServiceUnavailable",
        "InternalServerError",
    }
)
#: Seconds a client waits before retrying a request that met a busy service.
BUSY_RETRY_AFTER = 2

#: Errors any operation may answer, by what the operation has: (status, description).
_ANY = (
    ("413", "The body is over the route's limit."),
    ("429", "Rate limit or quota; see Retry-After."),
    ("500", "The service failed; the message gives a reference to its log."),
    ("503", "A service the API depends on is busy or restarting; see Retry-After."),
)
_SECURED = (("401", "Missing, malformed or wrong API key."),)
_INPUT = (("422", "A field is invalid; `field` names it and `allowed` says what it takes."),)
_BODY = (
    ("400", "The body is not valid JSON or multipart."),
    ("415", "The body's Content-Type is not the one the route takes."),
)


def document_errors(spec: dict) -> dict:
    """Add the error answers every operation shares to `spec` (in place; idempotent): 401
    where a key is needed, 422 where there is input, 400 and 415 where there is a body, 413
    and 429 everywhere. Declared here once, so a new route cannot miss them. FastAPI's own
    422 (`HTTPValidationError`) is replaced: this app answers every error as `ErrorResponse`."""
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            shared = list(_ANY)
            if operation.get("security"):
                shared += _SECURED
            if operation.get("parameters") or operation.get("requestBody"):
                shared += _INPUT
            if operation.get("requestBody"):
                shared += _BODY
            responses = operation.setdefault("responses", {})
            if "HTTPValidationError" in json.dumps(responses.get("422", {})):
                del responses["422"]
            for status, description in shared:
                responses.setdefault(status, {"description": description, "content": error})
    schemas = spec.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    return spec


def install_error_docs(app: FastAPI) -> None:
    """Make `app.openapi()` document the shared error answers (`document_errors`)."""
    build = app.openapi

    def openapi() -> dict:
        return document_errors(build())  # `build` caches the spec; adding again is a no-op

    app.openapi = openapi


def _methods_of(request: Request) -> list[str]:
    """The methods the spec documents for the request's path: those of its most specific
    template (`/v1/photos/uploads`, not `/v1/photos/{name}`). Starlette's own `Allow` names
    only the first route that matches, though here each method is a route of its own."""
    matches = [
        (template.count("{"), operations)
        for template, operations in request.app.openapi()["paths"].items()
        if re.fullmatch(re.sub(r"\\{[^}]+\\}", "[^/]+", re.escape(template)), request.url.path)
    ]
    fewest = min((parameters for parameters, _ in matches), default=0)
    return sorted(
        {method.upper() for parameters, ops in matches if parameters == fewest for method in ops}
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return JSONResponse({"error": error.body}, status_code=error.status, headers=error.headers)

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(request: Request, error: BodyTooLarge):
        return too_large(error.limit)

    @app.exception_handler(InstanceImageError)
    async def bad_images(request: Request, error: InstanceImageError):
        first = error.problems[0]
        return error_response(
            422,
            "invalid_photos",
            str(error),
            field=f"files[{first.file}].{first.field}",
            allowed=first.allowed,
            problems=error.details(),
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        problems = error.errors()
        first = problems[0] if problems else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return error_response(
                400,
                "malformed_json",
                f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                allowed="a JSON object",
            )
        field = _field(tuple(first.get("loc", ())))
        details = [
            {"field": _field(tuple(p.get("loc", ()))), "reason": p["msg"], "allowed": _allowed(p)}
            for p in problems
        ]
        return error_response(
            422,
            "invalid_field",
            f"{field or 'body'}: {first['msg']}",
            field=field,
            allowed=_allowed(first),
            problems=json.loads(json.dumps(details, default=str)),
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed"}
        headers, message, extra = getattr(error, "headers", None), str(error.detail), {}
        if error.status_code == 405:
            methods = ", ".join(_methods_of(request))
            headers = {**(headers or {}), "Allow": methods}
            message = f"{request.method} is not a method of {request.url.path}"
            extra["allowed"] = methods
        return error_response(
            error.status_code,
            codes.get(error.status_code, "http_error"),
            message,
            headers=headers,
            **extra,
        )

    @app.exception_handler(ClientError)
    async def aws_error(request: Request, error: ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        if code not in BUSY_CODES:  # a refusal (AccessDenied) or a bug: retrying cannot help
            return await unexpected(request, error)
        reference = secrets.token_hex(6)
        logger.warning(
            "AWS busy on %s %s (ref %s): %s", request.method, request.url.path, reference, error
        )
        return error_response(
            503,
            "service_busy",
            f"a service the API depends on is busy; retry in a few seconds (ref {reference})",
            headers={"Retry-After": str(BUSY_RETRY_AFTER)},
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        # The reference ties what the client sees to the log line, which alone has the detail.
        reference = secrets.token_hex(6)
        logger.error(
            "unhandled error on %s %s (ref %s)",
            request.method,
            request.url.path,
            reference,
            exc_info=error,
        )
        return error_response(
            500,
            "internal_error",
            f"the service failed to answer this request; it has been logged (ref {reference})",
        )
