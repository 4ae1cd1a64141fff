"""Provision the workshop's storage: the artifact bucket, the metadata table, the SageMaker role.

Locally that is a directory and a SQLite file; on AWS an encrypted, private S3 bucket, a
DynamoDB table and a check of the execution role. Every step is idempotent.

`provision` raises on the first problem (for services and tests); `check_provisioning` and
`check_store_round_trip` report each step as a `CheckResult` with the fix, as notebook 01
prints them:

```py
from helpers.workshop.environment import render_checks, require

report = check_provisioning(settings)
print(report)
require(report.results)
```
"""

from __future__ import annotations

from dataclasses import dataclass, field

from helpers.ports.metadata import MetadataStore, open_metadata
from helpers.ports.store import ArtifactStore, open_store
from helpers.settings import Settings
from helpers.workshop.environment import CheckResult, render_checks


@dataclass
class Provisioned:
    """What `provision` set up, with a line per resource for the notebook to print."""

    store: ArtifactStore
    metadata: MetadataStore
    role_arn: str | None = None
    lines: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join(self.lines)


def resolve_execution_role(settings: Settings, session=None) -> str:
    """The SageMaker execution role ARN: `settings.role_arn` if set, checked with IAM; else
    the role of the current session when it runs as a SageMaker role (as in SageMaker Studio).

    Raises:
        ValueError: naming `WORKSHOP_ROLE_ARN` and how to set it, when no role can be found.
    """
    import boto3

    session = session or boto3.Session(region_name=settings.region)
    if settings.role_arn:
        name = settings.role_arn.rsplit("/", 1)[-1]
        try:
            return session.client("iam").get_role(RoleName=name)["Role"]["Arn"]
        except Exception as error:
            raise ValueError(
                f"WORKSHOP_ROLE_ARN {settings.role_arn!r} cannot be read through IAM ({error}); "
                "check the ARN and that this session may call iam:GetRole"
            ) from None
    caller = session.client("sts").get_caller_identity()["Arn"]
    # Studio runs as arn:aws:sts::<account>:assumed-role/<role>/<session>.
    if ":assumed-role/" in caller:
        role = caller.split(":assumed-role/", 1)[1].split("/", 1)[0]
        account = caller.split(":")[4]
        return f"arn:aws:iam::{account}:role/{role}"
    raise ValueError(
        f"this session runs as {caller}, not as a SageMaker execution role: set "
        "WORKSHOP_ROLE_ARN (or the notebook's role_arn parameter) to the ARN of a role that "
        "SageMaker can assume"
    )


def provision(settings: Settings) -> Provisioned:
    """Create (or find) the bucket and the metadata table of `settings`' backend."""
    store = open_store(settings)
    metadata = open_metadata(settings)
    store.create_bucket(settings.bucket)
    metadata.create_table()
    result = Provisioned(store, metadata)
    if settings.backend == "local":
        result.lines += [
            f"artifact store : {settings.store_root / settings.bucket}  (s3://{settings.bucket}/...)",
            f"metadata table : {settings.metadata_path}",
        ]
    else:
        result.role_arn = resolve_execution_role(settings)
        result.lines += [
            f"artifact store : s3://{settings.bucket} in {settings.region} (encrypted, private)",
            f"metadata table : DynamoDB {settings.table_name}",
            f"execution role : {result.role_arn}",
        ]
    return result


@dataclass
class ProvisioningReport:
    """What `check_provisioning` found.

    Args:
        results (`list[CheckResult]`): one per resource (artifact store, metadata table, and
            the execution role on the sagemaker backend).
        provisioned (`Provisioned`, *optional*): what was set up; `None` when a step failed.
    """

    results: list[CheckResult]
    provisioned: Provisioned | None = None

    @property
    def ok(self) -> bool:
        return self.provisioned is not None

    def __str__(self) -> str:
        return render_checks(self.results)


