"""The stack's properties: what an operator chooses at synthesis (`cdk.json` or `-c key=value`)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CONTEXT_PREFIX = "workshop:"
_ENDPOINT_NAME_RE = re.compile(r"^[a-z0-9](-?[a-z0-9]){0,62}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_SHARED_MODEL_RE = re.compile(r"^shared-base-[0-9a-f]{12}$")
_RUNTIME_RE = re.compile(r"^runtime-[0-9a-f]{12}$")
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


@dataclass(frozen=True)
class WorkshopProps:
    """The choices of one deployment of the workshop's `sagemaker` backend.

    Args:
        base_model (`str`, defaults to `"stabilityai/stable-diffusion-2-1-base"`): the base
            pipeline the training jobs fine-tune and the endpoint loads (a hub id).
        endpoint_name (`str`, defaults to `"workshop-mme"`): the multi-model endpoint's name;
            its models live under `endpoints/<endpoint_name>/models/`.
        endpoint_instance_type (`str`, defaults to `"ml.g5.xlarge"`): the serving instance.
        endpoint_instance_count (`int`, defaults to 1): instances behind the endpoint.
        endpoint_kms_key_arn (`str`, *optional*): KMS key of the instances' storage volume
            (not for instance types with local NVMe storage such as ml.g5).
        deploy_endpoint (`bool`, defaults to True): create the endpoint (it costs money by
            the hour); False leaves it to notebook 03 (`helpers.infra.aws.endpoint`).
        shared_model (`str`, *optional*): serve users through the shared base model of this
            name (`shared-base-<hash>`, what `helpers.services.serving.package_shared_base`
            uploaded to the endpoint's models) with their adapters; None serves each user's
            own Triton model (the per-user mode).
        serving_runtime (`str`, *optional*): the serving runtime model on the endpoint's
            models (`runtime-<hash>`, what `helpers.services.serving_runtime.package_runtime`
            uploaded), which brings torch and diffusers to the Triton image; the packaging
            function names it in every user's model, and the endpoint records it for
            `SageMakerEndpoint.prepare`. None: the image must have them.
        api_timeout_seconds (`int`, defaults to 60): the API function's timeout.
        api_memory_mb (`int`, defaults to 1024): the API function's memory.
        throttling_rate_limit (`float`, defaults to 10): the API stage's requests per second.
        throttling_burst_limit (`int`, defaults to 20): the API stage's burst.
        admin_key_sha256 (`str`, *optional*): hex SHA-256 of the operator's admin key; when
            None the stack asks for it as the NoEcho parameter `AdminKeySha256`.
        bundle (`bool`, defaults to True): pip-install the functions' dependencies into their
            bundle; False only packages the project's code (fast offline synthesis for tests,
            not deployable).
    """

    base_model: str = "stabilityai/stable-diffusion-2-1-base"
    endpoint_name: str = "workshop-mme"
    endpoint_instance_type: str = "ml.g5.xlarge"
    endpoint_instance_count: int = 1
    endpoint_kms_key_arn: str | None = None
    deploy_endpoint: bool = True
    shared_model: str | None = None
    serving_runtime: str | None = None
    api_timeout_seconds: int = 60
    api_memory_mb: int = 1024
    throttling_rate_limit: float = 10.0
    throttling_burst_limit: int = 20
    admin_key_sha256: str | None = None
    bundle: bool = True

    def __post_init__(self) -> None:
        self.check_inputs()

    def check_inputs(self) -> None:
        """Raise `ValueError` naming the first property that is invalid."""
        if not self.base_model or any(c in self.base_model for c in "\"\n' "):
            raise ValueError(
                f"base_model must be a hub id or s3:// folder, got {self.base_model!r}"
            )
        if not _ENDPOINT_NAME_RE.match(self.endpoint_name):
            raise ValueError(
                "endpoint_name must be 1-63 of a-z, 0-9 and single '-' (it is part of S3 keys "
                f"and IAM ARNs), got {self.endpoint_name!r}"
            )
        if not self.endpoint_instance_type.startswith("ml."):
            raise ValueError(
                "endpoint_instance_type must look like 'ml.g5.xlarge', "
                f"got {self.endpoint_instance_type!r}"
            )
        _check_int("endpoint_instance_count", self.endpoint_instance_count, 1, 10)
        if self.endpoint_kms_key_arn is not None and not self.endpoint_kms_key_arn.startswith(
            "arn:"
        ):
            raise ValueError(
                f"endpoint_kms_key_arn must be a KMS key ARN, got {self.endpoint_kms_key_arn!r}"
            )
        if self.shared_model is not None and not _SHARED_MODEL_RE.match(self.shared_model):
            raise ValueError(
                "shared_model must be the name package_shared_base gave the shared model, "
                f"'shared-base-' and 12 hex digits, got {self.shared_model!r}"
            )
        if self.serving_runtime is not None and not _RUNTIME_RE.match(self.serving_runtime):
            raise ValueError(
                "serving_runtime must be the name package_runtime gave the runtime model, "
                f"'runtime-' and 12 hex digits, got {self.serving_runtime!r}"
            )
        _check_int("api_timeout_seconds", self.api_timeout_seconds, 3, 900)
        _check_int("api_memory_mb", self.api_memory_mb, 128, 10240)
        if not isinstance(self.throttling_rate_limit, (int, float)) or not (
            0 < self.throttling_rate_limit <= 10000
        ):
            raise ValueError(
                "throttling_rate_limit must be 0-10000 requests/s, "
                f"got {self.throttling_rate_limit!r}"
            )
        _check_int("throttling_burst_limit", self.throttling_burst_limit, 1, 5000)
        if self.admin_key_sha256 is not None and not _SHA256_RE.match(self.admin_key_sha256):
            raise ValueError(
                "admin_key_sha256 must be 64 lowercase hex digits (hashlib.sha256(key).hexdigest())"
            )

    @property
    def serving_mode(self) -> str:
        """`"shared-base"` when a shared model is named, else `"per-user"`."""
        return "per-user" if self.shared_model is None else "shared-base"

    @property
    def endpoint_has_gpu(self) -> bool:
        """Whether the serving instances have NVIDIA GPUs (the g and p families)."""
        family = self.endpoint_instance_type.removeprefix("ml.")
        return family[:1] in ("g", "p")

    @classmethod
    def from_context(cls, get: Callable[[str], Any]) -> WorkshopProps:
        """Props from CDK context values `workshop:<name>` (strings from `-c`, or JSON values
        from `cdk.json`); a name with no value keeps its default.

        Args:
            get (`Callable[[str], Any]`): looks a context key up, e.g. `app.node.try_get_context`.

        Raises:
            ValueError: naming the context key whose value is invalid.
        """
        values = {}
        for field in dataclasses.fields(cls):
            key = CONTEXT_PREFIX + field.name
            raw = get(key)
            if raw is None:
                continue
            try:
                values[field.name] = _parse(raw, field.default)
            except ValueError as error:
                raise ValueError(f"context {key}: {error}") from None
        return cls(**values)


def _parse(raw: Any, default: Any) -> Any:
    if not isinstance(raw, str):
        return raw
    if isinstance(default, bool):
        if raw.lower() in _TRUE | _FALSE:
            return raw.lower() in _TRUE
        raise ValueError(f"expected true or false, got {raw!r}")
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return raw


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer from {low} to {high}, got {value!r}")
