"""The workshop's serving image, built in AWS: no Docker on the machine that deploys.

`model_code/serving_image/Dockerfile` extends SageMaker's Triton image with the serving
packages. Synthesis uploads its build context, the `model_code/` folder reduced to the
Dockerfile and what it copies, as an S3 asset (a zip; CDK's own upload, no Docker); a CodeBuild
project (privileged: `docker build` needs it) logs in to the Triton image's registry and to a
private ECR repository, builds with the region's Triton image as `BASE_IMAGE`, and pushes
`<repository>:<tag>`, the tag derived from the asset's hash: a new Dockerfile or new pins make
a new tag, so the endpoint's model changes with them, and nothing else does.

A custom resource (`custom_resources.Provider`, handlers in `image_build_handler.py`) starts
the build and waits for it, so CloudFormation creates the SageMaker model only once the image
is pushed, and a failed build fails the deployment with CodeBuild's reason.
"""

from __future__ import annotations

from pathlib import Path

from aws_cdk import CustomResource, Duration, RemovalPolicy, Stack
from aws_cdk import aws_codebuild as codebuild
from aws_cdk import aws_ecr as ecr
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3_assets as s3_assets
from aws_cdk import aws_stepfunctions as sfn
from aws_cdk import custom_resources as cr
from constructs import Construct

from helpers.infra.aws.endpoint import triton_image_uri
from workshop_infra.nag import acknowledge, arn_reference, wildcard_resource
from workshop_infra.sagemaker_role import ecr_repository

HERE = Path(__file__).resolve().parent
#: The build context (`docker build <context>`), and the Dockerfile in it.
CONTEXT_DIR = HERE.parents[1] / "model_code"
DOCKERFILE = "serving_image/Dockerfile"
#: The Dockerfile's `ARG` that names the image it extends.
BASE_IMAGE_ARG = "BASE_IMAGE"
#: Images kept in the repository: the one serving and a few to roll back to.
KEPT_IMAGES = 5
#: CodeBuild's limits for one build (pulling the Triton image, installing CUDA torch and
#: pushing every layer to the new repository takes about 10-30 minutes), and the custom
#: resource's, which must cover a queued and a full build plus the polling.
BUILD_TIMEOUT = Duration.minutes(60)
QUEUED_TIMEOUT = Duration.minutes(10)
TOTAL_TIMEOUT = Duration.minutes(75)
#: How often `is_complete` asks CodeBuild.
QUERY_INTERVAL = Duration.seconds(30)
LOG_RETENTION = logs.RetentionDays.ONE_MONTH
HANDLER_MODULE = "image_build_handler"
#: The handlers' runtime: boto3 is all they import.
HANDLER_RUNTIME = lambda_.Runtime.PYTHON_3_14

#: The build: log in to both registries, build the context with the region's Triton image,
#: push. Every value comes from the project's environment, so this text never changes.
BUILD_SPEC = {
    "version": "0.2",
    "phases": {
        "pre_build": {
            "commands": [
                'aws s3 cp "$SOURCE_URI" context.zip --only-show-errors',
                "unzip -q context.zip -d context",
                "aws ecr get-login-password --region $AWS_REGION"
                " | docker login --username AWS --password-stdin $BASE_REGISTRY",
                "aws ecr get-login-password --region $AWS_REGION"
                " | docker login --username AWS --password-stdin $REPOSITORY_REGISTRY",
            ]
        },
        # Build and push in one phase: CodeBuild runs post_build even after a failed build.
        "build": {
            "commands": [
                f"docker build --file context/$DOCKERFILE --build-arg {BASE_IMAGE_ARG}=$BASE_IMAGE"
                " --tag $REPOSITORY_URI:$IMAGE_TAG context",
                "docker push $REPOSITORY_URI:$IMAGE_TAG",
            ]
        },
    },
}


