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
_EMAIL_RE = re.compile(r"^[^@\s,;]+@[^@\s,;]+\.[^@\s,;]+$")
#: `serving_image`'s values: the image the stack builds, or SageMaker's own Triton image.
SERVING_IMAGES = ("workshop", "triton")
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
        endpoint_instance_count (`int`, defaults to 1): instances behind the endpoint, and
            the fewest that automatic scaling keeps.
        endpoint_max_instance_count (`int`, defaults to 4): the most instances automatic
            scaling adds (at least `endpoint_instance_count`; equal to it turns scaling off in
            effect). 4 ml.g5.xlarge serve about 80 invocations a minute at the target below;
            the account's per-type endpoint quota may be lower (a quota increase raises it).
        invocations_per_instance_target (`float`, defaults to 20): the target of the
            predefined metric `SageMakerVariantInvocationsPerInstance` (invocations per
            instance per minute, over all the endpoint's models), which AWS recommends for
            multi-model endpoints. AWS's load-testing guidance sets it to the measured maximum
            times a safety factor; the capacity model assumes one ml.g5.xlarge makes about 30
            images a minute (SD 2.1, 512 px, 25 steps, about 2.0 s each: an assumption until
            load-tested), and 20 is about two thirds of that: the rest is headroom for the
            model loads of cache misses, which take the GPU from inference. Requests for
            several images count once: lower the target when clients usually ask for more.
        scale_in_cooldown_seconds (`int`, defaults to 600): the wait after removing an
            instance before removing another. Slow on purpose: an instance that goes takes its
            loaded models with it, and their users' next requests are cache misses elsewhere.
        scale_out_cooldown_seconds (`int`, defaults to 60): the wait after adding an instance
            before adding another: fast, as endpoint metrics come every minute and a new
            instance takes minutes to start.
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
        serving_image (`str`, *optional*): the endpoint's container. `"workshop"`: the image
            the stack builds in AWS (CodeBuild, no Docker on the deploying machine) from
            `model_code/serving_image/Dockerfile`, SageMaker's Triton image with the serving
            packages installed, so every instance serves users' models from its first request.
            `"triton"`: SageMaker's stock Triton image, with the packages brought by the
            serving runtime model that `SageMakerEndpoint.prepare` loads on the instances it
            finds (today's way; no image build). None (the default): `"triton"` when
            `serving_runtime` is given, else `"workshop"`. The workshop image is the default
            because an instance that autoscaling adds, or one that replaces a failed instance,
            must serve without anyone calling `prepare()` again; `"triton"` suits a quick
            single-instance endpoint.
        api_timeout_seconds (`int`, defaults to 60): the API function's timeout.
        api_memory_mb (`int`, defaults to 1024): the API function's memory.
        throttling_rate_limit (`float`, defaults to 10): the API stage's requests per second.
        throttling_burst_limit (`int`, defaults to 20): the API stage's burst.
        alarm_email (`str`, *optional*): an address that the stack's alarms email (through
            an encrypted SNS topic; AWS asks the address to confirm first); None: the alarms
            only show on the dashboard and in the CloudWatch console.
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
    endpoint_max_instance_count: int = 4
    invocations_per_instance_target: float = 20.0
    scale_in_cooldown_seconds: int = 600
    scale_out_cooldown_seconds: int = 60
    endpoint_kms_key_arn: str | None = None
    deploy_endpoint: bool = True
    shared_model: str | None = None
    serving_runtime: str | None = None
    serving_image: str | None = None
    api_timeout_seconds: int = 60
    api_memory_mb: int = 1024
    throttling_rate_limit: float = 10.0
    throttling_burst_limit: int = 20
    alarm_email: str | None = None
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
        self._check_scaling()
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
        if self.serving_image is not None and self.serving_image not in SERVING_IMAGES:
            raise ValueError(
                f"serving_image must be one of {', '.join(map(repr, SERVING_IMAGES))} (or unset), "
                f"got {self.serving_image!r}"
            )
        if self.serving_image == "workshop" and self.serving_runtime is not None:
            raise ValueError(
                "serving_image='workshop' and serving_runtime exclude each other: the workshop "
                "image has the serving packages, the runtime model brings them to the stock "
                f"image; unset serving_runtime ({self.serving_runtime!r}) or choose "
                "serving_image='triton'"
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

    def _check_scaling(self) -> None:
        _check_int("endpoint_max_instance_count", self.endpoint_max_instance_count, 1, 100)
        if self.endpoint_max_instance_count < self.endpoint_instance_count:
            raise ValueError(
                f"endpoint_max_instance_count ({self.endpoint_max_instance_count}) must be at "
                f"least endpoint_instance_count ({self.endpoint_instance_count}), the fewest "
                "instances scaling keeps"
            )
        target = self.invocations_per_instance_target
        if (
            not isinstance(target, (int, float))
            or isinstance(target, bool)
            or not 0 < target <= 100000
        ):
            raise ValueError(
                "invocations_per_instance_target must be a number above 0 and at most 100000 "
                f"(invocations per instance per minute), got {target!r}"
            )
        _check_int("scale_in_cooldown_seconds", self.scale_in_cooldown_seconds, 0, 86400)
        _check_int("scale_out_cooldown_seconds", self.scale_out_cooldown_seconds, 0, 86400)
        if self.alarm_email is not None and not _EMAIL_RE.match(self.alarm_email):
            raise ValueError(
                f"alarm_email must be one email address (name@domain), got {self.alarm_email!r}"
            )

    @property
    def serving_mode(self) -> str:
        """`"shared-base"` when a shared model is named, else `"per-user"`."""
        return "per-user" if self.shared_model is None else "shared-base"

    @property
    def endpoint_image(self) -> str:
        """`serving_image` resolved: `"triton"` when unset and a serving runtime is named,
        else `"workshop"`."""
        if self.serving_image is not None:
            return self.serving_image
        return "triton" if self.serving_runtime is not None else "workshop"

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
