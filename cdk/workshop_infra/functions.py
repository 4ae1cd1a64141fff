"""The stack's Python Lambda functions: one role and one log group each, nothing shared."""

from __future__ import annotations

from collections.abc import Mapping

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from constructs import Construct

from workshop_infra.bundling import RUNTIME
from workshop_infra.nag import acknowledge

LOG_RETENTION = logs.RetentionDays.ONE_MONTH


class PythonFunction(Construct):
    """A Lambda function on the bundle's runtime with its own role and log group.

    The role starts with nothing but writing to the function's log group (not the managed
    `AWSLambdaBasicExecutionRole`, which may create any log group); callers grant the rest.

    Args:
        scope (`Construct`): the parent.
        construct_id (`str`): this construct's id.
        code (`lambda_.Code`): the bundle (`workshop_infra.bundling.lambda_code`).
        handler (`str`): `module.function` inside the bundle.
        environment (`Mapping[str, str]`): the function's environment variables.
        timeout (`Duration`): how long one invocation may run.
        memory_size (`int`): MB of memory (CPU grows with it).
        description (`str`): what the function does.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        code: lambda_.Code,
        handler: str,
        environment: Mapping[str, str],
        timeout: Duration,
        memory_size: int,
        description: str,
    ) -> None:
        super().__init__(scope, construct_id)
        self.log_group = logs.LogGroup(
            self, "Logs", retention=LOG_RETENTION, removal_policy=RemovalPolicy.DESTROY
        )
        self.role = iam.Role(
            self,
            "Role",
            assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
            description=description,
        )
        self.role.add_to_policy(
            iam.PolicyStatement(
                actions=["logs:CreateLogStream", "logs:PutLogEvents"],
                resources=[self.log_group.log_group_arn],
            )
        )
        self.function = lambda_.Function(
            self,
            "Function",
            runtime=RUNTIME,
            architecture=lambda_.Architecture.X86_64,
            code=code,
            handler=handler,
            environment=dict(environment),
            timeout=timeout,
            memory_size=memory_size,
            role=self.role,
            log_group=self.log_group,
            description=description,
        )
        acknowledge(
            self.function,
            "AwsSolutions-L1",
            f"The bundle pins numpy 1.26 (Triton's clients need numpy below 2), whose newest "
            f"wheels are for Python 3.12, so the functions run on {RUNTIME.name} on purpose.",
        )
