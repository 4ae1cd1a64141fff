"""Provision the workshop's storage: the artifact bucket, the metadata table, the SageMaker role.

Locally that is a directory and a SQLite file; on AWS an encrypted, private S3 bucket, a
DynamoDB table and a check of the execution role. Every step is idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from helpers.metadata import MetadataStore, open_metadata
from helpers.settings import Settings
from helpers.store import ArtifactStore, open_store


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
