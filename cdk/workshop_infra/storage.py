"""Where the workshop keeps things: one S3 bucket and one DynamoDB table.

The bucket holds every artifact under a prefix per kind, and the grants of the other
constructs are made per prefix, never for the whole bucket:

    users/<user_id>/...                      users' photos (the API)
    code/<job_name>/sourcedir.tar.gz         training source code (the API writes it)
    jobs/<job_name>/output/model.tar.gz      training outputs (SageMaker writes them)
    base-models/<name>-<hash>/...            a local base model, uploaded for the jobs
    endpoints/<endpoint>/models/<name>.tar.gz  the multi-model endpoint's models

The table has the item shape of `helpers.domain.records`: partition key `user_id`, sort key `sk`.
"""

from __future__ import annotations

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_iam as iam
from aws_cdk import aws_s3 as s3
from constructs import Construct

from workshop_infra.nag import acknowledge, arn_reference, wildcard_resource

USERS_PREFIX = "users/"
CODE_PREFIX = "code/"
JOBS_PREFIX = "jobs/"
#: A local base model uploaded for the training jobs' `base_model` channel
#: (`helpers.domain.paths.base_models_prefix`).
BASE_MODELS_PREFIX = "base-models/"
ENDPOINTS_PREFIX = "endpoints/"


class Storage(Construct):
    """The artifact bucket (with an access-log bucket) and the metadata table.

    Both are retained when the stack is deleted: they hold users' photos and models.

    Args:
        scope (`Construct`): the parent.
        construct_id (`str`): this construct's id.
    """

    def __init__(self, scope: Construct, construct_id: str) -> None:
        super().__init__(scope, construct_id)
        # S3 delivers access logs under a bucket policy, not the legacy log-delivery ACL, so
        # both buckets keep ACLs disabled (this flag is off unless an app turns it on).
        self.node.set_context("@aws-cdk/aws-s3:serverAccessLogsUseBucketPolicy", True)
        self.access_logs = s3.Bucket(
            self,
            "AccessLogs",
            encryption=s3.BucketEncryption.S3_MANAGED,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            enforce_ssl=True,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            lifecycle_rules=[s3.LifecycleRule(expiration=Duration.days(90))],
            removal_policy=RemovalPolicy.RETAIN,
        )
        self.bucket = s3.Bucket(
            self,
            "Artifacts",
            encryption=s3.BucketEncryption.S3_MANAGED,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            enforce_ssl=True,
            server_access_logs_bucket=self.access_logs,
            server_access_logs_prefix="artifacts/",
            removal_policy=RemovalPolicy.RETAIN,
        )
        self.table = dynamodb.Table(
            self,
            "Metadata",
            partition_key=dynamodb.Attribute(name="user_id", type=dynamodb.AttributeType.STRING),
            sort_key=dynamodb.Attribute(name="sk", type=dynamodb.AttributeType.STRING),
            billing_mode=dynamodb.BillingMode.PAY_PER_REQUEST,
            # The API's quota counters (`helpers.infra.aws.quotas`) expire by themselves.
            time_to_live_attribute="expires_at",
            point_in_time_recovery_specification=dynamodb.PointInTimeRecoverySpecification(
                point_in_time_recovery_enabled=True
            ),
            removal_policy=RemovalPolicy.RETAIN,
        )

    def uri(self, key: str) -> str:
        """The `s3://` URI of `key` in the artifact bucket (a token until deployment)."""
        return f"s3://{self.bucket.bucket_name}/{key}"

    def objects_arn(self, prefix: str) -> str:
        """The ARN of every object under `prefix` (`"users/"` -> `arn:...:bucket/users/*`)."""
        return self.bucket.arn_for_objects(f"{prefix}*")

    def grant_objects(self, grantee: iam.IGrantable, prefix: str, *actions: str) -> None:
        """Allow exactly `actions` (e.g. `"s3:GetObject"`) on the objects under `prefix`.

        Args:
            grantee (`iam.IGrantable`): a role, or a function (its role).
            prefix (`str`): a key prefix ending in `/`, e.g. `"users/"`.
            *actions (`str`): S3 object actions, none with a wildcard.
        """
        if not prefix.endswith("/") or any("*" in action for action in actions):
            raise ValueError(f"prefix must end in '/' and actions name no wildcard: {prefix!r}")
        principal = grantee.grant_principal
        principal.add_to_principal_policy(
            iam.PolicyStatement(actions=list(actions), resources=[self.objects_arn(prefix)])
        )
        acknowledge(
            principal,
            wildcard_resource(f"{arn_reference(self.bucket)}/{prefix}*"),
            f"Access is limited to the objects under {prefix}, the part of the artifact bucket "
            "this principal works on; S3 object ARNs name a key prefix with a wildcard.",
        )

    def grant_list(self, grantee: iam.IGrantable) -> None:
        """Allow listing the bucket's keys.

        Also needed to tell a missing object from a forbidden one: without `s3:ListBucket`,
        S3 answers 403 instead of 404 to `HeadObject` on a missing key, and
        `ArtifactStore.exists` would raise instead of answering False. `HeadObject` carries no
        `s3:prefix`, so the permission cannot be narrowed to a prefix.
        """
        grantee.grant_principal.add_to_principal_policy(
            iam.PolicyStatement(actions=["s3:ListBucket"], resources=[self.bucket.bucket_arn])
        )