def _failure(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


def _store_check(settings: Settings) -> tuple[CheckResult, ArtifactStore | None]:
    if settings.backend == "local":
        where = f"{settings.store_root / settings.bucket} (s3://{settings.bucket}/...)"
        fix = (
            f"make {settings.work_dir} writable, or set WORKSHOP_WORK_DIR (the notebook's "
            "work_dir parameter) to a writable directory"
        )
    else:
        where = f"s3://{settings.bucket} in {settings.region} (encrypted, private)"
        fix = (
            "let this session create and configure the bucket (s3:CreateBucket, "
            "s3:PutEncryptionConfiguration, s3:PutBucketPublicAccessBlock), or set "
            "WORKSHOP_BUCKET (the notebook's bucket parameter) to a bucket of yours; names are "
            "global, so a taken one needs another name"
        )
    try:
        store = open_store(settings)
        store.create_bucket(settings.bucket)
    except Exception as error:
        return CheckResult("artifact store", False, f"{where}: {_failure(error)}", fix=fix), None
    return CheckResult("artifact store", True, where), store


def _metadata_check(settings: Settings) -> tuple[CheckResult, MetadataStore | None]:
    if settings.backend == "local":
        where = f"SQLite {settings.metadata_path}"
        fix = (
            f"make {settings.work_dir} writable, or set WORKSHOP_WORK_DIR to a writable "
            f"directory; if {settings.metadata_path.name} is damaged, move it away and run again"
        )
    else:
        where = f"DynamoDB {settings.table_name} in {settings.region}"
        fix = (
            "let this session create and describe the table (dynamodb:CreateTable, "
            "dynamodb:DescribeTable, dynamodb:UpdateContinuousBackups), or set "
            "WORKSHOP_TABLE_NAME to a table it may use"
        )
    try:
        metadata = open_metadata(settings)
        metadata.create_table()
    except Exception as error:
        return CheckResult("metadata table", False, f"{where}: {_failure(error)}", fix=fix), None
    return CheckResult("metadata table", True, where), metadata


def _role_check(settings: Settings) -> tuple[CheckResult, str | None]:
    try:
        role_arn = resolve_execution_role(settings)
    except Exception as error:
        detail = str(error) if isinstance(error, ValueError) else _failure(error)
        return (
            CheckResult(
                "execution role",
                False,
                detail,
                fix="set WORKSHOP_ROLE_ARN (the notebook's role_arn parameter) to a role that "
                "SageMaker can assume and this session may read with iam:GetRole, or run in "
                "SageMaker Studio, whose execution role is found by itself",
            ),
            None,
        )
    return CheckResult("execution role", True, role_arn), role_arn


def check_provisioning(settings: Settings) -> ProvisioningReport:
    """`provision` as checks: every step is tried, and none raises.

    Args:
        settings (`Settings`): whose backend, bucket and table to set up.

    Returns:
        `ProvisioningReport`: a result per step with the fix when it failed, and the
        `Provisioned` stores when every step passed.
    """
    store_result, store = _store_check(settings)
    metadata_result, metadata = _metadata_check(settings)
    results = [store_result, metadata_result]
    role_arn = None
    if settings.backend != "local":
        role_result, role_arn = _role_check(settings)
        results.append(role_result)
    if not all(result.ok for result in results):
        return ProvisioningReport(results)
    lines = [f"{result.name:<14} : {result.detail}" for result in results]
    return ProvisioningReport(results, Provisioned(store, metadata, role_arn, lines))


def check_store_round_trip(
    settings: Settings, store: ArtifactStore, key: str = "workshop/hello.txt"
) -> CheckResult:
    """Write, read back, list and delete one small object under `key`.

    Args:
        settings (`Settings`): the bucket (and the backend, for the fix).
        store (`ArtifactStore`): the store to try, e.g. `check_provisioning(...).provisioned.store`.
        key (`str`, defaults to `"workshop/hello.txt"`): the object's key; it is deleted again.
    """
    uri = settings.uri(key)
    data = b"hello from notebook 01"
    if settings.backend == "local":
        fix = f"check free disk space and permissions under {settings.store_root}"
    else:
        fix = (
            "let this session call s3:PutObject, s3:GetObject, s3:ListBucket and "
            f"s3:DeleteObject on {settings.bucket}"
        )
    try:
        store.put_bytes(uri, data)
        back = store.get_bytes(uri)
        listed = uri in store.list(uri.rsplit("/", 1)[0] + "/")
        store.delete(uri)
        gone = not store.exists(uri)
    except Exception as error:
        return CheckResult("store round trip", False, f"{uri}: {_failure(error)}", fix=fix)
    problems = {
        "read back other bytes than were written": back != data,
        "the listing does not show it": not listed,
        "it is still there after delete": not gone,
    }
    found = [problem for problem, happened in problems.items() if happened]
    if found:
        return CheckResult("store round trip", False, f"{uri}: {'; '.join(found)}", fix=fix)
    return CheckResult(
        "store round trip",
        True,
        f"{uri}: wrote {len(data)} bytes, read them back, listed and deleted them",
    )
