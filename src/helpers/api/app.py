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
"""

from __future__ import annotations

import base64
import re
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, FastAPI, File, Header, Response, UploadFile

from helpers.api import schemas
from helpers.api.auth import hash_key, new_key
from helpers.api.dependencies import JsonUser, RateLimits, User, require_admin, require_json
from helpers.api.errors import ApiError, BodyTooLarge, install_error_handlers, too_large
from helpers.api.generation import GenerationError
from helpers.domain.records import ModelRecord, ModelStatus, UserRecord
from helpers.ports.metadata import AlreadyExists
from helpers.ports.store import PresignNotSupported
from helpers.services import onboarding

if TYPE_CHECKING:
    from helpers.api.generation import EndpointGenerator
    from helpers.ports.metadata import MetadataStore
    from helpers.ports.store import ArtifactStore
    from helpers.settings import Settings

KiB, MiB = 1024, 1024 * 1024
#: Request bodies: JSON routes take little; photo uploads take up to 10 files of 10 MiB each
#: (API Gateway caps a request at 10 MB; on AWS, large photos go through presigned URLs).
MAX_JSON_BYTES = 64 * KiB
MAX_UPLOAD_BYTES = 60 * MiB
UPLOAD_PATHS = ("/v1/photos",)
PRESIGNED_SECONDS = 900


@dataclass
class ApiServices:
    """What the API talks to.

    Args:
        settings (`Settings`): bucket and backend.
        store (`ArtifactStore`), metadata (`MetadataStore`): photos, archives and records.
        onboarding (`Onboarding`): drives requested models (local threads or Step Functions).
        generator (`EndpointGenerator`): generation on the multi-model endpoint.
        admin_key_hash (`str`): `hash_key` of the operator's key, the one that creates users.
        rate_limit (`str`, defaults to `"120/minute"`): per key, every route.
        generation_rate_limit (`str`, defaults to `"30/minute"`): per key, generations.
    """

    settings: Settings
    store: ArtifactStore
    metadata: MetadataStore
    onboarding: onboarding.Onboarding
    generator: EndpointGenerator
    admin_key_hash: str
    rate_limit: str = "120/minute"
    generation_rate_limit: str = "30/minute"


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
    """The API over `services`."""
    app = FastAPI(
        title="Personalized text-to-image API",
        version="1.0.0",
        description=(
            "Onboard with a few photos, get a personal fine-tuned model, generate images. "
            "Authenticate with `Authorization: Bearer <api key>`."
        ),
        responses={
            401: {"model": schemas.ErrorResponse, "description": "Missing or wrong API key."},
            422: {"model": schemas.ErrorResponse, "description": "A field is invalid."},
            429: {"model": schemas.ErrorResponse, "description": "Rate limit; see Retry-After."},
        },
    )
    app.state.services = services
    app.state.rate_limits = RateLimits(
        all=services.rate_limit, generate=services.generation_rate_limit
    )
    app.add_middleware(
        BodyLimit,
        max_bytes=MAX_JSON_BYTES,
        upload_max_bytes=MAX_UPLOAD_BYTES,
        upload_paths=UPLOAD_PATHS,
    )
    install_error_handlers(app)
    settings, store, metadata = services.settings, services.store, services.metadata

    def own_model(user: UserRecord, model_id: str) -> ModelRecord:
        model = metadata.get_model(user.user_id, model_id) if _valid_id(model_id) else None
        if model is None:
            raise ApiError(
                404, "model_not_found", f"you have no model {model_id!r}", field="model_id"
            )
        return model

    # ---------------------------------------------------------------- health and users

    @app.get("/health", tags=["service"])
    def health() -> schemas.Health:
        return schemas.Health(backend=settings.backend)

    @app.post(
        "/v1/users",
        summary="Create a user (admin)",
        status_code=201,
        tags=["users"],
        dependencies=[Depends(require_admin), Depends(require_json)],
        responses={409: {"model": schemas.ErrorResponse}},
    )
    def create_user(body: schemas.CreateUser) -> schemas.CreatedUser:
        """Create a user and return their API key. The key is shown this once."""
        key = new_key(body.user_id)
        record = UserRecord(
            body.user_id, api_key_hash=hash_key(key), display_name=body.display_name
        )
        try:
            metadata.put_user(record)
        except AlreadyExists:
            raise ApiError(
                409, "user_exists", f"user {body.user_id!r} exists", field="user_id"
            ) from None
        return schemas.CreatedUser(
            user_id=record.user_id, api_key=key, created_at=record.created_at
        )

    @app.get("/v1/users/me", tags=["users"], summary="Your account")
    def get_me(user: User) -> schemas.UserInfo:
        return schemas.UserInfo(
            user_id=user.user_id,
            display_name=user.display_name,
            created_at=user.created_at,
            photos=len(onboarding.list_photos(store, settings, user.user_id)),
            models=len(metadata.list_models(user.user_id)),
        )

    @app.delete("/v1/users/me", status_code=204, tags=["users"], summary="Delete your account")
    def delete_me(user: User) -> Response:
        """Delete your account: photos, models, endpoint archives and records."""
        onboarding.delete_user_data(store, metadata, services.onboarding, settings, user.user_id)
        return Response(status_code=204)

    # ---------------------------------------------------------------- photos

    @app.post(
        "/v1/photos",
        summary="Upload photos",
        status_code=201,
        tags=["photos"],
        responses={413: {"model": schemas.ErrorResponse}},
    )
    async def upload_photos(
        user: User,
        files: Annotated[list[UploadFile], File(description="1-10 PNG, JPEG or WEBP photos")],
    ) -> schemas.PhotoList:
        """Upload photos of your subject (multipart, field `files`). All are checked; a bad
        one refuses the whole upload and nothing is stored."""
        items = [(file.filename or f"file{i}", await file.read()) for i, file in enumerate(files)]
        try:
            added = onboarding.add_photos(store, settings, user.user_id, items)
        except onboarding.OnboardingError as error:
            raise ApiError(409, "too_many_photos", str(error), error.field, error.allowed) from None
        return schemas.PhotoList(
            photos=[schemas.Photo(name=p.name) for p in added], count=len(added)
        )

    @app.get("/v1/photos", tags=["photos"], summary="List your photos")
    def list_photos(user: User) -> schemas.PhotoList:
        photos = onboarding.list_photos(store, settings, user.user_id)
        return schemas.PhotoList(
            photos=[schemas.Photo(name=p.name) for p in photos], count=len(photos)
        )

    @app.post(
        "/v1/photos/upload-urls",
        summary="Presigned upload URLs",
        tags=["photos"],
        responses={501: {"model": schemas.ErrorResponse}},
    )
    def upload_urls(user: JsonUser, body: schemas.UploadUrlsRequest) -> schemas.UploadUrls:
        """Presigned S3 PUT URLs for large photos (sagemaker backend). The files are checked
        when fine-tuning starts."""
        prefix = onboarding.uploads_prefix(settings, user.user_id)
        try:
            urls = [
                store.presign(f"{prefix}{uuid.uuid4().hex}", "put_object", PRESIGNED_SECONDS)
                for _ in range(body.count)
            ]
        except PresignNotSupported:
            raise ApiError(
                501,
                "presign_not_supported",
                "the local backend has no presigned URLs; upload with POST /v1/photos",
            ) from None
        return schemas.UploadUrls(
            uploads=[schemas.UploadUrl(url=url) for url in urls], expires_in=PRESIGNED_SECONDS
        )

    # ---------------------------------------------------------------- models

    @app.post(
        "/v1/models",
        summary="Start fine-tuning a model",
        status_code=202,
        tags=["models"],
        responses={409: {"model": schemas.ErrorResponse, "description": "Too few photos."}},
    )
    def fine_tune(
        user: JsonUser,
        response: Response,
        body: schemas.FineTuneRequest | None = None,
        idempotency_key: Annotated[str | None, Header(max_length=128)] = None,
    ) -> schemas.ModelInfo:
        """Start fine-tuning a new model on your photos. Send an `Idempotency-Key` header to
        make retries safe: the same key returns the same model."""
        body = body or schemas.FineTuneRequest()
        try:
            model, created = onboarding.request_model(
                metadata, store, settings, user.user_id, body.hyperparameters(), idempotency_key
            )
        except onboarding.OnboardingError as error:
            if error.field == "Idempotency-Key":
                raise ApiError(
                    422, "idempotency_key_reused", str(error), error.field, error.allowed
                ) from None
            raise ApiError(
                409, "not_enough_photos", str(error), error.field, error.allowed
            ) from None
        if created:
            services.onboarding.start(model)
        else:
            response.headers["Idempotent-Replayed"] = "true"
        response.headers["Location"] = f"/v1/models/{model.model_id}"
        return _model_info(metadata.get_model(user.user_id, model.model_id) or model)

    @app.get("/v1/models", tags=["models"], summary="List your models")
    def list_models(user: User) -> schemas.ModelList:
        return schemas.ModelList(
            models=[_model_info(model) for model in metadata.list_models(user.user_id)]
        )

    @app.get(
        "/v1/models/{model_id}",
        tags=["models"],
        summary="A model's status",
        responses={404: {"model": schemas.ErrorResponse}},
    )
    def get_model(user: User, model_id: str) -> schemas.ModelInfo:
        return _model_info(own_model(user, model_id))

    # ---------------------------------------------------------------- generation

    @app.post(
        "/v1/generations",
        summary="Generate images",
        tags=["generation"],
        responses={
            200: {"content": {"image/png": {}}, "description": "The image (response_format png)."},
            409: {"model": schemas.ErrorResponse, "description": "The model is not AVAILABLE."},
            503: {"model": schemas.ErrorResponse, "description": "Retry after Retry-After."},
        },
    )
    def generate(user: JsonUser, body: schemas.GenerateRequest):
        """Generate with your latest AVAILABLE model, or the one `model_id` names."""
        app.state.rate_limits.hit("generate", user.user_id)
        if body.response_format == "png" and body.num_images != 1:
            raise ApiError(
                422,
                "invalid_field",
                "response_format 'png' returns one image; use 'json' for several",
                field="num_images",
                allowed="1 with response_format 'png', 1-4 with 'json'",
            )
        model = _generation_model(metadata, user, body.model_id, own_model)
        try:
            pngs = services.generator.generate(
                model.endpoint_model_name, body.prompt, **body.parameters()
            )
        except GenerationError as error:
            status = 503 if error.retry_after else 502
            headers = {"Retry-After": str(error.retry_after)} if error.retry_after else None
            raise ApiError(status, error.code, error.message, headers=headers) from None
        if body.response_format == "png":
            return Response(pngs[0], media_type="image/png", headers={"X-Model-Id": model.model_id})
        return schemas.Generation(
            model_id=model.model_id,
            images=[
                schemas.GeneratedImage(
                    png_base64=base64.b64encode(png).decode(), seed=body.seed + i
                )
                for i, png in enumerate(pngs)
            ],
        )

    return app


def _valid_id(value: str) -> bool:
    return re.fullmatch(schemas.USER_ID.strip("^$"), value) is not None


def _model_info(model: ModelRecord) -> schemas.ModelInfo:
    steps = model.params.get("hyperparameters", {}).get("max_train_steps")
    return schemas.ModelInfo(
        model_id=model.model_id,
        status=model.status,
        created_at=model.created_at,
        updated_at=model.updated_at,
        failure_reason=model.failure_reason,
        max_train_steps=steps,
    )


def _generation_model(metadata, user: UserRecord, model_id: str | None, own_model) -> ModelRecord:
    if model_id is not None:
        model = own_model(user, model_id)
        if model.status != ModelStatus.AVAILABLE:
            reason = f" ({model.failure_reason})" if model.failure_reason else ""
            raise ApiError(
                409,
                "model_not_available",
                f"model {model_id!r} is {model.status.value}{reason}; "
                "generate once it is AVAILABLE",
                field="model_id",
                allowed="a model whose status is AVAILABLE",
            )
        return model
    models = metadata.list_models(user.user_id)
    available = [m for m in models if m.status == ModelStatus.AVAILABLE]
    if not available:
        statuses = ", ".join(f"{m.model_id}: {m.status.value}" for m in models) or "none"
        raise ApiError(
            409,
            "no_available_model",
            f"you have no AVAILABLE model yet (your models: {statuses}); "
            "start one with POST /v1/models",
        )
    return max(available, key=lambda m: (m.created_at, m.model_id))
