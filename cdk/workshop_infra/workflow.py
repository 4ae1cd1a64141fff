"""The onboarding workflow on Step Functions: train, package, mark the model AVAILABLE.

The API starts one execution per model, named `<user_id>-<model_id>`, with the input

    {"user_id": ..., "model_id": ..., "training_job": {<the whole CreateTrainingJob request>},
     "training_output_uri": "s3://<bucket>/jobs/<job_name>/output/model.tar.gz"}

and the states are

    MarkTraining -> Train -> MarkPackaging -> Package -> MarkAvailable
         \\___________\\___________\\____________\\____________\\___> MarkFailed -> Failed

Every `Mark*` state is a DynamoDB `UpdateItem` of the model's item (status, `updated_at`,
`version` + 1) allowed only from the statuses `helpers.domain.records.TRANSITIONS` allows (or the
target itself, so a retried write is harmless). `Train` waits for the training job with the
`.sync` integration: Step Functions follows the job through EventBridge, so there is no
polling loop and no fixed wait.

The definition uses the JSONata query language: `Train` passes the input's `training_job`
whole as the `CreateTrainingJob` arguments (`"{% ... %}"`), so the request is built in one
place, `SageMakerTrainingJobs.training_job_config`, and never copied field by field here.
Every state reads the execution input from the context object, so a state's output never has
to carry it along.
"""

from __future__ import annotations

from aws_cdk import ArnFormat, Duration, RemovalPolicy, Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_stepfunctions as sfn
from aws_cdk import aws_stepfunctions_tasks as tasks
from constructs import Construct

from helpers.domain import failures
from helpers.domain.records import MODEL_SK_PREFIX, TRANSITIONS, ModelStatus
from workshop_infra.endpoint import adapters_prefix, models_prefix
from workshop_infra.functions import LOG_RETENTION, PythonFunction
from workshop_infra.nag import acknowledge, arn_reference, wildcard_resource
from workshop_infra.storage import JOBS_PREFIX, Storage

PACKAGE_HANDLER = "helpers.lambdas.workflow.package_handler"
#: The rule through which Step Functions follows SageMaker training jobs (`.sync`).
SYNC_RULE = "StepFunctionsGetEventsForSageMakerTrainingJobsRule"
#: The longest failure detail kept (in the `Failed` state's cause, for operators).
MAX_FAILURE_REASON = 1000
#: An onboarding execution's bound: a training job may run 2 h (`MaxRuntimeInSeconds`) and wait
#: for spot capacity up to 4 h in all (`MaxWaitTimeInSeconds`); packaging takes minutes.
EXECUTION_TIMEOUT = Duration.hours(6)

_INPUT = "$states.context.Execution.Input"
#: The time as `helpers.domain.records.utc_now` writes it: microseconds and `+00:00`, fixed width.
_NOW = '{% $replace($now(), "Z", "000+00:00") %}'
_DYNAMODB_RETRY_ERRORS = [
    "DynamoDB.ProvisionedThroughputExceededException",
    "DynamoDB.RequestLimitExceeded",
    "DynamoDB.ThrottlingException",
    "DynamoDB.InternalServerErrorException",
]


def failure_reason(step: str) -> str:
    """The JSONata expression (in a Catch) of the reason a user reads for a failed `step`: a
    phrase of `helpers.domain.failures` and the execution's name as the operator's reference."""
    phrase = failures.STEP_FAILED.get(step, failures.ONBOARDING_FAILED)
    return f"{{% '{phrase} (ref ' & $states.context.Execution.Name & ')' %}}"


def failure_detail(step: str) -> str:
    """The JSONata expression (in a Catch) of what went wrong in `step`, for operators: the
    execution's `Failed` cause, never the model's reason.

    SageMaker's and Lambda's causes are JSON documents; their `FailureReason` or
    `errorMessage` is what says what went wrong, so it replaces the document when present,
    its JSON escapes undone (Step Functions' JSONata has no `$eval` to parse it).
    """
    return (
        "{% ($cause := $states.errorOutput.Cause; "
        # A JSON string: characters but quote and backslash, or an escaped pair. JSONata finds
        # a regex's end by counting brackets, skipping those after a backslash, so a class such
        # as [^"\\] never closes: \x5c is the backslash here.
        r"$found := $match($cause, "
        r'/"(FailureReason|errorMessage)"\s*:\s*"((?:[^"\x5c]|\x5c.)*)"/); '
        r"$detail := $found ? $replace($replace($replace($found[0].groups[1], "
        r"""'\\n', '\n'), '\\"', '"'), '\\\\', '\\') : $cause; """
        f"$substring('{step} failed: ' & $states.errorOutput.Error & "
        f"($detail ? ': ' & $detail : ''), 0, {MAX_FAILURE_REASON})) %}}"
    )


