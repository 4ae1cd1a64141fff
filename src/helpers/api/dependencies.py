"""The API's dependencies, as the `Annotated` aliases routes declare: the services, who is
calling, their quotas (`helpers.api.quotas`), the body's type, and the caller's models.

Everything reaches the services through `get_services`, so one override swaps them all (a test:
`app.dependency_overrides[get_services] = lambda: other_services`). Ownership lives here too:
a route that names a model takes `OwnedModel` (or `CheckedGeneration`) and so never sees
another user's model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from helpers.api import schemas
from helpers.api.auth import key_matches, key_user
from helpers.api.errors import ApiError
from helpers.api.quotas import QuotaLimits, Quotas
from helpers.domain.failures import public_reason
from helpers.domain.records import ModelRecord, ModelStatus, UserRecord
from helpers.ports.metadata import MetadataStore
from helpers.ports.store import ArtifactStore

if TYPE_CHECKING:
    from helpers.api.generation import EndpointGenerator
    from helpers.ports.endpoint import Endpoint
    from helpers.ports.jobs import TrainingJobs
    from helpers.ports.onboarding import Onboarding
    from helpers.ports.quotas import QuotaCounters
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
        limits (`QuotaLimits`, defaults to `QuotaLimits()`): what tenants, anonymous addresses
            and the admin may use.
        counters (`QuotaCounters`, *optional*): where uses are counted; by default the
            backend's shared counters (`helpers.backend.Backend.quotas`), never this process's.
        jobs (`TrainingJobs`, *optional*), endpoint (`Endpoint`, *optional*): whose leftovers
            of a deleted user (job folders, loaded models) go with the user, where they exist.
    """

    settings: Settings
    store: ArtifactStore
    metadata: MetadataStore
    onboarding: Onboarding
    generator: EndpointGenerator
    admin_key_hash: str
    limits: QuotaLimits = field(default_factory=QuotaLimits)
    counters: QuotaCounters | None = None
    jobs: TrainingJobs | None = None
    endpoint: Endpoint | None = None

    def __post_init__(self) -> None:
        if self.counters is None:
            from helpers.backend import open_backend

            self.counters = open_backend(self.settings).quotas


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


def get_quotas(services: Services) -> Quotas:
    """The quotas over the services' shared counters (the counts live there, not here)."""
    return Quotas(services.counters, services.limits)


Limits = Annotated[Quotas, Depends(get_quotas)]


def client_address(request: Request) -> str:
    """The caller's address: the socket's peer locally, API Gateway's `sourceIp` in Lambda
    (never `X-Forwarded-For`, which a client writes itself)."""
    return request.client.host if request.client and request.client.host else "unknown"


def limit_anonymous(request: Request, limits: Limits) -> None:
    """Count a request that carries no valid key against its address (`/health`)."""
    limits.anonymous(client_address(request))


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


def _presented_or_counted(
    request: Request, limits: Limits, credentials: HTTPAuthorizationCredentials | None
) -> str:
    """The presented key; a missing or malformed one counts against the address, then 401."""
    try:
        return presented_key(credentials)
    except ApiError:
        limits.anonymous(client_address(request))
        raise


def account_holder(
    request: Request, services: Services, limits: Limits, credentials: Credentials
) -> UserRecord:
    """The caller, from their key; 401 for a missing or wrong key, 429 over their rate. A
    failed authentication counts against the caller's address, which slows key guessing."""
    key = _presented_or_counted(request, limits, credentials)
    user_id = key_user(key)
    user = services.metadata.get_user(user_id) if user_id else None
    if not key_matches(key, user.api_key_hash if user else None):
        limits.anonymous(client_address(request))
        raise _unauthorized("the API key is not valid")
    limits.request(user.user_id)
    return user


def require_admin(
    request: Request, services: Services, limits: Limits, credentials: Credentials
) -> None:
    """The admin key, or 403 (counted against the caller's address); 429 over the admin rate."""
    key = _presented_or_counted(request, limits, credentials)
    if not key_matches(key, services.admin_key_hash):
        limits.anonymous(client_address(request))
        raise ApiError(
            403, "forbidden", "creating users needs the operator's admin key", "Authorization"
        )
    limits.admin()


def require_json(request: Request) -> None:
    """415 unless the body is JSON. A request without a body passes: the route's schema says
    whether it needs one. (The header is read here, not declared: OpenAPI describes the
    Content-Type by the request body's media types, not as a parameter.)"""
    content_type = request.headers.get("content-type")
    sent_body = "transfer-encoding" in request.headers or request.headers.get(
        "content-length", "0"
    ) not in ("", "0")
    if content_type is None and not sent_body:
        return
    if not (content_type or "").lower().startswith("application/json"):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"this route takes a JSON body, got Content-Type {content_type!r}",
            field="Content-Type",
            allowed="application/json",
        )


#: The caller, even while their account is being deleted (to finish the deletion).
AccountHolder = Annotated[UserRecord, Depends(account_holder)]


def current_user(user: AccountHolder) -> UserRecord:
    """The caller; 409 while their account is being deleted (nothing new starts for it)."""
    if user.deleting_since is not None:
        raise ApiError(
            409,
            "account_being_deleted",
            "your account is being deleted; send DELETE /v1/users/me to finish the deletion",
            allowed="DELETE /v1/users/me",
        )
    return user


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
    allow together, pick the model, then count its images against the caller's day."""
    limits.generation(user.user_id)
    if body.response_format == "png" and body.num_images != 1:
        raise ApiError(
            422,
            "invalid_field",
            "response_format 'png' returns one image; use 'json' for several",
            field="num_images",
            allowed="1 with response_format 'png', 1-4 with 'json'",
        )
    model = _generation_model(metadata, user, body.model_id)
    limits.images(user.user_id, body.num_images)
    return GenerationJob(body, model)


CheckedGeneration = Annotated[GenerationJob, Depends(generation_job)]


def _valid_id(value: str) -> bool:
    return re.fullmatch(schemas.USER_ID.strip("^$"), value) is not None


def _generation_model(
    metadata: MetadataStore, user: UserRecord, model_id: str | None
) -> ModelRecord:
    if model_id is not None:
        model = find_model(metadata, user, model_id)
        if model.status != ModelStatus.AVAILABLE:
            reason = f" ({public_reason(model.failure_reason)})" if model.failure_reason else ""
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
