"""The SaaS API: the FastAPI app in Lambda (Mangum) behind an API Gateway REST API.

API Gateway proxies every route to the function; the app authenticates each request itself
(`Authorization: Bearer <key>`, keys stored hashed) and checks that a user only reaches their
own models. API Gateway adds what the app cannot: stage throttling, access logs, tracing.

The stage's throttle is one bucket for every caller, so `GET /health`, the one route without a
key, gets a resource and a lower throttle of its own: anonymous health checks cannot use up
the tenants' requests. The app's own quotas (per tenant, per address, for the admin) are
counted in the metadata table, which the function may update.

API Gateway ends an integration after 29 seconds (its default limit, raised only through a
quota request), whatever the function's timeout: a generation that takes longer answers 504
while the function finishes its work.
"""

from __future__ import annotations

from aws_cdk import Duration, RemovalPolicy, Stack
from aws_cdk import aws_apigateway as apigw
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from constructs import Construct

from workshop_infra.endpoint import adapters_prefix, models_prefix
from workshop_infra.functions import LOG_RETENTION, PythonFunction
from workshop_infra.nag import acknowledge
from workshop_infra.storage import (
    CODE_PREFIX,
    ENDPOINTS_PREFIX,
    JOBS_PREFIX,
    USERS_PREFIX,
    Storage,
)
from workshop_infra.workflow import OnboardingWorkflow

API_HANDLER = "helpers.lambdas.api_handler.handler"
#: The endpoint's `TargetModel`s are the archives of user models, `<user>--<model_id>.tar.gz`.
#: Users' own models (`<user>--<model_id>.tar.gz`); the shared base model is added by name.
TARGET_MODELS = "*--*.tar.gz"
#: What the app's DynamoDB adapters do (`helpers.infra.aws.metadata`, `.quotas`); a
#: transaction is authorized item by item (`ConditionCheckItem`, `PutItem`). Not
#: `grant_read_write_data`: the app reads no stream, never batch-gets, describes or deletes
#: one item (a user's records go in batches).
TABLE_ACTIONS = (
    "dynamodb:GetItem",
    "dynamodb:PutItem",
    "dynamodb:UpdateItem",
    "dynamodb:ConditionCheckItem",
    "dynamodb:BatchWriteItem",
    "dynamodb:Query",
    "dynamodb:Scan",
)
#: `GET /health`'s own throttle (requests per second, burst): monitors call it every few
#: seconds; more than that is a flood that must not reach the tenants' stage throttle.
HEALTH_THROTTLE = (1.0, 2)


