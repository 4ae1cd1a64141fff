"""`/v1/models`: start fine-tuning a personal model, and follow it to AVAILABLE."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Header, Response

from helpers.api import schemas
from helpers.api.dependencies import (
    CurrentUser,
    JsonUser,
    Limits,
    Metadata,
    OwnedModel,
    Services,
)
from helpers.api.errors import ApiError
from helpers.domain import failures
from helpers.domain.records import ModelRecord, ModelStatus
from helpers.ports.metadata import NotFound
from helpers.services import onboarding
from helpers.services.errors import OnboardingError

router = APIRouter(prefix="/models", tags=["models"])
logger = logging.getLogger(__name__)


@router.post(
    "",
    summary="Start fine-tuning a model",
    status_code=202,
    responses={
        409: {
            "model": schemas.ErrorResponse,
            "description": "Too few photos, or too many uploads pending.",
        },
        429: {
            "model": schemas.ErrorResponse,
            "description": "Too many models in flight, or today's training steps are used.",
        },
        503: {
            "model": schemas.ErrorResponse,
            "description": "Fine-tuning could not start (the model is FAILED, ask again), or "
            "the service's training capacity is full; see Retry-After.",
        },
    },
)
def fine_tune(
    user: JsonUser,
    response: Response,
    services: Services,
    limits: Limits,
    body: schemas.FineTuneRequest | None = None,
    idempotency_key: Annotated[str | None, Header(max_length=128)] = None,
) -> schemas.ModelInfo:
    """Start fine-tuning a new model on your photos. Send an `Idempotency-Key` header to
    make retries safe: the same key returns the same model. Each tenant has at most
    `models_in_flight` models in flight and `training_steps_per_day` steps a day (429)."""
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
            admit=limits.training_admission(metadata, user.user_id),
        )
    except OnboardingError as error:
        # The field at fault says which refusal it is: too few photos, too many uploads, a
        # reused key.
        status, code = {
            "photos": (409, "not_enough_photos"),
            "uploads": (409, "too_many_photos"),
            "Idempotency-Key": (422, "idempotency_key_reused"),
        }.get(error.field or "", (409, "onboarding_refused"))
        raise ApiError(status, code, str(error), error.field, error.allowed) from None
    except NotFound:  # the account's deletion began after this request was let in
        raise ApiError(
            409,
            "account_being_deleted",
            "your account is being deleted; send DELETE /v1/users/me to finish the deletion",
            allowed="DELETE /v1/users/me",
        ) from None
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
    except Exception as error:
        reference = failures.new_reference()
        logger.exception(
            "onboarding could not start %s/%s (ref %s)", model.user_id, model.model_id, reference
        )
        services.metadata.update_model(
            model.user_id,
            model.model_id,
            expected_version=model.version,
            status=ModelStatus.FAILED,
            failure_reason=failures.user_reason(failures.NOT_STARTED, reference),
            params={
                **model.params,
                failures.FAILURE_PARAM: {
                    "reference": reference,
                    "detail": f"{type(error).__name__}: {error}"[:1000],
                },
            },
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
        failure_reason=failures.public_reason(model.failure_reason),
        max_train_steps=steps,
    )