def copied_sources(context: Path, dockerfile: str) -> list[str]:
    """The paths of `context` that the `COPY` and `ADD` instructions of `dockerfile` (a path
    inside `context`) read, relative to `context`.

    Raises:
        ValueError: naming the instruction whose source is absolute, leaves the context, or is
            not there.
    """
    text = (context / dockerfile).read_text().replace("\\\n", " ")
    sources = []
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].upper() not in ("COPY", "ADD"):
            continue
        arguments = [w for w in words[1:] if not w.startswith("--")]
        if any(w.startswith("--from") for w in words[1:]):
            continue  # from another stage or image, not from the context
        for source in arguments[:-1]:
            path = Path(source)
            if path.is_absolute() or ".." in path.parts or not (context / path).exists():
                raise ValueError(
                    f"{dockerfile}: {line.strip()!r} copies {source!r}, which must be a path "
                    f"inside the build context {context}"
                )
            sources.append(path.as_posix().rstrip("/"))
    return sources


def context_excludes(context: Path, dockerfile: str) -> list[str]:
    """The asset's exclude patterns that keep only the Dockerfile and what it copies, so that
    the image's tag (the asset's hash) changes with them and with nothing else: an edit to the
    training script must not rebuild the image and replace the endpoint's instances."""
    keep = [dockerfile, *copied_sources(context, dockerfile)]
    patterns = ["*"]
    for path in keep:
        parts = path.split("/")
        patterns += [f"!{'/'.join(parts[: i + 1])}" for i in range(len(parts))]
        if (context / path).is_dir():
            patterns.append(f"!{path}/**")
    return [*dict.fromkeys(patterns), "**/__pycache__", "**/*.pyc"]


def registry(image_uri: str) -> str:
    """The registry host of an image URI (`<account>.dkr.ecr.<region>.<domain>`)."""
    return image_uri.split("/", 1)[0]


