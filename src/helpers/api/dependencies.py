"""The API's request dependencies: who is calling, their rate limit, and the body's type.

They read the app's services from `request.app.state` (set by `create_app`), so they are plain
module-level functions that FastAPI can resolve and the OpenAPI spec can describe.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from limits import parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from helpers.api.auth import key_matches, key_user
from helpers.api.errors import ApiError
from helpers.domain.records import UserRecord

bearer = HTTPBearer(auto_error=False, description="Your API key (or the admin key).")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


class RateLimits:
    """Per-key limits in this process (`limits` syntax, e.g. "120/minute"), one per bucket.

    On AWS each Lambda instance keeps its own; API Gateway's stage throttling is the global one.
    """

    def __init__(self, **buckets: str) -> None:
        self.limiter = MovingWindowRateLimiter(MemoryStorage())
        self.buckets = {name: parse(text) for name, text in buckets.items()}

    def hit(self, bucket: str, who: str) -> None:
        """Count one request of `who`; raise a 429 `ApiError` with Retry-After when over."""
        limit = self.buckets[bucket]
        if self.limiter.hit(limit, bucket, who):
            return
        reset = self.limiter.get_window_stats(limit, bucket, who).reset_time
        wait = max(1, int(reset - time.time()) + 1)
        raise ApiError(
            429,
            "rate_limited",
            f"too many requests for this key ({limit}); retry in {wait} s",
            headers={"Retry-After": str(wait)},
        )


def _unauthorized(message: str) -> ApiError:
    return ApiError(
        401, "unauthorized", message, field="Authorization", headers={"WWW-Authenticate": "Bearer"}
    )


def presented_key(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise _unauthorized("send your API key as 'Authorization: Bearer <key>'")
    return credentials.credentials


def current_user(request: Request, credentials: Credentials) -> UserRecord:
    """The caller, from their key; 401 for a missing or wrong key, 429 over their rate."""
    services = request.app.state.services
    key = presented_key(credentials)
    user_id = key_user(key)
    user = services.metadata.get_user(user_id) if user_id else None
    if not key_matches(key, user.api_key_hash if user else None):
        raise _unauthorized("the API key is not valid")
    request.app.state.rate_limits.hit("all", user.user_id)
    return user


def require_admin(request: Request, credentials: Credentials) -> None:
    if not key_matches(presented_key(credentials), request.app.state.services.admin_key_hash):
        raise ApiError(
            403, "forbidden", "creating users needs the operator's admin key", "Authorization"
        )


def require_json(content_type: Annotated[str | None, Header()] = None) -> None:
    if not (content_type or "").lower().startswith("application/json"):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"this route takes a JSON body, got Content-Type {content_type!r}",
            field="Content-Type",
            allowed="application/json",
        )


User = Annotated[UserRecord, Depends(current_user)]


def current_user_sending_json(user: User, _: Annotated[None, Depends(require_json)]) -> UserRecord:
    """The caller of a route with a JSON body: who they are is checked first, then the body."""
    return user


JsonUser = Annotated[UserRecord, Depends(current_user_sending_json)]
