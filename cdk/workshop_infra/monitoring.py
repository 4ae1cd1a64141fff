"""Operations: one CloudWatch dashboard and the alarms worth waking someone for.

The dashboard charts the multi-model endpoint (traffic, the model cache, latency, the instances),
the two functions, the onboarding state machine, the table and the REST API. Every alarm's
description says what it means and what to do; with `alarm_email` an encrypted SNS topic emails
each alarm. Names start with the stack's name, so two stacks in one account and region never
share a dashboard or an alarm.

The endpoint is charted and alarmed even when the stack does not create it
(`deploy_endpoint=False`): its name is a prop, notebook 03 creates it under that name, and the
API invokes it by that name. While it does not exist its metrics are missing, which every alarm
reads as OK.

What the endpoint's metrics count (SageMaker's CloudWatch documentation, "Amazon SageMaker AI
metrics in Amazon CloudWatch" and "CloudWatch Metrics for Multi-Model Endpoint Deployments"):

- `Invocation4XXErrors` / `Invocation5XXErrors` (`AWS/SageMaker`): InvokeEndpoint requests for
  which the model's container answered 4xx / 5xx, 1 per such request (so their `Average` is the
  share of requests). SageMaker's own refusals answered before the container, such as
  `ModelNotReadyException` (HTTP 429: a multi-model endpoint is still downloading or loading the
  target model) or a throttled request, are not documented as counted there; the API answers
  them 503 `model_loading` / `endpoint_unavailable`, which API Gateway counts as `5XXError`,
  and `ModelLoadingWaitTime` shows the waits behind them.
- `ModelCacheHit`: 1 per request whose model was already loaded, 0 otherwise: its `Average`
  is the cache-hit ratio. `ModelLoadingWaitTime` (microseconds): how long a request waited for
  its model to be downloaded and loaded. `LoadedModelCount`: models loaded, per instance
  (`Average`) or in all (`Sum`).
- `GPUMemoryUtilization`, `GPUUtilization`, `CPUUtilization`, `MemoryUtilization`,
  `DiskUtilization` (`/aws/sagemaker/Endpoints`): per instance, in percent; the GPU ones are
  0-100 per GPU (0-400 on a four-GPU instance).
"""

from __future__ import annotations

from dataclasses import dataclass

from aws_cdk import ArnFormat, Duration, RemovalPolicy, Stack
from aws_cdk import aws_apigateway as apigw
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cw_actions
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from aws_cdk import aws_stepfunctions as sfn
from constructs import Construct

from workshop_infra.scaling import VARIANT_NAME

SAGEMAKER_NAMESPACE = "AWS/SageMaker"
ENDPOINT_INSTANCE_NAMESPACE = "/aws/sagemaker/Endpoints"
#: GPUs of the multi-GPU serving types (GPU metrics reach 100 per GPU); others have one.
GPUS_PER_INSTANCE = {
    "ml.g5.12xlarge": 4,
    "ml.g5.24xlarge": 4,
    "ml.g5.48xlarge": 8,
    "ml.g6.12xlarge": 4,
    "ml.g6.24xlarge": 4,
    "ml.g6.48xlarge": 8,
    "ml.g4dn.12xlarge": 4,
    "ml.p3.8xlarge": 4,
    "ml.p3.16xlarge": 8,
}
FIVE_MINUTES = Duration.minutes(5)
ONE_MINUTE = Duration.minutes(1)

#: A request that waits this long for its model leaves too little of API Gateway's 29 s
#: integration timeout for the inference itself (microseconds, as SageMaker reports it).
MODEL_LOADING_WAIT_LIMIT_US = 20_000_000
#: Below this cache-hit ratio most requests pay a model load: the loaded set is too small for
#: the users who are active (see the capacity model's predicted ratio).
CACHE_HIT_RATIO_LOW = 0.5
#: Share of the endpoint's requests answered 4xx by the model that is worth a look.
ENDPOINT_4XX_SHARE = 0.05
#: GPU memory (percent of one GPU) above which a model load or a large request can run out.
GPU_MEMORY_FULL_PERCENT = 95
#: Invocations per instance this many times the scaling target, for a quarter of an hour,
#: mean scaling cannot keep up (it reached `endpoint_max_instance_count`).
OVERLOAD_FACTOR = 1.5


@dataclass(frozen=True)
class MonitoredFunction:
    """A Lambda function on the dashboard and alarmed, under a short `label`."""

    label: str
    function: lambda_.IFunction


