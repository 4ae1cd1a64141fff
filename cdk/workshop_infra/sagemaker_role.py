"""The SageMaker execution role: what training jobs and the endpoint may do, and no more."""

from __future__ import annotations

from aws_cdk import ArnFormat, Stack
from aws_cdk import aws_iam as iam
from constructs import Construct

from helpers.infra.aws.endpoint import triton_image_uri
from helpers.infra.aws.jobs import training_image_uri
from workshop_infra.nag import acknowledge, wildcard_resource
from workshop_infra.storage import (
    BASE_MODELS_PREFIX,
    CODE_PREFIX,
    ENDPOINTS_PREFIX,
    JOBS_PREFIX,
    USERS_PREFIX,
    Storage,
)

#: Where SageMaker writes training jobs' and endpoints' logs and metrics.
SAGEMAKER_LOG_GROUPS = "/aws/sagemaker/*"
SAGEMAKER_METRICS_NAMESPACE = "/aws/sagemaker/*"


def ecr_repository(image_uri: str) -> tuple[str, str]:
    """`(account, repository)` of an ECR image URI `<account>.dkr.ecr.<region>...com/<repo>:<tag>`.

    Raises:
        ValueError: when `image_uri` is not an ECR image URI.
    """
    host, _, path = image_uri.partition("/")
    account = host.split(".", 1)[0]
    repository = path.split(":", 1)[0].split("@", 1)[0]
    if not account.isdigit() or ".dkr.ecr." not in host or not repository:
        raise ValueError(f"image_uri must be an ECR image URI, got {image_uri!r}")
    return account, repository


class SageMakerExecutionRole(Construct):
    """The role SageMaker assumes to run the training jobs and the multi-model endpoint.

    It reads users' photos, training code, uploaded base models and the endpoint's models,
    writes training outputs, pulls the Hugging Face training image and the Triton image, and
    writes logs and metrics.

    Args:
        scope (`Construct`): the parent.
        construct_id (`str`): this construct's id.
        storage (`Storage`): the artifact bucket.
    """

    def __init__(self, scope: Construct, construct_id: str, storage: Storage) -> None:
        super().__init__(scope, construct_id)
        stack = Stack.of(self)
        self.role = iam.Role(
            self,
            "Role",
            assumed_by=iam.ServicePrincipal("sagemaker.amazonaws.com"),
            description="SageMaker training jobs and the multi-model endpoint of the workshop",
        )
        for prefix in (USERS_PREFIX, CODE_PREFIX, BASE_MODELS_PREFIX, ENDPOINTS_PREFIX):
            storage.grant_objects(self.role, prefix, "s3:GetObject")
        # Outputs, and with spot training the checkpoints it resumes from.
        storage.grant_objects(self.role, JOBS_PREFIX, "s3:GetObject", "s3:PutObject")
        storage.grant_list(self.role)

        # The images' repositories live in AWS's account; any region uses the same names.
        repositories = [
            stack.format_arn(
                service="ecr", account=account, resource="repository", resource_name=name
            )
            for account, name in (
                ecr_repository(training_image_uri("us-east-1")),
                ecr_repository(triton_image_uri("us-east-1")),
            )
        ]
        self._image_pull = iam.PolicyStatement(
            actions=[
                "ecr:BatchCheckLayerAvailability",
                "ecr:BatchGetImage",
                "ecr:GetDownloadUrlForLayer",
            ],
            resources=repositories,
        )
        self.role.add_to_policy(self._image_pull)
        self.role.add_to_policy(
            iam.PolicyStatement(actions=["ecr:GetAuthorizationToken"], resources=["*"])
        )
        log_groups = stack.format_arn(
            service="logs",
            resource="log-group",
            resource_name=SAGEMAKER_LOG_GROUPS,
            arn_format=ArnFormat.COLON_RESOURCE_NAME,
        )
        self.role.add_to_policy(
            iam.PolicyStatement(
                actions=[
                    "logs:CreateLogGroup",
                    "logs:CreateLogStream",
                    "logs:DescribeLogStreams",
                    "logs:PutLogEvents",
                ],
                resources=[log_groups],
            )
        )
        self.role.add_to_policy(
            iam.PolicyStatement(
                actions=["cloudwatch:PutMetricData"],
                resources=["*"],
                conditions={"StringLike": {"cloudwatch:namespace": SAGEMAKER_METRICS_NAMESPACE}},
            )
        )
        acknowledge(
            self.role,
            wildcard_resource("*"),
            "ecr:GetAuthorizationToken has no resource-level permissions, and "
            "cloudwatch:PutMetricData has none either; it is limited to SageMaker's metric "
            "namespaces by the cloudwatch:namespace condition.",
        )
        acknowledge(
            self.role,
            wildcard_resource(
                "arn:<AWS::Partition>:logs:<AWS::Region>:<AWS::AccountId>:log-group:"
                + SAGEMAKER_LOG_GROUPS
            ),
            "SageMaker writes each training job's and endpoint's logs to streams named after "
            "the job or endpoint, in its own /aws/sagemaker/ log groups; the names are not "
            "known before the jobs exist.",
        )

    def allow_pull(self, repository_arn: str) -> None:
        """Let SageMaker pull the images of one more ECR repository (the serving image's):
        its ARN joins the pull statement; `ecr:GetAuthorizationToken` is granted already."""
        self._image_pull.add_resources(repository_arn)
