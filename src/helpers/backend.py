"""The composition root: `open_backend(settings)` gives every part the workshop uses.

This module and `helpers.settings` are the only code that names a backend. Everything else
asks a `Backend` for its parts and never branches on which one it got:

```py
from helpers import load_settings
from helpers.backend import open_backend

backend = open_backend(load_settings(backend="local"))
print(backend.provision())            # the bucket and the metadata table exist now
backend.store, backend.metadata       # artifacts and records
backend.quotas                        # the API's quota counters, shared by every process
backend.jobs                          # training jobs (subprocesses, or SageMaker)
backend.onboarding()                  # the driver from photos to an AVAILABLE model
backend.endpoint()                    # the multi-model endpoint
backend.close()
```

| part | `local` | `sagemaker` |
|---|---|---|
| `store` | `infra.local.store` (files) | `infra.aws.store` (S3) |
| `metadata` | `infra.local.metadata` (SQLite) | `infra.aws.metadata` (DynamoDB) |
| `quotas` | `infra.local.quotas` (its own SQLite file) | `infra.aws.quotas` (the same table) |
| `jobs` | `infra.local.jobs` (subprocesses) | `infra.aws.jobs` (SageMaker) |
| `onboarding()` | `services.onboarding` (threads) | the same, or `infra.aws.onboarding` |
| `endpoint()` | `infra.local.endpoint` (Triton) | `infra.aws.endpoint` (SageMaker MME) |

Parts are opened on first use, so a face that needs only the store never imports boto3 (or
torch).
"""

from __future__ import annotations

import abc
import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from helpers.settings import Settings, get_settings

if TYPE_CHECKING:
    from helpers.domain.runtime import ServingRuntime
    from helpers.ports.jobs import TrainingJobs
    from helpers.ports.metadata import MetadataStore
    from helpers.ports.onboarding import Onboarding
    from helpers.ports.quotas import QuotaCounters
    from helpers.ports.store import ArtifactStore

__all__ = ["Backend", "Place", "Provisioned", "open_backend"]


@dataclass(frozen=True)
class Place:
    """Where a resource of the backend is, and what to do when it cannot be used."""

    where: str
    fix: str


@dataclass
class Provisioned:
    """What `Backend.provision` set up, with a line per resource for a notebook to print."""

    store: ArtifactStore
    metadata: MetadataStore
    role_arn: str | None = None
    lines: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join(self.lines)