class Operations(Construct):
    """The dashboard, the alarms and, with `alarm_email`, the topic that emails them.

    Args:
        scope (`Construct`): the parent.
        construct_id (`str`): this construct's id.
        endpoint_name (`str`): the multi-model endpoint (whether the stack creates it or not).
        instance_type (`str`): its instance type (GPU widgets and alarms for g and p types).
        invocations_per_instance_target (`float`): the scaling policy's target, drawn on the
            chart of invocations per instance and the base of the overload alarm.
        functions (`list[MonitoredFunction]`): the API and packaging functions.
        state_machine (`sfn.IStateMachine`): the onboarding state machine.
        table (`dynamodb.ITable`): the metadata table.
        rest_api (`apigw.RestApi`): the API.
        alarm_email (`str`, *optional*): an address every alarm emails (through SNS).
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        endpoint_name: str,
        instance_type: str,
        invocations_per_instance_target: float,
        functions: list[MonitoredFunction],
        state_machine: sfn.IStateMachine,
        table: dynamodb.ITable,
        rest_api: apigw.RestApi,
        alarm_email: str | None = None,
    ) -> None:
        super().__init__(scope, construct_id)
        self.prefix = Stack.of(self).stack_name
        self.endpoint_name = endpoint_name
        family = instance_type.removeprefix("ml.")
        self.gpus = GPUS_PER_INSTANCE.get(instance_type, 1) if family[:1] in ("g", "p") else 0
        self.target = invocations_per_instance_target
        self.functions = functions
        self.state_machine = state_machine
        self.table = table
        self.rest_api = rest_api
        #: Every alarm that notifies, by its short name (the alarm's name is prefixed).
        self.alarms: dict[str, cloudwatch.AlarmBase] = {}
        #: Alarms that only feed a composite alarm, which notifies in their place.
        self.conditions: dict[str, cloudwatch.Alarm] = {}
        self._endpoint_alarms()
        self._function_alarms()
        self._workflow_alarms()
        self._table_alarms()
        self._api_alarms()
        self.topic = self._topic(alarm_email) if alarm_email else None
        if self.topic is not None:
            action = cw_actions.SnsAction(self.topic)
            for alarm in self.alarms.values():
                alarm.add_alarm_action(action)
        self.dashboard = self._dashboard()

    # ------------------------------------------------------------------ metrics

    def endpoint_metric(
        self,
        name: str,
        statistic: str,
        period: Duration = FIVE_MINUTES,
        namespace: str = SAGEMAKER_NAMESPACE,
        label: str | None = None,
    ) -> cloudwatch.Metric:
        """A metric of the endpoint's variant (`EndpointName`, `VariantName` dimensions)."""
        return cloudwatch.Metric(
            namespace=namespace,
            metric_name=name,
            dimensions_map={"EndpointName": self.endpoint_name, "VariantName": VARIANT_NAME},
            statistic=statistic,
            period=period,
            label=label,
        )

    def instance_metric(self, name: str, statistic: str = "Average") -> cloudwatch.Metric:
        """A per-instance metric of the endpoint (namespace `/aws/sagemaker/Endpoints`)."""
        return self.endpoint_metric(name, statistic, namespace=ENDPOINT_INSTANCE_NAMESPACE)

    def _table_throttles(self) -> cloudwatch.MathExpression:
        return cloudwatch.MathExpression(
            expression="reads + writes",
            using_metrics={
                "reads": self.table.metric("ReadThrottleEvents", statistic="Sum"),
                "writes": self.table.metric("WriteThrottleEvents", statistic="Sum"),
            },
            period=FIVE_MINUTES,
            label="Throttle events (read + write)",
        )

    # ------------------------------------------------------------------ alarms

    def _alarm(
        self,
        name: str,
        metric: cloudwatch.IMetric,
        threshold: float,
        description: str,
        evaluation_periods: int = 1,
        comparison: cloudwatch.ComparisonOperator = (
            cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD
        ),
        notify: bool = True,
    ) -> cloudwatch.Alarm:
        """An alarm named `<stack>-<name>`; missing data (no traffic, no resource) is OK."""
        alarm = cloudwatch.Alarm(
            self,
            "".join(part.capitalize() for part in name.split("-")),
            alarm_name=f"{self.prefix}-{name}",
            alarm_description=description,
            metric=metric,
            threshold=threshold,
            evaluation_periods=evaluation_periods,
            comparison_operator=comparison,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        (self.alarms if notify else self.conditions)[name] = alarm
        return alarm

    def _endpoint_alarms(self) -> None:
        errors = self._alarm(
            "endpoint-5xx",
            self.endpoint_metric("Invocation5XXErrors", "Sum"),
            5,
            "The endpoint's models answered 5 or more requests with 5xx in 5 minutes. Read the "
            f"endpoint's log group /aws/sagemaker/Endpoints/{self.endpoint_name} for the "
            "model's traceback (a model that fails to load, CUDA out of memory).",
        )
        self._alarm(
            "endpoint-4xx",
            self.endpoint_metric("Invocation4XXErrors", "Average"),
            ENDPOINT_4XX_SHARE,
            f"{ENDPOINT_4XX_SHARE:.0%} or more of the endpoint's requests were answered 4xx by "
            "the model for 10 minutes: requests the model refuses (a size it cannot make, a "
            "user model missing from the models prefix). Check the API's 422/404 answers and "
            "the packaging function.",
            evaluation_periods=2,
        )
        self._alarm(
            "endpoint-cache-hit-low",
            self.endpoint_metric("ModelCacheHit", "Average"),
            CACHE_HIT_RATIO_LOW,
            f"Fewer than {CACHE_HIT_RATIO_LOW:.0%} of the endpoint's requests found their model "
            "loaded, for 15 minutes: the active users' models do not fit the instances' "
            "memory, so most requests wait for a load. Raise endpoint_max_instance_count or "
            "use a larger instance (the capacity model says how many), or serve the shared "
            "base with adapters.",
            evaluation_periods=3,
            comparison=cloudwatch.ComparisonOperator.LESS_THAN_THRESHOLD,
        )
        self._alarm(
            "endpoint-model-loading-wait",
            self.endpoint_metric("ModelLoadingWaitTime", "Maximum"),
            MODEL_LOADING_WAIT_LIMIT_US,
            "A request waited 20 s or more for its model to load, in each of 15 minutes: "
            "close to API Gateway's 29 s limit, so users get 503 model_loading or 504. Check "
            "ModelDownloadingTime (S3) and ModelLoadingTime (the model's initialize) on the "
            "dashboard; a base model fetched per instance makes the first loads slow.",
            evaluation_periods=3,
        )
        self._alarm(
            "endpoint-overloaded",
            self.endpoint_metric("InvocationsPerInstance", "Sum", period=ONE_MINUTE),
            self.target * OVERLOAD_FACTOR,
            f"Each instance got more than {OVERLOAD_FACTOR:g} times the scaling target of "
            f"{self.target:g} invocations a minute, for 15 minutes: scaling is at "
            "endpoint_max_instance_count (or the account's instance quota). Raise either, "
            "or lower the users' generation quotas.",
            evaluation_periods=15,
            comparison=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
        )
        if self.gpus:
            full = self._alarm(
                "endpoint-gpu-memory-full",
                self.instance_metric("GPUMemoryUtilization", "Maximum"),
                GPU_MEMORY_FULL_PERCENT * self.gpus,
                f"GPU memory at {GPU_MEMORY_FULL_PERCENT}% or more of every GPU. Alone this is "
                "a full model cache, which is normal for a multi-model endpoint; the "
                "endpoint-gpu-memory-errors alarm notifies when errors come with it.",
                notify=False,
            )
            composite = cloudwatch.CompositeAlarm(
                self,
                "EndpointGpuMemoryErrors",
                composite_alarm_name=f"{self.prefix}-endpoint-gpu-memory-errors",
                alarm_description="The endpoint answers 5xx while its GPU memory is full: "
                "most likely CUDA out of memory at inference or at a model load. Lower the "
                "images, pixels or steps a request may ask for, or use an instance with "
                "more GPU memory.",
                alarm_rule=cloudwatch.AlarmRule.all_of(full, errors),
            )
            self.alarms["endpoint-gpu-memory-errors"] = composite

    def _function_alarms(self) -> None:
        for monitored in self.functions:
            function, label = monitored.function, monitored.label
            self._alarm(
                f"{label}-function-errors",
                function.metric_errors(period=FIVE_MINUTES, statistic="Sum"),
                1,
                f"The {label} function failed (an unhandled error or a timeout). Its log "
                "group has the traceback; the API function's handled errors (500 with a "
                "reference) are not counted here but in its logs.",
            )
            self._alarm(
                f"{label}-function-throttles",
                function.metric_throttles(period=FIVE_MINUTES, statistic="Sum"),
                1,
                f"Lambda throttled the {label} function: the account's concurrency is used "
                "up. Ask for a higher concurrency quota, or lower the API stage's rate.",
            )

    def _workflow_alarms(self) -> None:
        self._alarm(
            "onboarding-failed",
            self.state_machine.metric_failed(period=FIVE_MINUTES, statistic="Sum"),
            1,
            "An onboarding execution failed and its model is FAILED. The execution's Failed "
            "cause says which step and why (a training job's FailureReason, the packaging "
            "function's error); the user sees the reference in failure_reason.",
        )
        self._alarm(
            "onboarding-timed-out",
            self.state_machine.metric_timed_out(period=FIVE_MINUTES, statistic="Sum"),
            1,
            "An onboarding execution timed out, leaving its model in TRAINING or PACKAGING: "
            "look at the execution's last state and mark the model FAILED by hand.",
        )

    def _table_alarms(self) -> None:
        self._alarm(
            "table-throttles",
            self._table_throttles(),
            10,
            "The metadata table throttled 10 or more reads or writes in 5 minutes (the SDKs "
            "retry a few). On demand, that is traffic above twice its previous peak or one hot "
            "partition key (one user's items); CloudWatch Contributor Insights names the key.",
        )

    def _api_alarms(self) -> None:
        self._alarm(
            "api-5xx",
            self.rest_api.metric_server_error(period=FIVE_MINUTES, statistic="Sum"),
            10,
            "The API answered 10 or more 5xx in each of 10 minutes: 500 (the API function's "
            "log has the reference), 502/504 (the function failed or took longer than 29 s), "
            "503 (the endpoint was loading a model or busy: see the endpoint's alarms).",
            evaluation_periods=2,
        )

    # ------------------------------------------------------------------ notification

    def _topic(self, email: str) -> sns.Topic:
        """An SNS topic that emails `email`: encrypted with a key of its own, refusing requests
        without TLS, and published to by this stack's alarms only."""
        stack = Stack.of(self)
        cloudwatch_principal = iam.ServicePrincipal("cloudwatch.amazonaws.com")
        # Only CloudWatch acting for an alarm of this stack (the confused-deputy guard).
        for_these_alarms = {
            "ArnLike": {
                "aws:SourceArn": stack.format_arn(
                    service="cloudwatch",
                    resource="alarm",
                    resource_name=f"{self.prefix}-*",
                    arn_format=ArnFormat.COLON_RESOURCE_NAME,
                )
            },
            "StringEquals": {"aws:SourceAccount": stack.account},
        }
        key = kms.Key(
            self,
            "AlarmsKey",
            description=f"Encrypts the alarm notifications of {self.prefix}",
            enable_key_rotation=True,
            removal_policy=RemovalPolicy.DESTROY,
            pending_window=Duration.days(7),
        )
        # CloudWatch publishes with the topic's key, so it needs the key's use: the AWS managed
        # SNS key's policy cannot grant it, hence a key of its own.
        key.add_to_resource_policy(
            iam.PolicyStatement(
                principals=[cloudwatch_principal],
                actions=["kms:Decrypt", "kms:GenerateDataKey*"],
                resources=["*"],
                conditions=for_these_alarms,
            )
        )
        topic = sns.Topic(
            self,
            "Alarms",
            topic_name=f"{self.prefix}-alarms",
            display_name=f"{self.prefix} alarms",
            master_key=key,
            enforce_ssl=True,
        )
        topic.add_to_resource_policy(
            iam.PolicyStatement(
                principals=[cloudwatch_principal],
                actions=["sns:Publish"],
                resources=[topic.topic_arn],
                conditions=for_these_alarms,
            )
        )
        topic.add_subscription(subscriptions.EmailSubscription(email))
        return topic

    # ------------------------------------------------------------------ dashboard

    def _dashboard(self) -> cloudwatch.Dashboard:
        dashboard = cloudwatch.Dashboard(
            self,
            "Dashboard",
            dashboard_name=f"{self.prefix}-operations",
            default_interval=Duration.hours(3),
        )
        endpoint = self.endpoint_metric
        dashboard.add_widgets(
            cloudwatch.TextWidget(
                markdown=f"# {self.prefix}\nEndpoint `{self.endpoint_name}` (variant "
                f"`{VARIANT_NAME}`), the API and onboarding. Each alarm's description says "
                "what to do.",
                width=24,
                height=2,
            ),
            cloudwatch.AlarmStatusWidget(
                title="Alarms",
                alarms=list(self.alarms.values()),
                width=24,
                height=3,
            ),
        )
        dashboard.add_widgets(
            _graph(
                "Endpoint requests",
                [
                    endpoint("Invocations", "Sum", label="Invocations"),
                    endpoint("Invocation4XXErrors", "Sum", label="4xx"),
                    endpoint("Invocation5XXErrors", "Sum", label="5xx"),
                ],
            ),
            cloudwatch.GraphWidget(
                title="Invocations per instance per minute (scaling metric)",
                left=[endpoint("InvocationsPerInstance", "Sum", period=ONE_MINUTE)],
                left_annotations=[
                    cloudwatch.HorizontalAnnotation(value=self.target, label="scaling target")
                ],
                width=8,
            ),
            _graph(
                "Model cache: hit ratio and models loaded",
                [endpoint("ModelCacheHit", "Average", label="Cache-hit ratio")],
                right=[
                    endpoint("LoadedModelCount", "Average", label="Loaded per instance"),
                    endpoint("LoadedModelCount", "Sum", label="Loaded in all"),
                ],
            ),
        )
        dashboard.add_widgets(
            _graph(
                "Model loads (microseconds)",
                [
                    endpoint("ModelLoadingWaitTime", "Average", label="Wait (average)"),
                    endpoint("ModelLoadingWaitTime", "Maximum", label="Wait (max)"),
                    endpoint("ModelDownloadingTime", "Average", label="Download from S3"),
                    endpoint("ModelLoadingTime", "Average", label="Load in the container"),
                ],
            ),
            _graph(
                "Latency (microseconds)",
                [
                    endpoint("ModelLatency", "Average", label="Model (average)"),
                    endpoint("ModelLatency", "Maximum", label="Model (max)"),
                    endpoint("OverheadLatency", "Average", label="SageMaker overhead"),
                ],
            ),
            _graph(
                "Instances (percent; GPU: 100 per GPU)",
                [
                    self.instance_metric(name)
                    for name in (
                        *(("GPUMemoryUtilization", "GPUUtilization") if self.gpus else ()),
                        "CPUUtilization",
                        "MemoryUtilization",
                        "DiskUtilization",
                    )
                ],
            ),
        )
        dashboard.add_widgets(
            _graph(
                "Functions: invocations, errors, throttles",
                [
                    metric
                    for monitored in self.functions
                    for metric in (
                        monitored.function.metric_invocations(
                            period=FIVE_MINUTES, label=f"{monitored.label} invocations"
                        ),
                        monitored.function.metric_errors(
                            period=FIVE_MINUTES, label=f"{monitored.label} errors"
                        ),
                        monitored.function.metric_throttles(
                            period=FIVE_MINUTES, label=f"{monitored.label} throttles"
                        ),
                    )
                ],
            ),
            _graph(
                "Functions: duration (ms)",
                [
                    monitored.function.metric_duration(
                        period=FIVE_MINUTES, statistic=statistic, label=f"{monitored.label} {name}"
                    )
                    for monitored in self.functions
                    for statistic, name in (("p95", "p95"), ("Maximum", "max"))
                ],
            ),
            _graph(
                "Onboarding executions",
                [
                    self.state_machine.metric_started(period=FIVE_MINUTES, label="Started"),
                    self.state_machine.metric_succeeded(period=FIVE_MINUTES, label="Succeeded"),
                    self.state_machine.metric_failed(period=FIVE_MINUTES, label="Failed"),
                    self.state_machine.metric_timed_out(period=FIVE_MINUTES, label="Timed out"),
                    self.state_machine.metric_aborted(
                        period=FIVE_MINUTES, label="Aborted (user deleted)"
                    ),
                ],
            ),
        )
        dashboard.add_widgets(
            _graph(
                "API requests and errors",
                [
                    self.rest_api.metric_count(period=FIVE_MINUTES, label="Requests"),
                    self.rest_api.metric_client_error(period=FIVE_MINUTES, label="4xx"),
                    self.rest_api.metric_server_error(period=FIVE_MINUTES, label="5xx"),
                ],
                right=[
                    self.rest_api.metric_latency(
                        period=FIVE_MINUTES, statistic="p95", label="Latency p95 (ms)"
                    )
                ],
            ),
            _graph(
                "Metadata table",
                [
                    self.table.metric("ReadThrottleEvents", statistic="Sum", period=FIVE_MINUTES),
                    self.table.metric("WriteThrottleEvents", statistic="Sum", period=FIVE_MINUTES),
                ],
                right=[
                    self.table.metric_consumed_read_capacity_units(period=FIVE_MINUTES),
                    self.table.metric_consumed_write_capacity_units(period=FIVE_MINUTES),
                ],
            ),
        )
        return dashboard


def _graph(
    title: str, left: list[cloudwatch.IMetric], right: list[cloudwatch.IMetric] | None = None
) -> cloudwatch.GraphWidget:
    return cloudwatch.GraphWidget(title=title, left=left, right=right or [], width=8)
