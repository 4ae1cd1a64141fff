"""`/v1/users`: the admin creates a user (and their key); a user reads their account, rotates
their key, or deletes the account."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Response

from helpers.api import schemas
from helpers.api.auth import hash_key, new_key
from helpers.api.dependencies import (
    AccountHolder,
    CurrentUser,
    Services,
    require_admin,
    require_json,
)
from helpers.api.errors import ApiError
from helpers.domain.records import UserRecord
from helpers.ports.metadata import AlreadyExists, NotFound, UserIdRetired, VersionConflict
from helpers.services import onboarding, photos

router = APIRouter(prefix="/users", tags=["users"])
logger = logging.getLogger(__name__)


@router.post(
    "",
    summary="Create a user (admin)",
    status_code=201,
    dependencies=[Depends(require_admin), Depends(require_json)],
    responses={
        403: {"model": schemas.ErrorResponse, "description": "Not the admin key."},
        409: {
            "model": schemas.ErrorResponse,
            "description": "The user id is taken, or belonged to a deleted account.",
        },
    },
)
def create_user(body: schemas.CreateUser, services: Services) -> schemas.CreatedUser:
    """Create a user and return their API key. The key is shown this once."""
    key = new_key(body.user_id)
    record = UserRecord(body.user_id, api_key_hash=hash_key(key), display_name=body.display_name)
    try:
        services.metadata.put_user(record)
    except UserIdRetired:
        raise ApiError(
            409,
            "user_id_retired",
            f"user id {body.user_id!r} belonged to a deleted account and cannot be reused "
            "(its models' names would be too); choose another",
            field="user_id",
            allowed="an id never used before",
        ) from None
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


@router.post(
    "/me/keys",
    status_code=201,
    summary="Rotate your API key",
    responses={
        409: {
            "model": schemas.ErrorResponse,
            "description": "The account changed while the key was rotated; try again.",
        }
    },
)
def rotate_key(user: CurrentUser, services: Services) -> schemas.NewApiKey:
    """Make a new API key and revoke the one this request used, at once. The new key is
    shown this once."""
    key = new_key(user.user_id)
    try:
        # Versioned: of two rotations at once, one wins and the other's key never works.
        updated = services.metadata.update_user(
            user.user_id, expected_version=user.version, api_key_hash=hash_key(key)
        )
    except (VersionConflict, NotFound):
        raise ApiError(
            409,
            "account_changed",
            "your account changed while the key was rotated (another rotation, say); "
            "nothing was changed by this request: send it again with your current key",
        ) from None
    return schemas.NewApiKey(user_id=user.user_id, api_key=key, created_at=updated.updated_at)


@router.delete(
    "/me",
    status_code=204,
    summary="Delete your account",
    responses={
        503: {
            "model": schemas.ErrorResponse,
            "description": "The deletion stopped partway; send the request again to finish.",
        }
    },
)
def delete_me(user: AccountHolder, services: Services) -> Response:
    """Delete your account: photos, models, training jobs, endpoint copies and records. The
    id is retired, never given to anyone else. If this fails partway, your key still works:
    send it again and it finishes."""
    try:
        onboarding.delete_user_data(
            services.store,
            services.metadata,
            services.onboarding,
            services.settings,
            user.user_id,
            jobs=services.jobs,
            endpoint=services.endpoint,
        )
    except Exception:
        # Each step is idempotent and the records go last, so the client's retry finishes it.
        logger.exception("deleting user %s stopped partway", user.user_id)
        raise ApiError(
            503,
            "deletion_incomplete",
            "deleting your account stopped partway; what is deleted stays deleted and your "
            "key still works: send DELETE /v1/users/me again to finish",
            headers={"Retry-After": "5"},
        ) from None
    return Response(status_code=204)
