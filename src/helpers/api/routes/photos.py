"""`/v1/photos`: a user's photos of their subject, uploaded here or through presigned URLs."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, File, UploadFile

from helpers.api import schemas
from helpers.api.dependencies import CurrentUser, JsonUser, Services
from helpers.api.errors import ApiError
from helpers.domain.paths import uploads_prefix
from helpers.ports.store import PresignNotSupported
from helpers.services import photos
from helpers.services.errors import OnboardingError

PRESIGNED_SECONDS = 900

router = APIRouter(prefix="/photos", tags=["photos"])


@router.post(
    "",
    summary="Upload photos",
    status_code=201,
    responses={413: {"model": schemas.ErrorResponse}},
)
async def upload_photos(
    user: CurrentUser,
    files: Annotated[list[UploadFile], File(description="1-10 PNG, JPEG or WEBP photos")],
    services: Services,
) -> schemas.PhotoList:
    """Upload photos of your subject (multipart, field `files`). All are checked; a bad
    one refuses the whole upload and nothing is stored."""
    items = [(file.filename or f"file{i}", await file.read()) for i, file in enumerate(files)]
    try:
        added = photos.add_photos(services.store, services.settings, user.user_id, items)
    except OnboardingError as error:
        raise ApiError(409, "too_many_photos", str(error), error.field, error.allowed) from None
    return schemas.PhotoList(photos=[schemas.Photo(name=p.name) for p in added], count=len(added))


@router.get("", summary="List your photos")
def list_photos(user: CurrentUser, services: Services) -> schemas.PhotoList:
    stored = photos.list_photos(services.store, services.settings, user.user_id)
    return schemas.PhotoList(photos=[schemas.Photo(name=p.name) for p in stored], count=len(stored))


@router.post(
    "/upload-urls",
    summary="Presigned upload URLs",
    responses={501: {"model": schemas.ErrorResponse}},
)
def upload_urls(
    user: JsonUser, body: schemas.UploadUrlsRequest, services: Services
) -> schemas.UploadUrls:
    """Presigned S3 PUT URLs for large photos (sagemaker backend). The files are checked
    when fine-tuning starts."""
    prefix = uploads_prefix(services.settings.bucket, user.user_id)
    try:
        urls = [
            services.store.presign(f"{prefix}{uuid.uuid4().hex}", "put_object", PRESIGNED_SECONDS)
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