class ServingImage(Construct):
    """The serving image: its source asset, repository, build project and the build itself.

    Args:
        scope (`Construct`): the parent.
        construct_id (`str`): this construct's id.
        context_dir (`Path`, defaults to `model_code/`): the build context.
        dockerfile (`str`, defaults to `"serving_image/Dockerfile"`): inside the context.

    Raises:
        ValueError: when the Dockerfile is missing, or copies a path from outside the context.

    Attributes:
        image_uri (`str`): `<repository uri>:<tag>`, what the endpoint's model runs.
        tag (`str`): `serving-` and the first 16 hex digits of the context's hash.
        build (`CustomResource`): the finished build; depend on it to use the image.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        context_dir: Path = CONTEXT_DIR,
        dockerfile: str = DOCKERFILE,
    ) -> None:
        super().__init__(scope, construct_id)
        context_dir = Path(context_dir)
        if not (context_dir / dockerfile).is_file():
            raise ValueError(f"no Dockerfile at {context_dir / dockerfile}")
        stack = Stack.of(self)
        # The build context, reduced to what the build reads.
        self.source = s3_assets.Asset(
            self, "Source", path=str(context_dir), exclude=context_excludes(context_dir, dockerfile)
        )
        self.tag = f"serving-{self.source.asset_hash[:16]}"
        self.repository = ecr.Repository(
            self,
            "Repository",
            image_scan_on_push=True,
            lifecycle_rules=[
                ecr.LifecycleRule(
                    description=f"keep the newest {KEPT_IMAGES} images",
                    max_image_count=KEPT_IMAGES,
                )
            ],
            # Images are rebuilt from the checkout in minutes: they go with the stack.
            removal_policy=RemovalPolicy.DESTROY,
            empty_on_delete=True,
        )
        self.image_uri = self.repository.repository_uri_for_tag(self.tag)
        self.base_image = triton_image_uri(stack.region)

        self.log_group = logs.LogGroup(
            self, "BuildLogs", retention=LOG_RETENTION, removal_policy=RemovalPolicy.DESTROY
        )
        self.project = codebuild.Project(
            self,
            "Build",
            description="Builds the workshop's serving image (SageMaker Triton + serving packages)",
            build_spec=codebuild.BuildSpec.from_object(BUILD_SPEC),
            environment=codebuild.BuildEnvironment(
                build_image=codebuild.LinuxBuildImage.STANDARD_7_0,
                # 7 GB of memory and 128 GB of disk: room for the Triton and torch layers.
                compute_type=codebuild.ComputeType.MEDIUM,
                # docker build runs Docker's daemon, which needs privileged mode.
                privileged=True,
            ),
            environment_variables={
                name: codebuild.BuildEnvironmentVariable(value=value)
                for name, value in {
                    "SOURCE_URI": self.source.s3_object_url,
                    "DOCKERFILE": dockerfile,
                    "BASE_IMAGE": self.base_image,
                    "BASE_REGISTRY": registry(self.base_image),
                    "REPOSITORY_URI": self.repository.repository_uri,
                    "REPOSITORY_REGISTRY": registry(self.repository.repository_uri),
                    "IMAGE_TAG": self.tag,
                }.items()
            },
            # CodeBuild's default, the account's AWS managed key for S3, named explicitly.
            encryption_key=kms.Alias.from_alias_name(self, "S3Key", "alias/aws/s3"),
            logging=codebuild.LoggingOptions(
                cloud_watch=codebuild.CloudWatchLoggingOptions(log_group=self.log_group)
            ),
            timeout=BUILD_TIMEOUT,
            queued_timeout=QUEUED_TIMEOUT,
        )
        self._grant_build()
        self.build = self._build_resource()
        self._acknowledge()

    def _grant_build(self) -> None:
        """The context's one object, the Triton image's repository, and this repository."""
        role = self.project.role
        role.add_to_principal_policy(
            iam.PolicyStatement(
                actions=["s3:GetObject"],
                resources=[self.source.bucket.arn_for_objects(self.source.s3_object_key)],
            )
        )
        account, name = ecr_repository(self.base_image)
        role.add_to_principal_policy(
            iam.PolicyStatement(
                actions=[
                    "ecr:BatchCheckLayerAvailability",
                    "ecr:BatchGetImage",
                    "ecr:GetDownloadUrlForLayer",
                ],
                resources=[
                    Stack.of(self).format_arn(
                        service="ecr", account=account, resource="repository", resource_name=name
                    )
                ],
            )
        )
        self.repository.grant_pull_push(role)

    def _handler(self, construct_id: str, function: str, description: str) -> lambda_.Function:
        log_group = logs.LogGroup(
            self,
            f"{construct_id}Logs",
            retention=LOG_RETENTION,
            removal_policy=RemovalPolicy.DESTROY,
        )
        role = iam.Role(
            self,
            f"{construct_id}Role",
            assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
            description=description,
        )
        role.add_to_policy(
            iam.PolicyStatement(
                actions=["logs:CreateLogStream", "logs:PutLogEvents"],
                resources=[log_group.log_group_arn],
            )
        )
        return lambda_.Function(
            self,
            construct_id,
            runtime=HANDLER_RUNTIME,
            architecture=lambda_.Architecture.ARM_64,
            # This one file: the handlers need only boto3, which the runtime has.
            code=lambda_.Code.from_asset(str(HERE), exclude=["*", f"!{HANDLER_MODULE}.py"]),
            handler=f"{HANDLER_MODULE}.{function}",
            timeout=Duration.minutes(1),
            memory_size=256,
            role=role,
            log_group=log_group,
            description=description,
        )

    def _build_resource(self) -> CustomResource:
        on_event = self._handler(
            "StartBuild", "on_event", "Starts the serving image's CodeBuild build"
        )
        is_complete = self._handler(
            "BuildComplete", "is_complete", "Follows the serving image's CodeBuild build"
        )
        on_event.add_to_role_policy(
            iam.PolicyStatement(
                actions=["codebuild:StartBuild"], resources=[self.project.project_arn]
            )
        )
        is_complete.add_to_role_policy(
            iam.PolicyStatement(
                actions=["codebuild:BatchGetBuilds"], resources=[self.project.project_arn]
            )
        )
        self.provider_logs = logs.LogGroup(
            self, "ProviderLogs", retention=LOG_RETENTION, removal_policy=RemovalPolicy.DESTROY
        )
        self.provider = cr.Provider(
            self,
            "Provider",
            on_event_handler=on_event,
            is_complete_handler=is_complete,
            query_interval=QUERY_INTERVAL,
            total_timeout=TOTAL_TIMEOUT,
            log_group=self.provider_logs,
            disable_waiter_state_machine_logging=False,
            waiter_state_machine_log_options=cr.LogOptions(
                destination=self.provider_logs, level=sfn.LogLevel.ALL
            ),
        )
        self.handlers = (on_event, is_complete)
        return CustomResource(
            self,
            "ImageBuild",
            service_token=self.provider.service_token,
            resource_type="Custom::ServingImageBuild",
            properties={
                "ProjectName": self.project.project_name,
                "ImageUri": self.image_uri,
                "ImageTag": self.tag,
            },
        )

    def _acknowledge(self) -> None:
        acknowledge(
            self.project,
            "AwsSolutions-CB3",
            "docker build runs Docker's daemon inside the build container, which CodeBuild "
            "allows only in privileged mode; the project builds one Dockerfile from this "
            "stack's own asset and pushes to this stack's repository only.",
        )
        acknowledge(
            self.project.role,
            wildcard_resource(
                "arn:<AWS::Partition>:logs:<AWS::Region>:<AWS::AccountId>:log-group:/aws/"
                f"codebuild/<{self._id(self.project)}>:*"
            ),
            "CodeBuild's default log group of this one project, which CDK grants to every "
            "project; its logs go to the project's own log group with a retention.",
        )
        acknowledge(
            self.project.role,
            wildcard_resource(
                "arn:<AWS::Partition>:codebuild:<AWS::Region>:<AWS::AccountId>:report-group/"
                f"<{self._id(self.project)}>-*"
            ),
            "CDK grants every project its own test report groups, named after the project; "
            "this build writes no reports, and no other project's groups match.",
        )
        acknowledge(
            self.project.role,
            wildcard_resource("*"),
            "ecr:GetAuthorizationToken has no resource-level permissions: logging in to the "
            "Triton image's registry and to this stack's repository needs it on every resource.",
        )
        acknowledge(
            self.provider,
            "AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/"
            "AWSLambdaBasicExecutionRole]",
            "The custom resource provider framework of the CDK gives its own functions this "
            "AWS managed policy, which only writes their logs to CloudWatch Logs.",
        )
        framework = [
            self.provider.node.find_child(name)
            for name in ("framework-isComplete", "framework-onTimeout")
        ]
        for function in [*self.handlers, *framework]:
            acknowledge(
                self.provider,
                wildcard_resource(f"{arn_reference(function)}:*"),
                "The provider framework invokes its own and this stack's build handlers by any "
                "of their versions or aliases: the ARN with ':*' names one function only.",
            )
        acknowledge(
            self.provider,
            wildcard_resource("*"),
            "The provider framework's waiter state machine logs to its log group through "
            "log delivery (logs:CreateLogDelivery and related calls), which has no "
            "resource-level permissions.",
        )
        acknowledge(
            self.provider,
            "AwsSolutions-SF2",
            "The provider framework's waiter state machine only polls the build handler every "
            "30 seconds; the framework offers no X-Ray option and the build's own log tells "
            "what happened.",
        )

    @staticmethod
    def _id(construct: Construct) -> str:
        resource = construct.node.default_child or construct
        return Stack.of(construct).resolve(resource.logical_id)
