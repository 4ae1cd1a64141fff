"""Every error the API returns is JSON of one shape, `{"error": {code, message, field, allowed}}`:
what went wrong, which field, and what is allowed. No traceback ever reaches a client."""

from __future__ import annotations

import json
import logging

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


def _allowed(problem: dict) -> str | None:
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
        return error_response(
            error.status_code,
            codes.get(error.status_code, "http_error"),
            str(error.detail),
            headers=getattr(error, "headers", None),
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(
            500, "internal_error", "the service failed to answer this request; it has been logged"
        )
