"""`/v1/generations`: images from the caller's model on the multi-model endpoint."""

from __future__ import annotations

import base64

from fastapi import APIRouter, Response

from helpers.api import schemas
from helpers.api.dependencies import CheckedGeneration, Services
from helpers.api.errors import ApiError
from helpers.api.generation import GenerationError

router = APIRouter(prefix="/generations", tags=["generation"])


@router.post(
    "",
    summary="Generate images",
    responses={
        200: {"content": {"image/png": {}}, "description": "The image (response_format png)."},
        409: {"model": schemas.ErrorResponse, "description": "The model is not AVAILABLE."},
        503: {"model": schemas.ErrorResponse, "description": "Retry after Retry-After."},
    },
)
def generate(job: CheckedGeneration, services: Services):
    """Generate with your latest AVAILABLE model, or the one `model_id` names."""
    body, model = job.request, job.model
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
            schemas.GeneratedImage(png_base64=base64.b64encode(png).decode(), seed=body.seed + i)
            for i, png in enumerate(pngs)
        ],
    )