class Api(Construct):
    """The API function and its REST API.

    Args:
        scope (`Construct`): the parent.
        construct_id (`str`): this construct's id.
        storage (`Storage`): the bucket and the metadata table.
        code (`lambda_.Code`): the functions' bundle.
        environment (`dict[str, str]`): the `WORKSHOP_*` settings of the app.
        endpoint_name (`str`): the multi-model endpoint the app invokes.
        shared_model (`str`, *optional*): the shared base model the app may invoke too.
        workflow (`OnboardingWorkflow`): the onboarding workflow the app starts and stops.
        timeout (`Duration`): the function's timeout.
        memory_size (`int`): the function's memory in MB.
        throttling_rate_limit (`float`): the stage's steady requests per second.
        throttling_burst_limit (`int`): the stage's burst of requests.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        storage: Storage,
        code: lambda_.Code,
        environment: dict[str, str],
        endpoint_name: str,
        shared_model: str | None,
        workflow: OnboardingWorkflow,
        timeout: Duration,
        memory_size: int,
        throttling_rate_limit: float,
        throttling_burst_limit: int,
    ) -> None:
        super().__init__(scope, construct_id)
        self.handler = PythonFunction(
            self,
            "Handler",
            code=code,
            handler=API_HANDLER,
            environment=environment,
            timeout=timeout,
            memory_size=memory_size,
            description="The workshop's SaaS API (FastAPI with Mangum)",
        )
        function = self.handler.function
        # Records, and the quota counters' conditional UpdateItem, on the table only.
        storage.table.grant(function, *TABLE_ACTIONS)
        storage.grant_objects(
            function, USERS_PREFIX, "s3:GetObject", "s3:PutObject", "s3:DeleteObject"
        )
        storage.grant_objects(function, ENDPOINTS_PREFIX, "s3:GetObject")
        # The training source that each execution's training job downloads.
        storage.grant_objects(function, CODE_PREFIX, "s3:PutObject", "s3:DeleteObject")
        # Deleting a user deletes all of theirs: training outputs, models and adapters.
        storage.grant_objects(function, JOBS_PREFIX, "s3:DeleteObject")
        for prefix in (models_prefix(endpoint_name), adapters_prefix(endpoint_name)):
            storage.grant_objects(function, prefix, "s3:DeleteObject")
        storage.grant_list(function)
        # Onboarding starts an execution per model; deleting a user stops theirs.
        workflow.grant_start_and_stop(function)
        stack = Stack.of(self)
        function.add_to_role_policy(
            iam.PolicyStatement(
                actions=["sagemaker:InvokeEndpoint"],
                resources=[
                    stack.format_arn(
                        service="sagemaker", resource="endpoint", resource_name=endpoint_name
                    )
                ],
                conditions={
                    "StringLike": {
                        "sagemaker:TargetModel": (
                            [TARGET_MODELS, f"{shared_model}.tar.gz"]
                            if shared_model
                            else TARGET_MODELS
                        )
                    }
                },
            )
        )
        self.models_prefix = models_prefix(endpoint_name)

        self.access_logs = logs.LogGroup(
            self, "AccessLogs", retention=LOG_RETENTION, removal_policy=RemovalPolicy.DESTROY
        )
        health_rate, health_burst = HEALTH_THROTTLE
        self.rest_api = apigw.LambdaRestApi(
            self,
            "RestApi",
            # API Gateway's metrics (and the alarms on them) go by this name: one per stack.
            rest_api_name=f"{Stack.of(self).stack_name}-api",
            handler=function,
            proxy=True,
            description="Personalized text-to-image SaaS (the workshop's API)",
            endpoint_types=[apigw.EndpointType.REGIONAL],
            # Uploads and images are binary; Mangum decodes and encodes base64 bodies.
            binary_media_types=["*/*"],
            cloud_watch_role=True,
            deploy_options=apigw.StageOptions(
                # The app's routes carry their version (/v1/...); the stage is the deployment.
                stage_name="prod",
                throttling_rate_limit=throttling_rate_limit,
                throttling_burst_limit=throttling_burst_limit,
                method_options={
                    "/health/GET": apigw.MethodDeploymentOptions(
                        throttling_rate_limit=health_rate,
                        throttling_burst_limit=health_burst,
                    )
                },
                access_log_destination=apigw.LogGroupLogDestination(self.access_logs),
                access_log_format=apigw.AccessLogFormat.json_with_standard_fields(
                    caller=False,
                    http_method=True,
                    ip=True,
                    protocol=True,
                    request_time=True,
                    resource_path=True,
                    response_length=True,
                    status=True,
                    user=False,
                ),
                logging_level=apigw.MethodLoggingLevel.ERROR,
                # Bodies hold users' photos, prompts and API keys: never log them.
                data_trace_enabled=False,
                metrics_enabled=True,
                tracing_enabled=True,
            ),
        )
        # Its own resource, so that the method options above have a method to throttle.
        self.rest_api.root.add_resource("health").add_method("GET")
        self._acknowledge()

    def _acknowledge(self) -> None:
        auth = (
            "The application authenticates every request itself with per-user API keys that "
            "are stored hashed (Authorization: Bearer), and checks that a user only reaches "
            "their own models; API Gateway proxies every route to it."
        )
        acknowledge(self.rest_api, "AwsSolutions-APIG4", auth)
        acknowledge(self.rest_api, "AwsSolutions-COG4", auth)
        acknowledge(
            self.rest_api,
            "AwsSolutions-APIG2",
            "Every route is proxied to FastAPI, which validates each request body and "
            "parameter with pydantic and answers 422 naming the field; a second copy of the "
            "schemas in API Gateway would drift from the app's.",
        )
        acknowledge(
            self.rest_api,
            "AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/"
            "AmazonAPIGatewayPushToCloudWatchLogs]",
            "API Gateway's account-level logging role needs this AWS managed policy, which only "
            "allows writing to CloudWatch Logs; the execution logs that cdk-nag asks for need it.",
        )
        acknowledge(
            self.rest_api,
            "AwsSolutions-APIG3",
            "A workshop stack keeps its cost down without AWS WAF; stage throttling bounds "
            "request rates, and production deployments should associate a web ACL with the "
            "stage.",
        )
