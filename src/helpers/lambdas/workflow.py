"""The Lambda functions of the onboarding state machine (`cdk/workshop_infra/workflow.py`).

`package_handler` is its `Package` state: it turns the training job's `model.tar.gz` into the
user's Triton model on the multi-model endpoint's prefix and the user's adapter for the
shared-base mode (`helpers.services.serving.publish_user_model`, the code the local onboarding
worker runs). Settings come from the function's `WORKSHOP_*` environment
(`helpers.settings.load_settings()`), plus:

- `WORKSHOP_ENDPOINT_NAME`: the endpoint; its models live under
  `s3://<bucket>/endpoints/<name>/models/`;
- `WORKSHOP_ENDPOINT_GPU` (defaults to `true`): whether its instances have GPUs.

Step Functions retries a failed invocation, so the handler is idempotent: a file that exists
already is the one a previous attempt wrote (names are never reused), and the answer
is the same.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from helpers.backend import open_backend
from helpers.domain.paths import endpoint_prefix
from helpers.domain.records import check_id
from helpers.domain.uris import S3Uri
from helpers.services.serving import publish_user_model
from helpers.services.serving_runtime import serving_base_model
from helpers.settings import Settings, SettingsError, load_settings

__all__ = ["endpoint_models_uri", "package_handler"]

logger = logging.getLogger(__name__)
# Lambda's root logger shows warnings only; the one line per model is worth keeping.
logger.setLevel(logging.INFO)

_TRUE = {"1", "true", "yes"}
_FALSE = {"0", "false", "no"}


def endpoint_models_uri(settings: Settings, endpoint_name: str) -> str:
    """The multi-model endpoint's model prefix, `s3://<bucket>/endpoints/<name>/models/`."""
    check_id("endpoint_name", endpoint_name)
    return endpoint_prefix(settings.bucket, endpoint_name)


def package_handler(event: Mapping[str, Any], context: Any = None) -> dict[str, str]:
    """Package a trained model for the endpoint (the state machine's `Package` state).

    Args:
        event (`Mapping`): `{"user_id": str, "model_id": str, "training_output_uri": str}`,
            the output URI being the training job's `s3://<bucket>/.../model.tar.gz` in the
            workshop's bucket.
        context (*optional*): Lambda's context object; not used.

    Returns:
        `dict`: `{"endpoint_model_name": "<user_id>--<model_id>", "model_artifact_uri":
        "s3://<bucket>/endpoints/<endpoint>/models/<name>.tar.gz"}`.

    Raises:
        ValueError: the event lacks a field or has an invalid one (named), or the training
            output holds no LoRA weights.
        SettingsError: a setting is missing or invalid (named).
        ObjectNotFound: there is no training output at `training_output_uri`.
    """
    settings = load_settings()
    user_id, model_id, training_output_uri = check_package_event(event, settings)
    prefix = endpoint_models_uri(settings, _required_env("WORKSHOP_ENDPOINT_NAME"))
    gpu = _env_flag("WORKSHOP_ENDPOINT_GPU", default=True)
    # The serving runtime's folder on the endpoint's instances (helpers.services.serving_runtime).
    runtime = os.environ.get("WORKSHOP_SERVING_RUNTIME", "")
    name, uri = publish_user_model(
        open_backend(settings).store,
        training_output_uri,
        prefix,
        user_id,
        model_id,
        serving_base_model(settings.base_model, runtime),
        gpu,
        runtime=runtime,
    )
    logger.info("published %s at %s and its adapter", name, uri)
    return {"endpoint_model_name": name, "model_artifact_uri": uri}


def check_package_event(event: Any, settings: Settings) -> tuple[str, str, str]:
    """`(user_id, model_id, training_output_uri)` of a `package_handler` event.

    Raises:
        ValueError: naming the first missing or invalid field.
    """
    if not isinstance(event, Mapping):
        raise ValueError(
            "event must be an object with user_id, model_id and training_output_uri, "
            f"got {type(event).__name__}"
        )
    for field in ("user_id", "model_id", "training_output_uri"):
        if field not in event:
            raise ValueError(f"event has no {field}")
    user_id = check_id("user_id", event["user_id"])
    model_id = check_id("model_id", event["model_id"])
    output = event["training_output_uri"]
    try:
        uri = S3Uri.parse(output) if isinstance(output, str) else None
    except ValueError as error:
        raise ValueError(f"training_output_uri: {error}") from None
    if uri is None or not uri.key:
        raise ValueError(f"training_output_uri must be an s3:// object URI, got {output!r}")
    if uri.bucket != settings.bucket:
        raise ValueError(
            f"training_output_uri must be in the workshop's bucket {settings.bucket!r}, "
            f"got {output!r}"
        )
    return user_id, model_id, output


def _required_env(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise SettingsError(f"{name}: not set; set the environment variable {name}")
    return value


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value not in _TRUE | _FALSE:
        raise SettingsError(f"{name}: must be true or false, got {value!r}")
    return value in _TRUE
