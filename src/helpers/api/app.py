"""The SaaS API: one FastAPI app for both backends (uvicorn locally, Lambda behind API Gateway).

Every route except `/health` needs `Authorization: Bearer <key>`. The key names its user; the
server maps the user to their models, so a client never names an endpoint model and never
reaches another user's photos or models (another user's model id is simply "not found").

How the seed's three routes map onto these:

| seed                | here                                                       |
|---------------------|------------------------------------------------------------|
| `POST /finetune`    | `POST /v1/photos` (upload), then `POST /v1/models` (202)   |
| `GET /model`        | `GET /v1/models/{model_id}` and `GET /v1/models`           |
| `POST /inference`   | `POST /v1/generations` (the caller's latest AVAILABLE model) |

This module only assembles the app (middleware, error handlers, routers): the routes live in
`helpers.api.routes`, one router per resource, and what they need (services, caller, owned
model) comes from the `Annotated` aliases of `helpers.api.dependencies`.
"""

from __future__ import annotations

from fastapi import FastAPI

from helpers.api import schemas
from helpers.api.dependencies import ApiServices
from helpers.api.errors import BodyTooLarge, install_error_docs, install_error_handlers, too_large
from helpers.api.routes import api_router

__all__ = ["ApiServices", "create_app"]

KiB, MiB = 1024, 1024 * 1024
#: Request bodies: JSON routes take little; photo uploads take up to 10 files of 10 MiB each
#: (API Gateway caps a request at 10 MB; on AWS, large photos go through presigned URLs).
MAX_JSON_BYTES = 64 * KiB
MAX_UPLOAD_BYTES = 60 * MiB
UPLOAD_PATHS = ("/v1/photos",)


class BodyLimit:
    """ASGI middleware: refuse bodies over the limit, declared or streamed, before a route
    reads them whole."""

    def __init__(self, app, max_bytes: int, upload_max_bytes: int, upload_paths) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.upload_max_bytes = upload_max_bytes
        self.upload_paths = tuple(upload_paths)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.upload_max_bytes if scope["path"] in self.upload_paths else self.max_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await too_large(limit)(scope, receive, send)
            return
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited_receive, send)


def create_app(services: ApiServices) -> FastAPI:
    """The API over `services`. Routes reach them through `dependencies.get_services`, which an
    `app.dependency_overrides` entry can replace."""
    app = FastAPI(
        title="Personalized text-to-image API",
        version="1.0.0",
        description=(
            "Onboard with a few photos, get a personal fine-tuned model, generate images. "
            "Authenticate with `Authorization: Bearer <api key>`."
        ),
        # The errors every route shares are added by `install_error_docs`, by what each has.
        responses={
            429: {
                "model": schemas.ErrorResponse,
                "description": "A rate limit or quota (`field` names it); see Retry-After.",
            },
        },
    )
    app.state.services = services
    app.add_middleware(
        BodyLimit,
        max_bytes=MAX_JSON_BYTES,
        upload_max_bytes=MAX_UPLOAD_BYTES,
        upload_paths=UPLOAD_PATHS,
    )
    install_error_handlers(app)
    install_error_docs(app)
    app.include_router(api_router)
    return app
