"""`/v1/models`: start fine-tuning a personal model, and follow it to AVAILABLE."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Response

from helpers.api import schemas
from helpers.api.dependencies import CurrentUser, JsonUser, Metadata, OwnedModel, Services
from helpers.api.errors import ApiError
from helpers.domain.records import ModelRecord
from helpers.services import onboarding

router = APIRouter(prefix="/models", tags=["models"])


@router.post(
    "",
    summary="Start fine-tuning a model",
    status_code=202,
    responses={409: {"model": schemas.ErrorResponse, "description": "Too few photos."}},
)
def fine_tune(
    user: JsonUser,
    response: Response,
    services: Services,
    body: schemas.FineTuneRequest | None = None,
    idempotency_key: Annotated[str | None, Header(max_length=128)] = None,
) -> schemas.ModelInfo:
    """Start fine-tuning a new model on your photos. Send an `Idempotency-Key` header to
    make retries safe: the same key returns the same model."""
    body = body or schemas.FineTuneRequest()
    metadata = services.metadata
    try:
        model, created = onboarding.request_model(
            metadata,
            services.store,
            services.settings,
            user.user_id,
            body.hyperparameters(),
            idempotency_key,
        )
    except onboarding.OnboardingError as error:
        if error.field == "Idempotency-Key":
            raise ApiError(
                422, "idempotency_key_reused", str(error), error.field, error.allowed
            ) from None
        raise ApiError(409, "not_enough_photos", str(error), error.field, error.allowed) from None
    if created:
        services.onboarding.start(model)
    else:
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/v1/models/{model.model_id}"
    return model_info(metadata.get_model(user.user_id, model.model_id) or model)


@router.get("", summary="List your models")
def list_models(user: CurrentUser, metadata: Metadata) -> schemas.ModelList:
    return schemas.ModelList(
        models=[model_info(model) for model in metadata.list_models(user.user_id)]
    )


@router.get(
    "/{model_id}",
    summary="A model's status",
    responses={404: {"model": schemas.ErrorResponse}},
)
def get_model(model: OwnedModel) -> schemas.ModelInfo:
    return model_info(model)


def model_info(model: ModelRecord) -> schemas.ModelInfo:
    steps = model.params.get("hyperparameters", {}).get("max_train_steps")
    return schemas.ModelInfo(
        model_id=model.model_id,
        status=model.status,
        created_at=model.created_at,
        updated_at=model.updated_at,
        failure_reason=model.failure_reason,
        max_train_steps=steps,
    )
