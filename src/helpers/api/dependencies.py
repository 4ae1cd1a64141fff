"""The API's dependencies, as the `Annotated` aliases routes declare: the services, who is
calling, their rate limits, the body's type, and the caller's models.

Everything reaches the services through `get_services`, so one override swaps them all (a test:
`app.dependency_overrides[get_services] = lambda: other_services`). Ownership lives here too:
a route that names a model takes `OwnedModel` (or `CheckedGeneration`) and so never sees
another user's model.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from limits import parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from helpers.api import schemas
from helpers.api.auth import key_matches, key_user
from helpers.api.errors import ApiError
from helpers.domain.records import ModelRecord, ModelStatus, UserRecord
from helpers.ports.metadata import MetadataStore
from helpers.ports.store import ArtifactStore

if TYPE_CHECKING:
    from helpers.api.generation import EndpointGenerator
    from helpers.ports.onboarding import Onboarding
    from helpers.settings import Settings


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
    onboarding: Onboarding
    generator: EndpointGenerator
    admin_key_hash: str
    rate_limit: str = "120/minute"
    generation_rate_limit: str = "30/minute"


class RateLimits:
    """Per-key limits in this process (`limits` syntax, e.g. "120/minute"), one per bucket.

    On AWS each Lambda instance keeps its own; API Gateway's stage throttling is the global one.
    """

    def __init__(self, **buckets: str) -> None:
        self.limiter = MovingWindowRateLimiter(MemoryStorage())
        self.buckets = {name: parse(text) for name, text in buckets.items()}

    def hit(self, bucket: str, who: str) -> None:
        """Count one request of `who`; raise a 429 `ApiError` with Retry-After when over."""
        limit = self.buckets[bucket]
        if self.limiter.hit(limit, bucket, who):
            return
        reset = self.limiter.get_window_stats(limit, bucket, who).reset_time
        wait = max(1, int(reset - time.time()) + 1)
        raise ApiError(
            429,
            "rate_limited",
            f"too many requests for this key ({limit}); retry in {wait} s",
            headers={"Retry-After": str(wait)},
        )


# ---------------------------------------------------------------------------- services


def get_services(request: Request) -> ApiServices:
    """The app's services (`create_app` keeps them); the one place routes get them from."""
    return request.app.state.services


Services = Annotated[ApiServices, Depends(get_services)]


def get_store(services: Services) -> ArtifactStore:
    return services.store


Store = Annotated[ArtifactStore, Depends(get_store)]


def get_metadata(services: Services) -> MetadataStore:
    return services.metadata


Metadata = Annotated[MetadataStore, Depends(get_metadata)]


def get_rate_limits(request: Request) -> RateLimits:
    """The app's counters: they outlive a request, so `create_app` makes them once."""
    return request.app.state.rate_limits


Limits = Annotated[RateLimits, Depends(get_rate_limits)]


# ---------------------------------------------------------------------------- the caller

bearer = HTTPBearer(auto_error=False, description="Your API key (or the admin key).")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def _unauthorized(message: str) -> ApiError:
    return ApiError(
        401, "unauthorized", message, field="Authorization", headers={"WWW-Authenticate": "Bearer"}
    )


def presented_key(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise _unauthorized("send your API key as 'Authorization: Bearer <key>'")
    return credentials.credentials


def current_user(services: Services, limits: Limits, credentials: Credentials) -> UserRecord:
    """The caller, from their key; 401 for a missing or wrong key, 429 over their rate."""
    key = presented_key(credentials)
    user_id = key_user(key)
    user = services.metadata.get_user(user_id) if user_id else None
    if not key_matches(key, user.api_key_hash if user else None):
        raise _unauthorized("the API key is not valid")
    limits.hit("all", user.user_id)
    return user


def require_admin(services: Services, credentials: Credentials) -> None:
    if not key_matches(presented_key(credentials), services.admin_key_hash):
        raise ApiError(
            403, "forbidden", "creating users needs the operator's admin key", "Authorization"
        )


def require_json(content_type: Annotated[str | None, Header()] = None) -> None:
    if not (content_type or "").lower().startswith("application/json"):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"this route takes a JSON body, got Content-Type {content_type!r}",
            field="Content-Type",
            allowed="application/json",
        )


CurrentUser = Annotated[UserRecord, Depends(current_user)]


def current_user_sending_json(
    user: CurrentUser, _: Annotated[None, Depends(require_json)]
) -> UserRecord:
    """The caller of a route with a JSON body: who they are is checked first, then the body."""
    return user


JsonUser = Annotated[UserRecord, Depends(current_user_sending_json)]


# ---------------------------------------------------------------------------- the caller's models


def find_model(metadata: MetadataStore, user: UserRecord, model_id: str) -> ModelRecord:
    """`user`'s model `model_id`; another user's model is "not found", like a missing one."""
    model = metadata.get_model(user.user_id, model_id) if _valid_id(model_id) else None
    if model is None:
        raise ApiError(404, "model_not_found", f"you have no model {model_id!r}", field="model_id")
    return model


def owned_model(user: CurrentUser, metadata: Metadata, model_id: str) -> ModelRecord:
    return find_model(metadata, user, model_id)


#: The model the path's `{model_id}` names, when the caller owns it.
OwnedModel = Annotated[ModelRecord, Depends(owned_model)]


@dataclass(frozen=True)
class GenerationJob:
    """A generation request with the model it runs on (the caller's, AVAILABLE).

    One dependency gives both: FastAPI validates a body once per dependency that declares it,
    so two would report each invalid field twice.
    """

    request: schemas.GenerateRequest
    model: ModelRecord


def generation_job(
    user: JsonUser, limits: Limits, metadata: Metadata, body: schemas.GenerateRequest
) -> GenerationJob:
    """Count the request against the caller's generation rate, check what the body's fields
    allow together, then pick the model."""
    limits.hit("generate", user.user_id)
    if body.response_format == "png" and body.num_images != 1:
        raise ApiError(
            422,
            "invalid_field",
            "response_format 'png' returns one image; use 'json' for several",
            field="num_images",
            allowed="1 with response_format 'png', 1-4 with 'json'",
        )
    return GenerationJob(body, _generation_model(metadata, user, body.model_id))


CheckedGeneration = Annotated[GenerationJob, Depends(generation_job)]


def _valid_id(value: str) -> bool:
    return re.fullmatch(schemas.USER_ID.strip("^$"), value) is not None


def _generation_model(
    metadata: MetadataStore, user: UserRecord, model_id: str | None
) -> ModelRecord:
    if model_id is not None:
        model = find_model(metadata, user, model_id)
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
