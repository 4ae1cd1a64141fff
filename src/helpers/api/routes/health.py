"""`/health`: the one route without a key (load balancers and smoke tests call it), limited
per client address like every request without a valid key.

It answers 200 while the API serves and, where the API holds its inference endpoint (the
local backend), the endpoint is in service: its router runs and Triton answers that it is
ready (one loopback request). Otherwise 503, with the same JSON body saying which state the
endpoint is in. It calls no model and reads no record (only the caller's address counter), so
it stays cheap.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from helpers.api import schemas
from helpers.api.dependencies import Services, limit_anonymous

router = APIRouter(tags=["service"])


@router.get(
    "/health",
    dependencies=[Depends(limit_anonymous)],
    responses={503: {"model": schemas.Health, "description": "The inference endpoint is down."}},
)
def health(services: Services) -> schemas.Health:
    """Whether the service can generate now (see `endpoint`)."""
    backend = services.settings.backend
    if services.endpoint is None:
        return schemas.Health(backend=backend)
    description = services.endpoint.describe()
    if description.in_service:
        return schemas.Health(backend=backend, endpoint=description.status)
    body = schemas.Health(status="unavailable", backend=backend, endpoint=description.status)
    return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": "5"})
