"""The multi-model endpoint on SageMaker: the Triton image in `MultiModel` mode.

One SageMaker model (`Mode="MultiModel"`, `ModelDataUrl` = the endpoint's S3 prefix), one
endpoint config (default `ml.g5.xlarge`), one endpoint. Every `<name>.tar.gz` that
`helpers.services.packaging` puts under the prefix is then a `TargetModel`, loaded by SageMaker
on first use and evicted when the instance runs short, exactly as the local router does.
`SageMakerEndpoint` is the `helpers.ports.endpoint.Endpoint` of the sagemaker backend: `deploy()`
creates the three, `wait()` waits for `InService` and loads the serving runtime, `metrics()`
reads CloudWatch, `stop()` deletes them.

Both serving modes (`helpers.services.serving`) deploy as this same MME: in `"shared-base"` mode
the prefix holds one more archive, the shared model, which reads the users' adapters from
`s3://<bucket>/endpoints/<name>/adapters/` with the endpoint's execution role (so that role
needs `s3:GetObject` there). `deploy` records the mode in the container's environment, where
`serving(name)` reads it back for whoever routes users' requests.

SageMaker's stock Triton image has no torch, diffusers, peft or boto3. This module deploys on it
for the workshop's quick single-instance endpoint: one more archive on the prefix, the serving
runtime (`helpers.services.serving_runtime`), carries them (and the base model, if it is a
directory), and `prepare` (which `wait()` calls) loads it on the instance before any user's
model. It reaches only the instances that exist when `prepare` runs; the stack's default is the
workshop's serving image instead (`model_code/serving_image/Dockerfile`, built by the stack),
on which every instance serves from its first request.
"""

from __future__ import annotations

import dataclasses
import math
import time
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from helpers.domain.paths import ENDPOINT_NAME
from helpers.ports.endpoint import NOT_DEPLOYED, Endpoint, EndpointDescription

if TYPE_CHECKING:  # imported where used: the CDK app imports this module for the image URI
    from helpers.domain.runtime import ServingRuntime
    from helpers.domain.serving import Serving
    from helpers.settings import Settings

#: The container environment variables that record how an endpoint serves user models.
SERVING_MODE_ENV = "WORKSHOP_SERVING_MODE"
SHARED_MODEL_ENV = "WORKSHOP_SHARED_MODEL"
#: `Serving.record()`'s keys, as container environment variables.
_RECORD_ENV = {"mode": SERVING_MODE_ENV, "shared_model": SHARED_MODEL_ENV}
#: The serving runtime model (`helpers.services.serving_runtime`) that `prepare` loads.
RUNTIME_MODEL_ENV = "WORKSHOP_RUNTIME_MODEL"

#: NVIDIA Triton on SageMaker (AWS's deep learning containers, whose account depends on the
#: region: `helpers.infra.aws.images`), `{account}`, `{region}`, `{domain}` filled in by
#: `triton_image_uri`.
DEFAULT_TRITON_IMAGE = "{account}.dkr.ecr.{region}.{domain}/sagemaker-tritonserver:25.09-py3"
DEFAULT_INSTANCE_TYPE = "ml.g5.xlarge"
#: The endpoint's one production variant.
VARIANT_NAME = "AllTraffic"

#: CloudWatch's multi-model metrics (`metrics()`): the model-loading ones, published with each
#: invocation, in `AWS/SageMaker`; `LoadedModelCount`, an instance metric, in the instance
#: metrics' namespace, also looked up in `AWS/SageMaker` where that has none (AWS's pages have
#: listed it in both).
LOADING_NAMESPACE = "AWS/SageMaker"
INSTANCE_NAMESPACES = ("/aws/sagemaker/Endpoints", "AWS/SageMaker")
SUMMED_METRICS = (
    "ModelCacheHit",
    "ModelLoadingWaitTime",
    "ModelDownloadingTime",
    "ModelLoadingTime",
    "ModelUnloadingTime",
)
_STATISTICS = ["Sum", "SampleCount"]


def triton_image_uri(region: str, image: str = DEFAULT_TRITON_IMAGE) -> str:
    """The Triton serving image in `region` (`ValueError` naming the supported regions where
    SageMaker has none)."""
    from helpers.infra.aws.images import TRITON_REGIONS, dlc_image_uri

    return dlc_image_uri(region, image, TRITON_REGIONS)