class Backend(abc.ABC):
    """Every part of one backend, opened on first use.

    Args:
        settings (`Settings`): the backend's settings.
    """

    #: The backend's name, as `Settings.backend` spells it.
    name: ClassVar[str]
    #: Whether AWS credentials (and Node.js, for `cdk deploy`) are needed.
    needs_aws: ClassVar[bool]
    #: Whether the endpoint's instances have a GPU (models are packaged for CUDA).
    gpu_endpoint: ClassVar[bool]

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def __repr__(self) -> str:
        return f"<{type(self).__name__} bucket={self.settings.bucket!r}>"

    # -------------------------------------------------------------------------- parts

    @functools.cached_property
    def store(self) -> ArtifactStore:
        """The artifact store (`helpers.ports.store.ArtifactStore`)."""
        return self._open_store()

    @functools.cached_property
    def metadata(self) -> MetadataStore:
        """The metadata store (`helpers.ports.metadata.MetadataStore`)."""
        return self._open_metadata()

    @functools.cached_property
    def quotas(self) -> QuotaCounters:
        """The API's quota counters (`helpers.ports.quotas.QuotaCounters`)."""
        return self._open_quotas()

    @functools.cached_property
    def jobs(self) -> TrainingJobs:
        """The training jobs (`helpers.ports.jobs.TrainingJobs`); `close()` closes them."""
        return self._open_jobs()

    def onboarding(self, state_machine_arn: str | None = None, client=None) -> Onboarding:
        """The onboarding driver: threads of this process over `jobs`
        (`LocalOnboarding`), or, given the `cdk/` stack's state machine, its executions
        (`StepFunctionsOnboarding`; `client`: a boto3 `stepfunctions` client)."""
        from helpers.services.local_onboarding import LocalOnboarding

        if state_machine_arn:
            return self._state_machine(state_machine_arn, client)
        return LocalOnboarding(
            self.settings,
            self.store,
            self.metadata,
            self.jobs,
            gpu=self.gpu_endpoint,
            runtime=self._runtime_path,
        )

    def _runtime_path(self) -> str:
        """The serving runtime's folder on the endpoint's instances ("" for none): what the
        models that onboarding packages are packaged with."""
        from helpers.domain.paths import endpoint_prefix

        runtime = self.serving_runtime(endpoint_prefix(self.settings.bucket))
        return runtime.path if runtime is not None else ""

    def _state_machine(self, state_machine_arn: str, client) -> Onboarding:
        raise ValueError(f"the {self.name} backend has no onboarding state machine")

    @abc.abstractmethod
    def endpoint(self, **options):
        """The multi-model endpoint, a `helpers.ports.endpoint.Endpoint`: `deploy()` it,
        `wait()`, then `runtime_client()`.

        `options` are the endpoint class's own; both take `name` and `max_loaded_models`
        (which SageMaker ignores: it keeps as many models as fit in an instance's memory).
        """

    def serving_runtime(self, prefix_uri: str) -> ServingRuntime | None:
        """The serving runtime the endpoint's models need (`helpers.services.serving_runtime`),
        packaged on `prefix_uri`; None where the endpoint's own environment has the packages."""
        return None

    # -------------------------------------------------------------------- provisioning

    @abc.abstractmethod
    def store_place(self) -> Place:
        """Where the artifact store is, and the fix when it cannot be created."""

    @abc.abstractmethod
    def metadata_place(self) -> Place:
        """Where the metadata table is, and the fix when it cannot be created."""

    @abc.abstractmethod
    def round_trip_fix(self) -> str:
        """What to do when writing, reading and deleting an object fails."""

    def execution_role(self) -> str | None:
        """The role SageMaker runs as (None where nothing runs on SageMaker)."""
        return None

    def provision(self) -> Provisioned:
        """Create (or find) the bucket and the metadata table; every step is idempotent."""
        self.store.create_bucket(self.settings.bucket)
        self.metadata.create_table()
        self.quotas.prepare()
        role_arn = self.execution_role()
        lines = [
            f"artifact store : {self.store_place().where}",
            f"metadata table : {self.metadata_place().where}",
        ]
        if role_arn:
            lines.append(f"execution role : {role_arn}")
        return Provisioned(self.store, self.metadata, role_arn, lines)

    # --------------------------------------------------------------------------- close

    @abc.abstractmethod
    def _open_store(self) -> ArtifactStore: ...

    @abc.abstractmethod
    def _open_metadata(self) -> MetadataStore: ...

    @abc.abstractmethod
    def _open_quotas(self) -> QuotaCounters: ...

    @abc.abstractmethod
    def _open_jobs(self) -> TrainingJobs: ...

    def close(self) -> None:
        """Close the training jobs if they were opened (local jobs in flight keep running
        and are picked up by the next process)."""
        jobs = self.__dict__.pop("jobs", None)
        close = getattr(jobs, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class LocalBackend(Backend):
    """Everything on this machine: a directory tree, SQLite, subprocesses, Triton."""

    name = "local"
    needs_aws = False
    gpu_endpoint = False

    def _open_store(self) -> ArtifactStore:
        from helpers.infra.local.store import LocalArtifactStore

        return LocalArtifactStore(self.settings.store_root)

    def _open_metadata(self) -> MetadataStore:
        from helpers.infra.local.metadata import SqliteMetadataStore

        return SqliteMetadataStore(self.settings.metadata_path)

    def _open_quotas(self) -> QuotaCounters:
        from helpers.infra.local.quotas import SqliteQuotaCounters

        return SqliteQuotaCounters(self.settings.quotas_path)

    def _open_jobs(self) -> TrainingJobs:
        from helpers.infra.local.jobs import LocalTrainingJobs

        return LocalTrainingJobs(self.settings, self.store, self.metadata)

    def endpoint(self, **options):
        """`LocalEndpoint` on the settings' ports (`options`: `max_loaded_models`, `name`,
        ...); `deploy()` (or `start()`) it."""
        from helpers.infra.local.endpoint import LocalEndpoint

        return LocalEndpoint.from_settings(self.settings, self.store, **options)

    def store_place(self) -> Place:
        settings = self.settings
        return Place(
            f"{settings.store_root / settings.bucket}  (s3://{settings.bucket}/...)",
            f"make {settings.work_dir} writable, or set WORKSHOP_WORK_DIR (the notebook's "
            "work_dir parameter) to a writable directory",
        )

    def metadata_place(self) -> Place:
        settings = self.settings
        return Place(
            f"SQLite {settings.metadata_path}",
            f"make {settings.work_dir} writable, or set WORKSHOP_WORK_DIR to a writable "
            f"directory; if {settings.metadata_path.name} is damaged, move it away and run again",
        )

    def round_trip_fix(self) -> str:
        return f"check free disk space and permissions under {self.settings.store_root}"


class SageMakerBackend(Backend):
    """AWS: S3, DynamoDB, SageMaker training jobs, a SageMaker multi-model endpoint."""

    name = "sagemaker"
    needs_aws = True
    gpu_endpoint = True  # the endpoint's ml.g5 instances

    def _open_store(self) -> ArtifactStore:
        from helpers.infra.aws.store import S3ArtifactStore

        return S3ArtifactStore(self.settings.region)

    def _open_metadata(self) -> MetadataStore:
        from helpers.infra.aws.metadata import DynamoDbMetadataStore

        return DynamoDbMetadataStore(self.settings.table_name, self.settings.region)

    def _open_quotas(self) -> QuotaCounters:
        from helpers.infra.aws.quotas import DynamoDbQuotaCounters

        return DynamoDbQuotaCounters(self.settings.table_name, self.settings.region)

    def _open_jobs(self) -> TrainingJobs:
        from helpers.infra.aws.jobs import SageMakerTrainingJobs

        # Without WORKSHOP_ROLE_ARN, the role this session runs as (SageMaker Studio's).
        return SageMakerTrainingJobs(
            self.settings, self.store, self.metadata, execution_role=self.execution_role
        )

    def _state_machine(self, state_machine_arn: str, client) -> Onboarding:
        from helpers.infra.aws.jobs import SageMakerTrainingJobs
        from helpers.infra.aws.onboarding import StepFunctionsOnboarding
        from helpers.services.onboarding import training_request

        return StepFunctionsOnboarding(
            self.settings,
            self.store,
            state_machine_arn,
            # Builds each execution's job configuration; the state machine records the jobs.
            SageMakerTrainingJobs(self.settings, self.store, None),
            functools.partial(training_request, self.settings),
            client=client,
        )

    def endpoint(self, **options):
        """`SageMakerEndpoint` on the settings' bucket and region with the execution role
        (`options`: its `name`, `instance_type`, `client`, `runtime`, `image_uri`, ...; an
        ignored `max_loaded_models`)."""
        from helpers.infra.aws.endpoint import SageMakerEndpoint

        # Without WORKSHOP_ROLE_ARN, the role this session runs as (SageMaker Studio's).
        if not options.get("role_arn"):
            options["role_arn"] = self.settings.role_arn or self.execution_role()
        return SageMakerEndpoint.from_settings(self.settings, **options)

    def serving_runtime(self, prefix_uri: str) -> ServingRuntime | None:
        # SageMaker's Triton image lacks torch and diffusers: the runtime brings them (and the
        # base model, when it is a directory).
        from helpers.services.serving_runtime import runtime_for

        return runtime_for(
            self.store, prefix_uri, self.settings.work_dir, str(self.settings.base_model)
        )

    def execution_role(self) -> str | None:
        from helpers.infra.aws.roles import resolve_execution_role

        return resolve_execution_role(self.settings)

    def store_place(self) -> Place:
        settings = self.settings
        return Place(
            f"s3://{settings.bucket} in {settings.region} (encrypted, private)",
            "let this session create and configure the bucket (s3:CreateBucket, "
            "s3:PutEncryptionConfiguration, s3:PutBucketPublicAccessBlock; the README's "
            "'Running it in SageMaker Studio' lists every permission); names are global, so a "
            "taken one needs another name: set WORKSHOP_BUCKET (the notebook's bucket parameter)",
        )

    def metadata_place(self) -> Place:
        settings = self.settings
        return Place(
            f"DynamoDB {settings.table_name} in {settings.region}",
            "let this session create and describe the table (dynamodb:CreateTable, "
            "dynamodb:DescribeTable, dynamodb:UpdateContinuousBackups, "
            "dynamodb:DescribeTimeToLive, dynamodb:UpdateTimeToLive; the README's "
            "'Running it in SageMaker Studio' lists every permission)",
        )

    def round_trip_fix(self) -> str:
        return (
            "let this session call s3:PutObject, s3:GetObject, s3:ListBucket and "
            f"s3:DeleteObject on {self.settings.bucket}"
        )


BACKENDS: dict[str, type[Backend]] = {
    LocalBackend.name: LocalBackend,
    SageMakerBackend.name: SageMakerBackend,
}


def open_backend(settings: Settings | None = None) -> Backend:
    """The backend `settings.backend` names (`get_settings()` when not given)."""
    settings = settings or get_settings()
    try:
        return BACKENDS[settings.backend](settings)
    except KeyError:
        raise ValueError(
            f"backend must be one of {sorted(BACKENDS)}, got {settings.backend!r}"
        ) from None