class OnboardingWorkflow(Construct):
    """The packaging function and the onboarding state machine.

    Args:
        scope (`Construct`): the parent.
        construct_id (`str`): this construct's id.
        storage (`Storage`): the bucket and the metadata table.
        code (`lambda_.Code`): the functions' bundle.
        execution_role (`iam.IRole`): the SageMaker role the training jobs run as.
        environment (`dict[str, str]`): the `WORKSHOP_*` settings of the functions.
        endpoint_name (`str`): the multi-model endpoint whose prefix receives the models.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        storage: Storage,
        code: lambda_.Code,
        execution_role: iam.IRole,
        environment: dict[str, str],
        endpoint_name: str,
    ) -> None:
        super().__init__(scope, construct_id)
        self.storage = storage
        self.package = PythonFunction(
            self,
            "Package",
            code=code,
            handler=PACKAGE_HANDLER,
            environment=environment,
            timeout=Duration.minutes(5),
            memory_size=1024,
            description="Packages a trained LoRA as the user's Triton model on the endpoint",
        )
        storage.grant_objects(self.package.function, JOBS_PREFIX, "s3:GetObject")
        for prefix in (models_prefix(endpoint_name), adapters_prefix(endpoint_name)):
            storage.grant_objects(self.package.function, prefix, "s3:GetObject", "s3:PutObject")
        storage.grant_list(self.package.function)

        failed = self._mark(
            "MarkFailed", ModelStatus.FAILED, failure_reason="{% $failure_reason %}"
        )
        failed.next(
            sfn.Fail(self, "Failed", error="OnboardingFailed", cause="{% $failure_detail %}")
        )
        train = self._train()
        package = tasks.LambdaInvoke.jsonata(
            self,
            "PackageState",
            state_name="Package",
            lambda_function=self.package.function,
            payload=sfn.TaskInput.from_object(
                {
                    "user_id": f"{{% {_INPUT}.user_id %}}",
                    "model_id": f"{{% {_INPUT}.model_id %}}",
                    "training_output_uri": f"{{% {_INPUT}.training_output_uri %}}",
                }
            ),
            outputs="{% $states.result.Payload %}",
            retry_on_service_exceptions=True,
        )
        steps = [
            (
                self._mark(
                    "MarkTraining",
                    ModelStatus.TRAINING,
                    training_job_name=f"{{% {_INPUT}.training_job.TrainingJobName %}}",
                ),
                "recording TRAINING",
            ),
            (train, "training"),
            (self._mark("MarkPackaging", ModelStatus.PACKAGING), "recording PACKAGING"),
            (package, "packaging"),
            (
                self._mark(
                    "MarkAvailable",
                    ModelStatus.AVAILABLE,
                    endpoint_model_name="{% $states.input.endpoint_model_name %}",
                    model_artifact_uri="{% $states.input.model_artifact_uri %}",
                ),
                "recording AVAILABLE",
            ),
        ]
        for state, step in steps:
            state.add_catch(
                failed,
                errors=["States.ALL"],
                assign={
                    "failure_reason": failure_reason(step),
                    "failure_detail": failure_detail(step),
                },
            )
        chain = sfn.Chain.start(steps[0][0])
        for state, _ in steps[1:]:
            chain = chain.next(state)

        self.log_group = logs.LogGroup(
            self, "Logs", retention=LOG_RETENTION, removal_policy=RemovalPolicy.DESTROY
        )
        # A name of its own, so its executions' ARNs are known when granting on them.
        self.state_machine_name = f"{Stack.of(self).stack_name}-onboarding"[:80]
        self.state_machine = sfn.StateMachine(
            self,
            "StateMachine",
            state_machine_name=self.state_machine_name,
            definition_body=sfn.DefinitionBody.from_chainable(chain),
            query_language=sfn.QueryLanguage.JSONATA,
            logs=sfn.LogOptions(
                destination=self.log_group, level=sfn.LogLevel.ALL, include_execution_data=True
            ),
            tracing_enabled=True,
            comment="Onboarding of one user model: train, package, mark AVAILABLE or FAILED",
            # Longer than any healthy execution (a job's MaxRuntimeInSeconds, 2 h by default,
            # plus packaging), so that a stuck one ends and the onboarding-timed-out alarm fires.
            timeout=EXECUTION_TIMEOUT,
        )
        self._grant_training(self.state_machine.role, execution_role)
        self._acknowledge()

    def grant_start_and_stop(self, grantee: iam.IGrantable) -> None:
        """Let `grantee` start executions and stop them (which stops their training jobs)."""
        self.state_machine.grant_start_execution(grantee)
        executions = Stack.of(self).format_arn(
            service="states",
            resource="execution",
            resource_name=f"{self.state_machine_name}:*",
            arn_format=ArnFormat.COLON_RESOURCE_NAME,
        )
        grantee.grant_principal.add_to_principal_policy(
            iam.PolicyStatement(actions=["states:StopExecution"], resources=[executions])
        )
        acknowledge(
            grantee.grant_principal,
            wildcard_resource(
                "arn:<AWS::Partition>:states:<AWS::Region>:<AWS::AccountId>:execution:"
                f"{self.state_machine_name}:*"
            ),
            "Stopping an execution of the onboarding state machine only, whichever model it "
            "is for: execution names are chosen per model at run time.",
        )

    def _mark(
        self, state_id: str, status: ModelStatus, **attributes: str
    ) -> tasks.DynamoUpdateItem:
        """A DynamoDB UpdateItem state that moves the model to `status` and sets `attributes`
        (JSONata expressions), from the statuses that may move to `status` only."""
        allowed = [s for s in ModelStatus if status in TRANSITIONS[s]] + [status]
        names = {"#status": "status", "#updated_at": "updated_at", "#version": "version"}
        values = {
            ":status": tasks.DynamoAttributeValue.from_string(status.value),
            ":now": tasks.DynamoAttributeValue.from_string(_NOW),
            ":one": tasks.DynamoAttributeValue.from_number(1),
        }
        sets = ["#status = :status", "#updated_at = :now"]
        for name, expression in attributes.items():
            names[f"#{name}"] = name
            values[f":{name}"] = tasks.DynamoAttributeValue.from_string(expression)
            sets.append(f"#{name} = :{name}")
        for index, source in enumerate(allowed):
            values[f":from{index}"] = tasks.DynamoAttributeValue.from_string(source.value)
        sources = ", ".join(f":from{index}" for index in range(len(allowed)))
        state = tasks.DynamoUpdateItem.jsonata(
            self,
            state_id,
            table=self.storage.table,
            key={
                "user_id": tasks.DynamoAttributeValue.from_string(f"{{% {_INPUT}.user_id %}}"),
                "sk": tasks.DynamoAttributeValue.from_string(
                    f"{{% '{MODEL_SK_PREFIX}' & {_INPUT}.model_id %}}"
                ),
            },
            update_expression=f"SET {', '.join(sets)} ADD #version :one",
            condition_expression=f"attribute_exists(sk) AND #status IN ({sources})",
            expression_attribute_names=names,
            expression_attribute_values=values,
            # The next state reads nothing from an update's result.
            outputs="{% $states.input %}",
        )
        state.add_retry(errors=_DYNAMODB_RETRY_ERRORS, max_attempts=3, backoff_rate=2.0)
        return state

    def _train(self) -> sfn.CustomState:
        """The `.sync` CreateTrainingJob state, its arguments the input's `training_job`."""
        partition = Stack.of(self).partition
        return sfn.CustomState(
            self,
            "Train",
            state_json={
                "Type": "Task",
                "Resource": f"arn:{partition}:states:::sagemaker:createTrainingJob.sync",
                "Arguments": f"{{% {_INPUT}.training_job %}}",
                # DescribeTrainingJob's answer is large and nothing after reads it.
                "Output": {"training_job_name": "{% $states.result.TrainingJobName %}"},
            },
        )

    def _grant_training(self, role: iam.IRole, execution_role: iam.IRole) -> None:
        """What `createTrainingJob.sync` needs: the job's calls, the EventBridge rule through
        which Step Functions follows it, and passing the execution role to SageMaker only."""
        stack = Stack.of(self)
        role.add_to_principal_policy(
            iam.PolicyStatement(
                actions=[
                    "sagemaker:AddTags",
                    "sagemaker:CreateTrainingJob",
                    "sagemaker:DescribeTrainingJob",
                    "sagemaker:StopTrainingJob",
                ],
                resources=[
                    stack.format_arn(
                        service="sagemaker", resource="training-job", resource_name="*"
                    )
                ],
            )
        )
        role.add_to_principal_policy(
            iam.PolicyStatement(
                actions=["events:DescribeRule", "events:PutRule", "events:PutTargets"],
                resources=[
                    stack.format_arn(service="events", resource="rule", resource_name=SYNC_RULE)
                ],
            )
        )
        role.add_to_principal_policy(
            iam.PolicyStatement(
                actions=["iam:PassRole"],
                resources=[execution_role.role_arn],
                conditions={"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}},
            )
        )

    def _acknowledge(self) -> None:
        role = self.state_machine.role
        acknowledge(
            role,
            wildcard_resource("*"),
            "Step Functions' log delivery (logs:CreateLogDelivery and related calls) and X-Ray "
            "tracing (xray:PutTraceSegments and related calls) have no resource-level "
            "permissions; CDK adds these statements for the logging and tracing cdk-nag asks for.",
        )
        acknowledge(
            role,
            wildcard_resource(f"{arn_reference(self.package.function)}:*"),
            "Invoking the packaging function by any of its versions or aliases: the ARN with "
            "':*' names that one function's qualified ARNs, not other functions.",
        )
        acknowledge(
            role,
            wildcard_resource(
                "arn:<AWS::Partition>:sagemaker:<AWS::Region>:<AWS::AccountId>:training-job/*"
            ),
            "Each execution creates, follows and may stop a training job whose name is chosen "
            "per model at run time; only training jobs of this account and region are allowed.",
        )
