"""The endpoint port: one multi-model endpoint, deployed, used and stopped the same way on
either backend.

```py
endpoint = backend.endpoint(max_loaded_models=2)     # helpers.backend.open_backend(settings)
endpoint.deploy(serving=serving, runtime=backend.serving_runtime(prefix))
print(endpoint.wait())                  # ready: in service, its serving runtime loaded
runtime = endpoint.runtime_client()     # a boto3 "sagemaker-runtime" client
runtime.invoke_endpoint(EndpointName=endpoint.name, TargetModel="demo-ada--m1.tar.gz", ...)
endpoint.loaded_models(), endpoint.metrics()
endpoint.stop()                         # nothing of it runs, or costs, any more
```

| verb | `LocalEndpoint` (Triton + router here) | `SageMakerEndpoint` |
|---|---|---|
| `deploy` | starts Triton and the router | creates the model, endpoint config and endpoint |
| `wait` | checks they run; loads the serving runtime, if any | `InService`, then the same |
| `describe` | running or not, and the router's URL | SageMaker's status and instance type |
| `runtime_client` | a client of the router | boto3's own |
| `loaded_models`, `evictions` | the router's cache, by name | None: no SageMaker API names them |
| `metrics` | the router's registry, as it is now | CloudWatch, minutes late |
| `unload_all` | unloads every model | None: SageMaker has no unload API |
| `forget` | unloads a deleted user's models, removes their copies | None: names never reused |
| `stop` | stops the router and Triton | deletes the endpoint, its config and its model |

The verbs are named for what they promise on both backends. `deploy`, not `start`: on
SageMaker it creates resources that last (and cost) until `stop`, and returns before they
serve, hence a separate `wait`; starting servers here is the same act on this machine, ready
when it returns. `stop`, not `delete`: the archives under `prefix_uri` stay, so `deploy` brings
back the same endpoint; SageMaker has no paused state, so there stopping deletes the endpoint,
its config and its model, and after `stop` nothing runs or costs on either backend.

Importing this module imports neither boto3 nor any backend.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from collections.abc import Sequence

    from helpers.domain.runtime import ServingRuntime
    from helpers.domain.serving import Serving

__all__ = ["IN_SERVICE", "NOT_DEPLOYED", "Endpoint", "EndpointDescription"]

#: The status of an endpoint that serves requests (SageMaker's word, used by both backends).
IN_SERVICE = "InService"
#: The status of an endpoint that is not deployed: never, or stopped since.
NOT_DEPLOYED = "NotDeployed"


@dataclass(frozen=True)
class EndpointDescription:
    """An endpoint's state, as `describe`, `deploy` and `wait` report it.

    Args:
        name (`str`): the endpoint's name (`EndpointName` of the runtime API).
        status (`str`): `IN_SERVICE`, `NOT_DEPLOYED`, or SageMaker's own (`"Creating"`, ...).
        failure_reason (`str`, *optional*): why it failed, where it did.
        instance_type (`str`, *optional*): its instances (SageMaker).
        url (`str`, *optional*): where plain HTTP reaches it (the local router).
        runtime (`dict`, *optional*): what the serving runtime reported when `wait` loaded it.
    """

    name: str
    status: str
    failure_reason: str | None = None
    instance_type: str | None = None
    url: str | None = None
    runtime: dict | None = None

    @property
    def in_service(self) -> bool:
        return self.status == IN_SERVICE

    def __str__(self) -> str:
        text = f"endpoint {self.name}: {self.status}"
        if self.instance_type:
            text += f" on {self.instance_type}"
        if self.url:
            text += f" at {self.url}"
        if self.failure_reason:
            text += f" ({self.failure_reason})"
        if self.runtime:
            text += f"; serving runtime {self.runtime.get('name')} loaded"
        return text


class Endpoint(abc.ABC):
    """A multi-model endpoint: every archive `<name>.tar.gz` under `prefix_uri` is a
    `TargetModel`, loaded on first use and unloaded, least recently used first, when the
    endpoint runs short.

    The optional verbs (`loaded_models`, `evictions`, `metrics`, `unload_all`) answer None, or
    an empty mapping, where the backend cannot tell or cannot do it: callers print or skip,
    and never ask which backend they have.
    """

    #: Whether `unload_all` unloads models on demand (a cold start chosen by the caller).
    can_unload: ClassVar[bool] = False
    #: How often `metrics()` can change, in seconds: its values' resolution.
    metrics_period_s: ClassVar[float] = 1.0

    #: The endpoint's name: `EndpointName` in `invoke_endpoint`.
    name: str
    #: Where its model archives are: `s3://<bucket>/endpoints/<name>/models/`.
    prefix_uri: str | None

    @property
    def url(self) -> str | None:
        """Where plain, unsigned HTTP reaches the runtime API
        (`<url>/endpoints/<name>/invocations`); None where only signed boto3 calls do."""
        return None

    @abc.abstractmethod
    def deploy(
        self, *, serving: Serving | None = None, runtime: ServingRuntime | None = None
    ) -> EndpointDescription:
        """Make the endpoint serve the archives under `prefix_uri`; call `wait` before use.

        Args:
            serving (`Serving`, *optional*): how users' requests reach their models; per-user
                models by default. The shared base is one more archive under the prefix.
            runtime (`ServingRuntime`, *optional*): the serving runtime the models were
                packaged with (`Backend.serving_runtime`), which `wait` loads first.
        """

    @abc.abstractmethod
    def wait(self, *, timeout: float | None = None) -> EndpointDescription:
        """Return once the endpoint serves requests, its serving runtime loaded (raise
        `RuntimeError` if it failed or is not deployed, `TimeoutError` past `timeout` s)."""

    @abc.abstractmethod
    def describe(self) -> EndpointDescription:
        """The endpoint's state now (`NOT_DEPLOYED` where it is not)."""

    @abc.abstractmethod
    def runtime_client_options(self) -> dict[str, str]:
        """Keyword arguments of `boto3.client("sagemaker-runtime", ...)` that reach this
        endpoint, plain strings, for a process of its own (the load test's) to build its
        client; credentials come from that process's environment unless given here."""

    def runtime_client(self):
        """A boto3 `sagemaker-runtime` client of this endpoint: a long read timeout (a cold
        model takes a while) and no retry: a generation that timed out may still run, and one
        sent again would be a second; a 429 or 503 says when to retry."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "sagemaker-runtime",
            config=Config(retries={"total_max_attempts": 1}, read_timeout=600),
            **self.runtime_client_options(),
        )

    def loaded_models(self) -> list[str] | None:
        """The loaded models' names, least recently used first; None where the endpoint
        cannot tell."""
        return None

    def evictions(self) -> list[str] | None:
        """The models unloaded to make room, in order; None where the endpoint cannot tell."""
        return None

    def metrics(self) -> dict[str, float]:
        """The endpoint's multi-model metrics under CloudWatch's names (`LoadedModelCount`;
        `ModelCacheHit_sum` hits of `ModelCacheHit_count` invocations; `ModelLoadingTime_sum`
        and `_count`, in microseconds, and the same for `ModelLoadingWaitTime`,
        `ModelDownloadingTime` and `ModelUnloadingTime`); empty where none are known yet."""
        return {}

    def unload_all(self) -> list[str] | None:
        """Unload every loaded model (a cold start on purpose) and return their names; None
        where the endpoint cannot unload on demand (`can_unload` is False)."""
        return None

    def forget(self, model_names: Sequence[str]) -> list[str] | None:
        """Unload user models `model_names` (their user is being deleted) and remove every
        copy the endpoint holds of them (unpacked files, cached adapters); return the models
        unloaded. None where the endpoint cannot unload on demand: model names are never
        reused, so a copy left in its cache is never served to anyone else."""
        return None

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop serving: nothing of the endpoint runs or costs afterwards, and the archives
        stay for `deploy` to serve again. Safe to call twice."""
