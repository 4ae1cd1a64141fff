"""`/health`: the one route without a key (load balancers and smoke tests call it)."""

from __future__ import annotations

from fastapi import APIRouter

from helpers.api import schemas
from helpers.api.dependencies import Services

router = APIRouter(tags=["service"])


@router.get("/health")
def health(services: Services) -> schemas.Health:
    return schemas.Health(backend=services.settings.backend)
