"""The API's routes, one router per resource; `api_router` holds them all, in the order the
OpenAPI spec lists them."""

from fastapi import APIRouter

from helpers.api.routes import generations, health, models, photos, users

v1_router = APIRouter(prefix="/v1")
for resource in (users, photos, models, generations):
    v1_router.include_router(resource.router)

api_router = APIRouter()
api_router.include_router(health.router)
api_router.include_router(v1_router)

__all__ = ["api_router"]
