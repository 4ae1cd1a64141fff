"""`/v1/generations`: images from the caller's model on the multi-model endpoint."""

from __future__ import annotations

import base64

from fastapi import APIRouter, Response

from helpers.api import schemas
from helpers.api.dependencies import CheckedGeneration, Services
from helpers.api.errors import ApiError
from helpers.api.generation import GenerationError, check_work
from helpers.backend import BACKENDS

router = APIRouter(prefix="/generations", tags=["generation"])


@router.post(
    "",
    summary="Generate images",
    responses={
        200: {
            "model": schemas.Generation,
            "content": {"image/png": {}},
            "description": "The image (response_format png), or base64 PNGs (json).",
        },
        404: {"model": schemas.ErrorResponse, "description": "You have no model `model_id`."},
        409: {"model": schemas.ErrorResponse, "description": "The model is not AVAILABLE."},
        422: {
            "model": schemas.ErrorResponse,
            "description": "A field is invalid, or the request is more work than the endpoint "
            "gives one request (`work_too_large`: pixels x steps x images).",
        },
        502: {"model": schemas.ErrorResponse, "description": "The endpoint refused the request."},
        503: {
            "model": schemas.ErrorResponse,
            "description": "The endpoint is busy, loading or restarting your model "
            "(`model_restarting`); retry after Retry-After.",
        },
        504: {
            "model": schemas.ErrorResponse,
            "description": "The endpoint stopped waiting for the images (`generation_timeout`).",
        },
    },
)
def generate(job: CheckedGeneration, services: Services):
    """Generate with your latest AVAILABLE model, or the one `model_id` names."""
    body, model = job.request, job.model
    check_work(body, BACKENDS[services.settings.backend].gpu_endpoint)
    try:
        pngs = services.generator.generate(
            model.endpoint_model_name, body.prompt, **body.parameters()
        )
    except GenerationError as error:
        headers = {"Retry-After": str(error.retry_after)} if error.retry_after else None
        raise ApiError(error.status, error.code, error.message, headers=headers) from None
    if body.response_format == "png":
        return Response(pngs[0], media_type="image/png", headers={"X-Model-Id": model.model_id})
    return schemas.Generation(
        model_id=model.model_id,
        images=[
            schemas.GeneratedImage(png_base64=base64.b64encode(png).decode(), seed=body.seed + i)
            for i, png in enumerate(pngs)
        ],
    )
