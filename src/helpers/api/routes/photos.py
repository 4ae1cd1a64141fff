"""`/v1/photos`: a user's photos of their subject, uploaded here or with presigned POST forms,
listed and deleted, and the presigned uploads still pending.

`POST /v1/photos` reads its multipart body itself, only once the key is checked: a caller
without a valid key is refused before a byte of the body is read (FastAPI would parse, and
spool to disk, a declared `File` body before any dependency runs). Decoding runs in a worker
thread, so the event loop keeps serving other requests meanwhile.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from helpers.api import schemas
from helpers.api.dependencies import CurrentUser, JsonUser, Services
from helpers.api.errors import ApiError
from helpers.ports.store import PresignNotSupported
from helpers.services import photos
from helpers.services.errors import OnboardingError

PRESIGNED_SECONDS = 900
MAX_FILES = photos.UPLOAD_RULES.max_images
#: Text fields a multipart body may carry beside `files` (ignored); more is refused.
MAX_TEXT_FIELDS = 10
FILES_ALLOWED = f"1 to {MAX_FILES} PNG, JPEG or WEBP files in the multipart field 'files'"

#: The body `upload_photos` reads itself, documented as a declared `File` field would be.
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "minItems": 1,
                            "maxItems": MAX_FILES,
                            "description": f"1-{MAX_FILES} PNG, JPEG or WEBP photos",
                        }
                    },
                }
            }
        },
    }
}

router = APIRouter(prefix="/photos", tags=["photos"])


@router.post(
    "",
    summary="Upload photos",
    status_code=201,
    openapi_extra=UPLOAD_BODY,
    responses={409: {"model": schemas.ErrorResponse, "description": "Too many photos."}},
)
async def upload_photos(
    request: Request, user: CurrentUser, services: Services
) -> schemas.PhotoList:
    """Upload photos of your subject (multipart, field `files`). All are checked; a bad
    one refuses the whole upload and nothing is stored."""
    items = await read_files(request)
    try:
        added = await run_in_threadpool(
            photos.add_photos, services.store, services.settings, user.user_id, items
        )
    except OnboardingError as error:
        raise ApiError(409, "too_many_photos", str(error), error.field, error.allowed) from None
    return schemas.PhotoList(photos=[schemas.Photo(name=p.name) for p in added], count=len(added))


async def read_files(request: Request) -> list[tuple[str, bytes]]:
    """The `files` of the request's multipart body as `(name, bytes)`; a 415, 400 or 422
    `ApiError` naming what is wrong otherwise (a body over the limit raises `BodyTooLarge`)."""
    content_type = request.headers.get("content-type", "")
    if content_type.partition(";")[0].strip().lower() != "multipart/form-data":
        raise ApiError(
            415,
            "unsupported_media_type",
            f"this route takes a multipart/form-data body, got Content-Type {content_type!r}",
            field="Content-Type",
            allowed="multipart/form-data",
        )
    try:
        async with request.form(max_files=MAX_FILES, max_fields=MAX_TEXT_FIELDS) as form:
            entries = form.getlist("files")
            if not entries or not all(isinstance(entry, UploadFile) for entry in entries):
                raise ApiError(
                    422,
                    "invalid_field",
                    "files: send at least one photo, each as a file part named 'files'",
                    field="files",
                    allowed=FILES_ALLOWED,
                )
            return [
                (entry.filename or f"file{index}", await entry.read())
                for index, entry in enumerate(entries)
            ]
    except HTTPException as error:  # Starlette's answer to a body it cannot parse
        detail = str(error.detail)
        if detail.startswith("Too many files"):
            raise ApiError(
                422,
                "invalid_field",
                f"files: at most {MAX_FILES} photos per upload; send the rest in another",
                field="files",
                allowed=FILES_ALLOWED,
            ) from None
        raise ApiError(
            400,
            "malformed_multipart",
            f"the body is not valid multipart/form-data: {detail}",
            field="files",
            allowed=FILES_ALLOWED,
        ) from None


@router.get("", summary="List your photos")
def list_photos(user: CurrentUser, services: Services) -> schemas.PhotoList:
    stored = photos.list_photos(services.store, services.settings, user.user_id)
    return schemas.PhotoList(photos=[schemas.Photo(name=p.name) for p in stored], count=len(stored))


@router.post(
    "/upload-urls",
    summary="Presigned upload forms",
    responses={
        409: {
            "model": schemas.ErrorResponse,
            "description": "Too many photos, or no presigned uploads on the local backend.",
        },
    },
)
def upload_urls(
    user: JsonUser, body: schemas.UploadUrlsRequest, services: Services
) -> schemas.UploadUrls:
    """Presigned S3 POST forms for photos too large for this API (sagemaker backend). S3
    takes each file only with the requested Content-Type and up to `max_bytes`; the files
    are checked when fine-tuning starts. Stored photos and pending uploads together stay
    within the photo limit."""
    store, max_bytes = services.store, photos.UPLOAD_RULES.max_bytes
    try:
        uris = photos.reserve_uploads(store, services.settings, user.user_id, body.count)
        forms = [
            (uri, store.presign_post(uri, max_bytes, body.content_type, PRESIGNED_SECONDS))
            for uri in uris
        ]
    except OnboardingError as error:
        raise ApiError(409, "too_many_photos", str(error), error.field, error.allowed) from None
    except PresignNotSupported:  # a 4xx: the server works, this backend has no such thing
        raise ApiError(
            409,
            "presign_not_supported",
            "the local backend has no presigned uploads; upload with POST /v1/photos",
        ) from None
    return schemas.UploadUrls(
        uploads=[
            schemas.UploadUrl(id=uri.rsplit("/", 1)[-1], url=form.url, fields=form.fields)
            for uri, form in forms
        ],
        expires_in=PRESIGNED_SECONDS,
        max_bytes=max_bytes,
    )


@router.get("/uploads", summary="List your pending uploads")
def list_uploads(user: CurrentUser, services: Services) -> schemas.PendingUploadList:
    """Files posted with presigned forms and not yet checked (fine-tuning collects them)."""
    pending = photos.list_uploads(services.store, services.settings, user.user_id)
    return schemas.PendingUploadList(
        uploads=[schemas.PendingUpload(id=u.id, bytes=u.size) for u in pending],
        count=len(pending),
    )


@router.delete(
    "/uploads/{upload_id}",
    summary="Delete a pending upload",
    status_code=204,
    responses={404: {"model": schemas.ErrorResponse}},
)
def delete_upload(
    user: CurrentUser,
    services: Services,
    upload_id: Annotated[str, Path(description="As GET /v1/photos/uploads lists it.")],
) -> Response:
    if not photos.delete_upload(services.store, services.settings, user.user_id, upload_id):
        raise ApiError(
            404, "upload_not_found", f"you have no pending upload {upload_id!r}", "upload_id"
        )
    return Response(status_code=204)


@router.delete(
    "/{name}",
    summary="Delete a photo",
    status_code=204,
    responses={404: {"model": schemas.ErrorResponse}},
)
def delete_photo(
    user: CurrentUser,
    services: Services,
    name: Annotated[str, Path(description="As GET /v1/photos lists it.")],
) -> Response:
    """Delete one of your photos. Models already requested keep the photos they train on."""
    if not photos.delete_photo(services.store, services.settings, user.user_id, name):
        raise ApiError(404, "photo_not_found", f"you have no photo {name!r}", "name")
    return Response(status_code=204)