class SageMakerEndpoint(Endpoint):
    """A Triton multi-model endpoint on SageMaker (the `helpers.ports.endpoint.Endpoint` of the
    sagemaker backend): deploy, wait, invoke, watch and delete it.

    The interface's verbs act on the endpoint `name` serving `prefix_uri`. The older by-name
    methods (`deploy(name, prefix)`, `wait(name)`, `prepare(name)`, `describe(name)`,
    `delete(name)`) still act on any endpoint named in the call.

    Args:
        region (`str`): the AWS region.
        role_arn (`str`): the execution role SageMaker uses to read the model prefix.
        client, runtime, s3 (*optional*): boto3 `sagemaker`, `sagemaker-runtime` and `s3`
            clients.
        image_uri (`str`, *optional*): the serving image; `triton_image_uri(region)`.
        name (`str`, defaults to `"workshop-mme"`): the endpoint (and its config and model).
        prefix_uri (`str`, *optional*): the archives it serves, `s3://.../models/`; needed by
            `deploy()` without arguments.
        instance_type (`str`, defaults to `"ml.g5.xlarge"`), instance_count (`int`, defaults
            to 1): its instances.
        max_loaded_models (`int`, *optional*): ignored. SageMaker keeps as many models loaded
            as fit in an instance's memory and unloads the least recently used when it runs
            short; no setting bounds the count. Accepted so that `Backend.endpoint` takes the
            same options on both backends.
        cloudwatch (*optional*): a boto3 `cloudwatch` client, for `metrics()`.
        poll_s (`float`, defaults to 30), timeout_s (`float`, defaults to 1800): `wait`'s
            polling interval and patience.
    """

    # SageMaker has no unload API: it unloads under memory pressure, or when the endpoint goes.
    can_unload = False
    metrics_period_s = 60.0  # CloudWatch's 1-minute datapoints

    def __init__(
        self,
        region: str,
        role_arn: str,
        client=None,
        runtime=None,
        image_uri: str | None = None,
        s3=None,
        *,
        name: str = ENDPOINT_NAME,
        prefix_uri: str | None = None,
        instance_type: str = DEFAULT_INSTANCE_TYPE,
        instance_count: int = 1,
        max_loaded_models: int | None = None,
        cloudwatch=None,
        poll_s: float = 30,
        timeout_s: float = 1800,
    ) -> None:
        import boto3

        if not role_arn or not role_arn.startswith("arn:"):
            raise ValueError(f"role_arn must be an IAM role ARN, got {role_arn!r}")
        self.region = region
        self.role_arn = role_arn
        self.client = client or boto3.client("sagemaker", region_name=region)
        self.runtime = runtime or boto3.client("sagemaker-runtime", region_name=region)
        self.s3 = s3 or boto3.client("s3", region_name=region)
        self.image_uri = image_uri or triton_image_uri(region)
        self.name = name
        self.prefix_uri = prefix_uri
        self.instance_type = instance_type
        self.instance_count = instance_count
        self._cloudwatch = cloudwatch
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        #: The start of the window `metrics()` sums over: this object's last `deploy()`, else
        #: three hours before it was made.
        self.metrics_since = datetime.now(timezone.utc) - timedelta(hours=3)

    @classmethod
    def from_settings(cls, settings: Settings, **options) -> SageMakerEndpoint:
        """The endpoint `name` (default `"workshop-mme"`) on the settings' bucket, in their
        region, with their execution role (`options`: the constructor's, `role_arn` too)."""
        from helpers.domain.paths import endpoint_prefix

        name = options.pop("name", ENDPOINT_NAME)
        options.setdefault("prefix_uri", endpoint_prefix(settings.bucket, name))
        role_arn = options.pop("role_arn", None) or settings.role_arn
        return cls(settings.region, role_arn, name=name, **options)

    @property
    def cloudwatch(self):
        """The boto3 `cloudwatch` client of `metrics()` (made on first use)."""
        if self._cloudwatch is None:
            import boto3

            self._cloudwatch = boto3.client("cloudwatch", region_name=self.region)
        return self._cloudwatch

    # ------------------------------------------------------------------------- deploy

    def deploy(
        self,
        name: str | None = None,
        model_prefix_uri: str | None = None,
        instance_type: str | None = None,
        instance_count: int | None = None,
        serving: Serving | None = None,
        runtime: ServingRuntime | None = None,
    ) -> EndpointDescription:
        """Create the model, endpoint config and endpoint `name` serving `model_prefix_uri`;
        `wait()` until it is in service (several minutes).

        Without `name`, this object's endpoint, on `prefix_uri` and its instances: the
        interface's `deploy(serving=..., runtime=...)`. It waits out a deletion of that
        endpoint still in progress, and refuses one that exists: use it as it is (`wait()`),
        or `stop()` it first.

        Args:
            name, model_prefix_uri, instance_type, instance_count (*optional*): another
                endpoint than this object's (the older by-name form).
            serving (`Serving`, *optional*): how users' requests reach their models; per-user
                models by default. For `"shared-base"` the shared model's archive must be
                under the prefix already (`adapter_serving.package_shared_base`, with the
                adapter store's `s3://` prefix as its `adapter_source`).
            runtime (`ServingRuntime`, *optional*): the serving runtime on the prefix that
                the models were packaged with (`helpers.services.serving_runtime.package_runtime`);
                `wait()` (or `prepare`) loads it once the endpoint is in service. Without one
                the image must bring torch and diffusers itself.
        """
        from helpers.domain.serving import PerUserModels

        own = name is None
        name = name or self.name
        model_prefix_uri = model_prefix_uri or self.prefix_uri
        instance_type = instance_type or self.instance_type
        instance_count = instance_count or self.instance_count
        serving = serving or PerUserModels()
        prefix = model_prefix_uri or ""
        if not prefix.startswith("s3://") or not prefix.endswith("/"):
            raise ValueError(
                f"model_prefix_uri must be an s3:// folder ending in '/', got {model_prefix_uri!r}"
            )
        if not instance_type.startswith("ml."):
            raise ValueError(f"instance_type must look like 'ml.g5.xlarge', got {instance_type!r}")
        for model in serving.endpoint_models():  # the shared base's model
            self._check_archive(
                f"{model_prefix_uri}{model}.tar.gz", "helpers.services.serving.packaging_for"
            )
        environment = {_RECORD_ENV[key]: value for key, value in serving.record().items()}
        if runtime is not None:
            self._check_archive(runtime.uri, "helpers.services.serving_runtime.package_runtime")
            environment[RUNTIME_MODEL_ENV] = runtime.target_model
        if own:
            self._make_room()
        self.client.create_model(
            ModelName=name,
            ExecutionRoleArn=self.role_arn,
            PrimaryContainer={
                "Image": self.image_uri,
                "Mode": "MultiModel",
                "ModelDataUrl": model_prefix_uri,
                "Environment": environment,
            },
        )
        self.client.create_endpoint_config(
            EndpointConfigName=name,
            ProductionVariants=[
                {
                    "VariantName": VARIANT_NAME,
                    "ModelName": name,
                    "InstanceType": instance_type,
                    "InitialInstanceCount": instance_count,
                }
            ],
        )
        self.client.create_endpoint(EndpointName=name, EndpointConfigName=name)
        if own:
            self.metrics_since = datetime.now(timezone.utc)
        return self.describe(name)

    def _make_room(self) -> None:
        """Wait until a deletion of this endpoint is over; refuse an endpoint that exists."""
        deadline = time.monotonic() + self.timeout_s
        while (status := self.describe().status) == "Deleting" and time.monotonic() < deadline:
            time.sleep(self.poll_s)
        if status != NOT_DEPLOYED:
            raise RuntimeError(
                f"endpoint {self.name} exists ({status}): use it as it is (wait()), or stop() "
                "it first"
            )

    def _check_archive(self, uri: str, packager: str) -> None:
        from botocore.exceptions import ClientError

        bucket, _, key = uri.removeprefix("s3://").partition("/")
        try:
            self.s3.head_object(Bucket=bucket, Key=key)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise ValueError(f"{uri} does not exist: package it first ({packager})") from None
            raise

    def serving(self, name: str | None = None) -> Serving:
        """How endpoint `name` (this one by default) serves user models, as `deploy`
        recorded it (per-user models where it recorded nothing)."""
        from helpers.domain.serving import serving_from_record

        environment = self._environment(name or self.name)
        return serving_from_record(
            {key: environment[env] for key, env in _RECORD_ENV.items() if env in environment}
        )

    def prepare(self, name: str | None = None) -> dict | None:
        """Load the serving runtime that `deploy` recorded for endpoint `name` (this one by
        default; None if none): invoke its model once, which installs it on the instance.
        Return what it reports (its name, folder, parts and Python). `wait()` calls it; call
        it again whenever an instance may be new: it costs one request where the runtime is
        there. SageMaker sends a target to an instance that has it loaded, so this reaches one
        instance: an endpoint of several instances needs an image with the packages instead."""
        from helpers.domain.runtime import read_status, status_request

        name = name or self.name
        target = self._environment(name).get(RUNTIME_MODEL_ENV)
        if not target:
            return None
        body, content_type = status_request()
        answer = self.runtime.invoke_endpoint(
            EndpointName=name, TargetModel=target, ContentType=content_type, Body=body
        )
        return read_status(answer["Body"].read())

    def _environment(self, name: str) -> dict[str, str]:
        """The container environment `deploy` gave endpoint `name`'s model."""
        config_name = self.client.describe_endpoint(EndpointName=name)["EndpointConfigName"]
        config = self.client.describe_endpoint_config(EndpointConfigName=config_name)
        model = self.client.describe_model(ModelName=config["ProductionVariants"][0]["ModelName"])
        return model["PrimaryContainer"].get("Environment") or {}

    def describe(self, name: str | None = None) -> EndpointDescription:
        """Endpoint `name`'s (this one's by default) status and instance type; `NOT_DEPLOYED`
        where SageMaker has no such endpoint."""
        name = name or self.name
        try:
            answer = self.client.describe_endpoint(EndpointName=name)
        except Exception as error:
            if _not_found(error):
                return EndpointDescription(name, NOT_DEPLOYED)
            raise
        # The endpoint's own description has no instance type; its config does.
        config = self.client.describe_endpoint_config(
            EndpointConfigName=answer["EndpointConfigName"]
        )
        return EndpointDescription(
            name=name,
            status=answer["EndpointStatus"],
            failure_reason=answer.get("FailureReason"),
            instance_type=config["ProductionVariants"][0].get("InstanceType"),
        )

    def wait(
        self,
        name: str | None = None,
        timeout: float | None = None,
        poll: float | None = None,
        prepare: bool | None = None,
    ) -> EndpointDescription:
        """Poll until endpoint `name` (this one by default) is InService, then load its
        serving runtime (`prepare`); raise with SageMaker's reason if it fails.

        Args:
            name (`str`, *optional*): another endpoint (the older by-name form, which only
                polls unless `prepare=True`).
            timeout, poll (`float`, *optional*): seconds; `timeout_s` and `poll_s` by default.
            prepare (`bool`, *optional*): whether to load the serving runtime; by default for
                this object's endpoint only.
        """
        own = name is None
        name = name or self.name
        timeout = self.timeout_s if timeout is None else timeout
        poll = self.poll_s if poll is None else poll
        deadline = time.monotonic() + timeout
        while True:
            description = self.describe(name)
            if description.in_service:
                break
            if description.status == NOT_DEPLOYED:
                raise RuntimeError(f"endpoint {name} is not deployed: deploy() creates it")
            if description.status == "Failed":
                raise RuntimeError(f"endpoint {name} failed: {description.failure_reason}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"endpoint {name} is still {description.status} after {timeout:g} s"
                )
            time.sleep(poll)
        load_runtime = own if prepare is None else prepare
        if load_runtime:
            return dataclasses.replace(description, runtime=self.prepare(name))
        return description

    # -------------------------------------------------------------------------- use

    def runtime_client(self):
        """The boto3 `sagemaker-runtime` client this object invokes with."""
        return self.runtime

    def runtime_client_options(self) -> dict[str, str]:
        """The region and the runtime's URL (credentials: the process's own)."""
        return {"region_name": self.region, "endpoint_url": self.runtime.meta.endpoint_url}

    def invoke(self, name: str, target_model: str, prompt: str, **parameters):
        """Generate with one user's model; the images as PIL images."""
        from helpers.domain.generation import invoke_model

        return invoke_model(self.runtime, name, target_model, prompt, **parameters)

    def metrics(self, since: datetime | None = None) -> dict[str, float]:
        """The endpoint's multi-model metrics from CloudWatch, under the router's names.

        `LoadedModelCount` is the latest minute's (the most models any instance held); the
        others sum `since` (`metrics_since` by default) until now: `ModelCacheHit_sum` hits
        of `ModelCacheHit_count` invocations, and `<time metric>_sum` (microseconds) over
        `_count` samples for `ModelLoadingWaitTime`, `ModelDownloadingTime`,
        `ModelLoadingTime` and `ModelUnloadingTime`. A metric without datapoints is left out,
        so right after `deploy` the answer is empty.

        CloudWatch lags: SageMaker publishes these once a minute, and a datapoint can take a
        few minutes more to be readable, so a load test of a few seconds may see none of its
        own requests here; they show up minutes later. Each call makes six or seven
        `cloudwatch:GetMetricStatistics` requests, which this session must be allowed.
        """
        end = datetime.now(timezone.utc)
        start = min(since or self.metrics_since, end - timedelta(minutes=1))
        values = {}
        loaded = self._latest("LoadedModelCount", end)
        if loaded is not None:
            values["LoadedModelCount"] = loaded
        for metric in SUMMED_METRICS:
            points = self._datapoints(LOADING_NAMESPACE, metric, start, end, _STATISTICS)
            if points:
                values[f"{metric}_sum"] = sum(point["Sum"] for point in points)
                values[f"{metric}_count"] = sum(point["SampleCount"] for point in points)
        return values

    def _latest(self, metric: str, end: datetime) -> float | None:
        """The newest 1-minute maximum of `metric` in the last 15 minutes (None: none)."""
        for namespace in INSTANCE_NAMESPACES:
            points = self._datapoints(
                namespace, metric, end - timedelta(minutes=15), end, ["Maximum"]
            )
            if points:
                return max(points, key=lambda point: point["Timestamp"])["Maximum"]
        return None

    def _datapoints(
        self, namespace: str, metric: str, start: datetime, end: datetime, statistics: list
    ) -> list[dict]:
        # One request holds at most 1440 datapoints: longer windows get longer periods.
        minutes = math.ceil((end - start).total_seconds() / 60)
        period = 60 * max(1, math.ceil(minutes / 1440))
        answer = self.cloudwatch.get_metric_statistics(
            Namespace=namespace,
            MetricName=metric,
            Dimensions=[
                {"Name": "EndpointName", "Value": self.name},
                {"Name": "VariantName", "Value": VARIANT_NAME},
            ],
            StartTime=start,
            EndTime=end,
            Period=period,
            Statistics=statistics,
        )
        return answer.get("Datapoints", [])

    def unload_all(self) -> None:
        """None: SageMaker has no API that unloads a model. An instance unloads the least
        recently used models when it runs short of memory, and all of them when the endpoint
        is deleted (`stop`) or updated; a cold start on purpose takes a model never loaded."""
        return None

    def forget(self, model_names) -> None:
        """None: SageMaker has no API that unloads a model. A deleted user's archives are gone
        from S3 and their model names are never reused (user ids are retired), so a copy left
        in an instance's cache is never served to anyone else; it goes when it is evicted or
        the endpoint is updated or stopped."""
        return None

    # ------------------------------------------------------------------------- delete

    def delete(self, name: str) -> None:
        """Delete the endpoint, its config and its model (the archives on S3 stay)."""
        self.client.delete_endpoint(EndpointName=name)
        self.client.delete_endpoint_config(EndpointConfigName=name)
        self.client.delete_model(ModelName=name)

    def stop(self) -> None:
        """Delete this endpoint, its config and its model, whichever exist (the archives on
        S3 stay; `deploy()` serves them again). SageMaker finishes deleting the endpoint in
        the background; a `deploy()` meanwhile waits for it."""
        for delete, key in (
            (self.client.delete_endpoint, "EndpointName"),
            (self.client.delete_endpoint_config, "EndpointConfigName"),
            (self.client.delete_model, "ModelName"),
        ):
            try:
                delete(**{key: self.name})
            except Exception as error:
                if not _not_found(error):
                    raise


def _not_found(error: Exception) -> bool:
    """Whether `error` is SageMaker's answer about a resource that does not exist."""
    response = getattr(error, "response", None) or {}
    details = response.get("Error", {})
    return details.get("Code") == "ValidationException" and "Could not find" in str(
        details.get("Message", "")
    )
