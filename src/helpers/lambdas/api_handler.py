"""The API on AWS Lambda behind API Gateway: the same FastAPI app, through Mangum.

The stack in `cdk/` sets the environment: the workshop's settings (`WORKSHOP_BACKEND=sagemaker`,
`WORKSHOP_BUCKET`, `WORKSHOP_TABLE_NAME`, `WORKSHOP_REGION`, `WORKSHOP_BASE_MODEL`,
`WORKSHOP_ROLE_ARN`) and three of the deployment's own: `WORKSHOP_ENDPOINT_NAME` (the
multi-model endpoint), `WORKSHOP_STATE_MACHINE_ARN` (the onboarding workflow) and
`WORKSHOP_ADMIN_KEY_SHA256` (the hex SHA-256 of the operator's admin key), and the serving
mode: `WORKSHOP_SERVING_MODE` (`per-user`, the default, or `shared-base`, which needs
`WORKSHOP_SHARED_MODEL`). This module imports neither torch nor diffusers, so the bundle stays
small.
"""

from __future__ import annotations

import os

from mangum import Mangum

from helpers.api.app import ApiServices, create_app

DEPLOYMENT_ENV = (
    "WORKSHOP_ENDPOINT_NAME",
    "WORKSHOP_STATE_MACHINE_ARN",
    "WORKSHOP_ADMIN_KEY_SHA256",
)


def deployment_env(environ=os.environ) -> dict[str, str]:
    """The deployment's variables, or a `RuntimeError` naming every one that is missing."""
    missing = [name for name in DEPLOYMENT_ENV if not environ.get(name)]
    if missing:
        raise RuntimeError(f"the API Lambda needs the environment variables {missing}")
    return {name: environ[name] for name in DEPLOYMENT_ENV}


def serving_from_env(environ=os.environ):
    """How the endpoint serves users' models (`helpers.domain.serving.Serving`)."""
    from helpers.domain.serving import serving_for

    mode = environ.get("WORKSHOP_SERVING_MODE") or "per-user"
    try:
        return serving_for(mode, environ.get("WORKSHOP_SHARED_MODEL") or None)
    except ValueError as error:
        raise RuntimeError(f"WORKSHOP_SERVING_MODE / WORKSHOP_SHARED_MODEL: {error}") from None


def services_from_env(environ=os.environ) -> ApiServices:
    """The AWS services of the API: S3, DynamoDB (records and the quota counters that every
    instance shares), Step Functions and the SageMaker MME."""
    import boto3

    from helpers.api.generation import EndpointGenerator
    from helpers.backend import open_backend
    from helpers.settings import load_settings

    env = deployment_env(environ)
    settings = load_settings()
    backend = open_backend(settings)
    runtime = boto3.client("sagemaker-runtime", region_name=settings.region)
    return ApiServices(
        settings=settings,
        store=backend.store,
        metadata=backend.metadata,
        onboarding=backend.onboarding(state_machine_arn=env["WORKSHOP_STATE_MACHINE_ARN"]),
        generator=EndpointGenerator(
            runtime, env["WORKSHOP_ENDPOINT_NAME"], serving_from_env(environ)
        ),
        admin_key_hash="sha256:" + env["WORKSHOP_ADMIN_KEY_SHA256"].lower(),
        counters=backend.quotas,
        # No jobs or endpoint to forget a deleted user in: SageMaker keeps job descriptions
        # and cannot unload a model on demand; their names are never reused.
    )


def make_handler(environ=os.environ) -> Mangum:
    return Mangum(create_app(services_from_env(environ)), lifespan="off")


_handler: Mangum | None = None


def handler(event, context):
    """Lambda's entry point; the app is built on the first event and kept for the next ones."""
    global _handler
    if _handler is None:
        _handler = make_handler()
    return _handler(event, context)
