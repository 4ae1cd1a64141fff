"""`/v1/models`: start fine-tuning a personal model, and follow it to AVAILABLE."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Header, Response

from helpers.api import schemas
from helpers.api.dependencies import CurrentUser, JsonUser, Metadata, OwnedModel, Services
from helpers.api.errors import ApiError
from helpers.domain.records import ModelRecord, ModelStatus
from helpers.services import onboarding
from helpers.services.errors import OnboardingError

router = APIRouter(prefix="/models", tags=["models"])
logger = logging.getLogger(__name__)


@router.post(
    "",
    summary="Start fine-tuning a model",
    status_code=202,
    responses={
        409: {"model": schemas.ErrorResponse, "description": "Too few photos."},
        503: {
            "model": schemas.ErrorResponse,
            "description": "Fine-tuning could not start; the model is FAILED, ask again.",
        },
    },
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
    except OnboardingError as error:
        if error.field == "Idempotency-Key":
            raise ApiError(
                422, "idempotency_key_reused", str(error), error.field, error.allowed
            ) from None
        raise ApiError(409, "not_enough_photos", str(error), error.field, error.allowed) from None
    if created:
        start(services, model)
    else:
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/v1/models/{model.model_id}"
    return model_info(metadata.get_model(user.user_id, model.model_id) or model)


def start(services, model: ModelRecord) -> None:
    """Start driving a just-created model; if that fails, the model is FAILED, not left
    REQUESTED for ever (a retry with the same Idempotency-Key then answers that FAILED model)."""
    try:
        services.onboarding.start(model)
    except Exception:
        logger.exception("onboarding could not start %s/%s", model.user_id, model.model_id)
        services.metadata.update_model(
            model.user_id,
            model.model_id,
            expected_version=model.version,
            status=ModelStatus.FAILED,
            failure_reason="fine-tuning could not start; ask for a new model",
        )
        raise ApiError(
            503,
            "onboarding_unavailable",
            f"fine-tuning of model {model.model_id} could not start; it is marked FAILED: "
            "request a new model (with a new Idempotency-Key) in a moment",
            headers={"Retry-After": "30"},
        ) from None


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
