"""`/v1/users`: the admin creates a user (and their key); a user reads or deletes their own."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from helpers.api import schemas
from helpers.api.auth import hash_key, new_key
from helpers.api.dependencies import CurrentUser, Services, require_admin, require_json
from helpers.api.errors import ApiError
from helpers.domain.records import UserRecord
from helpers.ports.metadata import AlreadyExists
from helpers.services import onboarding, photos

router = APIRouter(prefix="/users", tags=["users"])


@router.post(
    "",
    summary="Create a user (admin)",
    status_code=201,
    dependencies=[Depends(require_admin), Depends(require_json)],
    responses={409: {"model": schemas.ErrorResponse}},
)
def create_user(body: schemas.CreateUser, services: Services) -> schemas.CreatedUser:
    """Create a user and return their API key. The key is shown this once."""
    key = new_key(body.user_id)
    record = UserRecord(body.user_id, api_key_hash=hash_key(key), display_name=body.display_name)
    try:
        services.metadata.put_user(record)
    except AlreadyExists:
        raise ApiError(
            409, "user_exists", f"user {body.user_id!r} exists", field="user_id"
        ) from None
    return schemas.CreatedUser(user_id=record.user_id, api_key=key, created_at=record.created_at)


@router.get("/me", summary="Your account")
def get_me(user: CurrentUser, services: Services) -> schemas.UserInfo:
    return schemas.UserInfo(
        user_id=user.user_id,
        display_name=user.display_name,
        created_at=user.created_at,
        photos=len(photos.list_photos(services.store, services.settings, user.user_id)),
        models=len(services.metadata.list_models(user.user_id)),
    )


@router.delete("/me", status_code=204, summary="Delete your account")
def delete_me(user: CurrentUser, services: Services) -> Response:
    """Delete your account: photos, models, endpoint archives and records."""
    onboarding.delete_user_data(
        services.store, services.metadata, services.onboarding, services.settings, user.user_id
    )
    return Response(status_code=204)
