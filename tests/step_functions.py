"""A small interpreter of Step Functions state machines written in JSONata, for tests: it runs
the definition `cdk synth` produces, state by state, making the AWS calls Step Functions itself
makes for each Task (boto3, against moto), so that under `iam_enforced.enforced(...)` every one
of them is authorized against the state machine's role.

Why not moto's own Step Functions: it evaluates JSONata through a JVM it does not have here,
and it does not run the SageMaker integration. Why a small one is enough: the onboarding state
machine uses Task, Fail and Succeed states, `Arguments`, `Output`, `Assign`, `Retry` and
`Catch`, and three integrations. Anything else (another state type, a field, JSONPath, an
unknown integration) raises `NotImplementedError` naming it, so that a change of the stack
cannot pass unchecked.

    execution = run_execution(definition, execution_input, "ada-m1", AwsIntegrations(...))
    assert execution.status == "SUCCEEDED", (execution.error, execution.cause)

What it does not do: wait (a Retry is recorded with the delay it would have waited, then taken
at once), time out states, run states in parallel.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

#: A service integration: the state's evaluated `Arguments` to its result (`$states.result`);
#: raises `TaskFailed` with the error Step Functions would report.
Integration = Callable[[Any], Any]

_TEMPLATE = re.compile(r"^\{%(.*)%\}$", re.DOTALL)
_FIELDS = {
    "Task": {"Type", "Resource", "Arguments", "Output", "Assign", "Next", "End", "Retry", "Catch"},
    "Fail": {"Type", "Error", "Cause"},
    "Succeed": {"Type", "Output"},
}
_COMMON = {"Comment", "QueryLanguage"}
# TimeoutSeconds is read but not enforced: the executions interpreted here end in seconds or
# minutes, far inside any timeout a definition sets.
_DEFINITION = {"StartAt", "States", "Comment", "QueryLanguage", "Version", "TimeoutSeconds"}
_RETRIER = {
    "ErrorEquals",
    "IntervalSeconds",
    "MaxAttempts",
    "BackoffRate",
    "MaxDelaySeconds",
    "JitterStrategy",
    "Comment",
}
_CATCHER = {"ErrorEquals", "Next", "Assign", "Output", "Comment"}
#: Errors `States.TaskFailed` does not match in a Retry or Catch (it matches any other).
_NOT_TASK_FAILURES = {"States.Timeout"}


class TaskFailed(Exception):
    """A state's failure, as Step Functions names it: `error` (e.g.
    `DynamoDB.ConditionalCheckFailedException`) and its `cause`."""

    def __init__(self, error: str, cause: str = "") -> None:
        super().__init__(f"{error}: {cause}")
        self.error = error
        self.cause = cause


@dataclass
class Event:
    """One step of an execution's history: `state`, what happened (`kind`), and its detail."""

    state: str
    kind: str
    detail: Any = None


@dataclass
class Execution:
    """An execution's end and history.

    Attributes:
        name (`str`), arn (`str`): the execution's name and ARN.
        input (`Any`): the execution's input.
        status (`str`): `SUCCEEDED` or `FAILED`.
        output (`Any`): the last state's output (`SUCCEEDED`).
        error (`str`), cause (`str`): why it failed (`FAILED`).
        events (`list[Event]`): entered states, retries, caught errors, in order.
        variables (`dict`): the variables assigned, at the end.
    """

    name: str
    arn: str
    input: Any = None
    status: str = "RUNNING"
    output: Any = None
    error: str | None = None
    cause: str | None = None
    events: list[Event] = field(default_factory=list)
    variables: dict[str, Any] = field(default_factory=dict)

    @property
    def states(self) -> list[str]:
        """The states entered, in order."""
        return [e.state for e in self.events if e.kind == "entered"]

    @property
    def retries(self) -> list[Event]:
        """The retries taken (detail: error, attempt, and the delay AWS would have waited)."""
        return [e for e in self.events if e.kind == "retry"]


def evaluate(template: Any, states: Mapping[str, Any], variables: Mapping[str, Any]) -> Any:
    """`template` with every `{% ... %}` string replaced by its JSONata value (`$states` and
    the assigned variables bound); other values as they are.

    Raises:
        TaskFailed: `States.QueryEvaluationError`, an expression failed or gave nothing.
    """
    import jsonata

    if isinstance(template, dict):
        return {key: evaluate(value, states, variables) for key, value in template.items()}
    if isinstance(template, list):
        return [evaluate(value, states, variables) for value in template]
    if not isinstance(template, str) or not (match := _TEMPLATE.match(template.strip())):
        return template
    try:
        value = jsonata.Jsonata(match.group(1).strip()).evaluate(
            None, {**variables, "states": dict(states)}
        )
    except Exception as error:  # JSONata's own errors have no common base class
        raise TaskFailed("States.QueryEvaluationError", f"{template}: {error}") from None
    if value is None:
        # jsonata-python gives None for both undefined and null; a field Step Functions
        # cannot fill fails the state there too.
        raise TaskFailed("States.QueryEvaluationError", f"{template} returned nothing")
    return value


def run_execution(
    definition: Mapping[str, Any],
    execution_input: Any,
    name: str,
    integrations: Mapping[str, Integration],
    state_machine_arn: str = "arn:aws:states:us-east-1:123456789012:stateMachine:test",
    role_arn: str = "arn:aws:iam::123456789012:role/test",
    max_transitions: int = 100,
) -> Execution:
    """Run one execution of `definition` (a JSONata state machine, resolved) to its end.

    Args:
        definition (`Mapping`): the state machine's definition.
        execution_input (`Any`): the execution's input (what `StartExecution` was given, parsed).
        name (`str`): the execution's name.
        integrations (`Mapping[str, Integration]`): each Task `Resource`'s integration.
        state_machine_arn (`str`), role_arn (`str`): the context object's.
        max_transitions (`int`, defaults to 100): an execution longer than this is a loop.

    Returns:
        `Execution`: `SUCCEEDED` with the output, or `FAILED` with the error and cause.

    Raises:
        NotImplementedError: the definition uses a construct this interpreter does not run
            (named).
        RuntimeError: more than `max_transitions` states.
    """
    _check_definition(definition, integrations)
    arn = state_machine_arn.replace(":stateMachine:", ":execution:", 1) + f":{name}"
    execution = Execution(name, arn, execution_input)
    context = {
        "Execution": {
            "Id": arn,
            "Input": execution_input,
            "Name": name,
            "RoleArn": role_arn,
            "StartTime": _now(),
            "RedriveCount": 0,
        },
        "StateMachine": {"Id": state_machine_arn, "Name": state_machine_arn.rsplit(":", 1)[-1]},
    }
    variables = execution.variables
    current, state_input = definition["StartAt"], execution_input
    for _ in range(max_transitions):
        state = definition["States"][current]
        execution.events.append(Event(current, "entered", state_input))
        context["State"] = {"Name": current, "EnteredTime": _now(), "RetryCount": 0}
        states = {"input": state_input, "context": context}
        kind = state["Type"]
        try:
            if kind == "Fail":
                execution.status = "FAILED"
                execution.error = evaluate(state.get("Error", "States.Fail"), states, variables)
                execution.cause = evaluate(state.get("Cause", ""), states, variables)
                return execution
            if kind == "Succeed":
                execution.status = "SUCCEEDED"
                execution.output = _output(state, state_input, states, variables)
                return execution
            result = _run_task(current, state, states, variables, integrations, execution)
            states = {**states, "result": result}
            # Assign and Output both see the variables as they were before the state.
            assigned = evaluate(state.get("Assign", {}), states, variables)
            output = _output(state, result, states, variables)
            variables.update(assigned)
            following = None if state.get("End") else state["Next"]
        except TaskFailed as failure:
            caught = _catch(current, state, states, variables, failure, execution)
            if caught is None:
                execution.status = "FAILED"
                execution.error, execution.cause = failure.error, failure.cause
                return execution
            following, output = caught
        if following is None:  # the end, reached by success (a catcher always has a Next)
            execution.status = "SUCCEEDED"
            execution.output = output
            return execution
        current, state_input = following, output
    raise RuntimeError(f"execution {name} ran more than {max_transitions} states: a loop?")


def _run_task(name, state, states, variables, integrations, execution) -> Any:
    """The Task's result, its integration retried as its `Retry` says (without waiting)."""
    attempts: dict[int, int] = {}
    while True:
        try:
            arguments = evaluate(state["Arguments"], states, variables)
            return integrations[state["Resource"]](arguments)
        except TaskFailed as failure:
            index, retrier = _first_match(state.get("Retry", []), failure.error)
            if retrier is None or attempts.get(index, 0) >= retrier.get("MaxAttempts", 3):
                raise
            attempt = attempts[index] = attempts.get(index, 0) + 1
            delay = retrier.get("IntervalSeconds", 1) * retrier.get("BackoffRate", 2.0) ** (
                attempt - 1
            )
            if "MaxDelaySeconds" in retrier:
                delay = min(delay, retrier["MaxDelaySeconds"])
            states["context"]["State"]["RetryCount"] += 1
            detail = {"error": failure.error, "attempt": attempt, "delay_seconds": delay}
            execution.events.append(Event(name, "retry", detail))


def _catch(name, state, states, variables, failure, execution) -> tuple[str, Any] | None:
    """`(next state, output)` of the first catcher of `failure`, its `Assign` applied; None
    if no catcher matches."""
    _, catcher = _first_match(state.get("Catch", []), failure.error)
    if catcher is None:
        return None
    error_output = {"Error": failure.error, "Cause": failure.cause}
    states = {**states, "errorOutput": error_output}
    assigned = evaluate(catcher.get("Assign", {}), states, variables)
    output = _output(catcher, error_output, states, variables)
    variables.update(assigned)
    execution.events.append(Event(name, "caught", error_output))
    return catcher["Next"], output


def _output(where: Mapping, default: Any, states: Mapping, variables: Mapping) -> Any:
    """`where`'s `Output` evaluated, or `default` (taken as it is, never as a template)."""
    return evaluate(where["Output"], states, variables) if "Output" in where else default


def _first_match(handlers: list[dict], error: str) -> tuple[int, dict | None]:
    for index, handler in enumerate(handlers):
        names = handler["ErrorEquals"]
        if (
            error in names
            or "States.ALL" in names
            or ("States.TaskFailed" in names and error not in _NOT_TASK_FAILURES)
        ):
            return index, handler
    return -1, None


def _check_definition(definition: Mapping, integrations: Mapping[str, Integration]) -> None:
    """Raise `NotImplementedError` naming the first construct `run_execution` does not run."""
    _unsupported("the definition", definition, _DEFINITION)
    if definition.get("QueryLanguage") != "JSONata":
        raise NotImplementedError("only JSONata state machines are interpreted, not JSONPath")
    for name, state in definition["States"].items():
        kind = state.get("Type")
        if kind not in _FIELDS:
            raise NotImplementedError(f"state {name}: the interpreter does not run {kind} states")
        _unsupported(f"state {name}", state, _FIELDS[kind] | _COMMON)
        if state.get("QueryLanguage", "JSONata") != "JSONata":
            raise NotImplementedError(f"state {name}: only JSONata is interpreted")
        for retrier in state.get("Retry", []):
            _unsupported(f"state {name}'s Retry", retrier, _RETRIER)
            if retrier.get("JitterStrategy", "NONE") != "NONE":
                raise NotImplementedError(f"state {name}: Retry with JitterStrategy")
        for catcher in state.get("Catch", []):
            _unsupported(f"state {name}'s Catch", catcher, _CATCHER)
        if kind == "Task":
            if state["Resource"] not in integrations:
                raise NotImplementedError(
                    f"state {name}: no integration for {state['Resource']} (the interpreter "
                    f"has {sorted(integrations)})"
                )
            if "Arguments" not in state:
                raise NotImplementedError(f"state {name}: a Task without Arguments")


def _unsupported(where: str, fields: Mapping, supported: set[str]) -> None:
    unknown = sorted(set(fields) - supported)
    if unknown:
        raise NotImplementedError(f"{where}: the interpreter does not support {unknown}")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ------------------------------------------------------------------------------- AWS


#: A training job as the test makes it run: its `CreateTrainingJob` request to None
#: (Completed) or the job's `FailureReason` (Failed).
TrainingRun = Callable[[dict], "str | None"]
#: The rule through which Step Functions follows SageMaker training jobs (`.sync`).
SYNC_RULE = "StepFunctionsGetEventsForSageMakerTrainingJobsRule"
_FINAL_JOB_STATUSES = {"Completed", "Failed", "Stopped"}


def lora_training_output(enforcer=None) -> TrainingRun:
    """A training job that succeeds: it writes a `model.tar.gz` with a LoRA weights file at
    `<S3OutputPath>/<job>/output/model.tar.gz`, as SageMaker uploads a job's `/opt/ml/model`
    (the job runs as the SageMaker execution role, outside the state machine's check: as an
    administrator under `enforcer`, if given)."""

    def run(config: dict) -> None:
        import boto3

        from helpers.domain.archives import write_tar_gz
        from helpers.domain.uris import S3Uri
        from helpers.services.packaging import WEIGHTS

        output = S3Uri.parse(config["OutputDataConfig"]["S3OutputPath"].rstrip("/"))
        key = f"{output.key}/{config['TrainingJobName']}/output/model.tar.gz".lstrip("/")
        admin = enforcer.as_admin() if enforcer is not None else contextlib.nullcontext()
        with tempfile.TemporaryDirectory() as work, admin:
            archive = write_tar_gz(Path(work) / "model.tar.gz", {WEIGHTS: b"lora weights"})
            boto3.client("s3").put_object(Bucket=output.bucket, Key=key, Body=archive.read_bytes())

    return run


class AwsIntegrations(Mapping[str, Integration]):
    """The integrations the onboarding state machine uses, making the calls Step Functions
    makes with the state machine's role (boto3, against moto):

    - `dynamodb:updateItem`: `UpdateItem`;
    - `sagemaker:createTrainingJob.sync`: the managed EventBridge rule through which Step
      Functions follows the job (`DescribeRule`, and `PutRule` + `PutTargets` when missing),
      `CreateTrainingJob`, the job's run (`run_training_job`), then `DescribeTrainingJob`
      until it ends;
    - `lambda:invoke`: `lambda:InvokeFunction` authorized by `enforcer` (moto's Lambda runs
      functions in Docker, which is not here), then the function in this process.

    Args:
        region (`str`): the state machine's region.
        functions (`Mapping[str, Callable[[Any], Any]]`): each function's handler by ARN; it
            runs the payload under the function's own identity (the test switches
            `enforcer.statements`).
        run_training_job (`TrainingRun`, *optional*): makes a created job run; defaults to
            `lora_training_output(enforcer)`; None with `jobs_run_themselves`.
        jobs_run_themselves (`bool`, defaults to False): moto's CreateTrainingJob runs the job
            (`sagemaker_platform.install_training_platform`): only follow it.
        enforcer (`iam_enforced.Enforcer`, *optional*): authorizes the invocations.
        account (`str`, defaults to moto's): the account of the ARNs.
        wait_seconds (`float`, defaults to 60): the longest wait for a job to end.
    """

    def __init__(
        self,
        region: str,
        functions: Mapping[str, Callable[[Any], Any]],
        run_training_job: TrainingRun | None = None,
        enforcer=None,
        account: str = "123456789012",
        wait_seconds: float = 60.0,
        jobs_run_themselves: bool = False,
    ) -> None:
        self.region = region
        self.account = account
        self.functions = functions
        self.enforcer = enforcer
        self.jobs_run_themselves = jobs_run_themselves
        self.run_training_job = run_training_job or lora_training_output(enforcer)
        self.wait_seconds = wait_seconds
        self._integrations = {
            "arn:aws:states:::dynamodb:updateItem": self.update_item,
            "arn:aws:states:::sagemaker:createTrainingJob.sync": self.train,
            "arn:aws:states:::lambda:invoke": self.invoke,
        }

    def __getitem__(self, resource: str) -> Integration:
        return self._integrations[resource]

    def __iter__(self) -> Iterator[str]:
        return iter(self._integrations)

    def __len__(self) -> int:
        return len(self._integrations)

    def _client(self, service: str):
        import boto3

        return boto3.client(service, region_name=self.region)

    def update_item(self, arguments: dict) -> dict:
        client = self._client("dynamodb")
        with _sdk_errors(client, "DynamoDB", "AmazonDynamoDBException", "AmazonDynamoDBv2"):
            return _result(client.update_item(**arguments))

    def train(self, arguments: dict) -> dict:
        client = self._client("sagemaker")
        self._ensure_sync_rule()
        with _sdk_errors(client, "SageMaker", "AmazonSageMakerException", "AmazonSageMaker"):
            client.create_training_job(**arguments)
        name = arguments["TrainingJobName"]
        if not self.jobs_run_themselves:
            self._run_in_moto(name, arguments)
        deadline = time.monotonic() + self.wait_seconds
        while True:
            with _sdk_errors(client, "SageMaker", "AmazonSageMakerException", "AmazonSageMaker"):
                described = _result(client.describe_training_job(TrainingJobName=name))
            status = described["TrainingJobStatus"]
            if status == "Completed":
                return json.loads(json.dumps(described, default=_epoch_millis))
            if status in _FINAL_JOB_STATUSES:
                # A job that ends otherwise fails the task with the job's description.
                raise TaskFailed("States.TaskFailed", json.dumps(described, default=_epoch_millis))
            if time.monotonic() > deadline:
                raise TaskFailed("States.Timeout", f"training job {name} is still {status}")
            time.sleep(0.05 if not self.jobs_run_themselves else 0.5)

    def _run_in_moto(self, name: str, arguments: dict) -> None:
        """Run the job `run_training_job` and record how it ended on moto's job."""
        job = self._moto_job(name)
        job.training_job_status, job.secondary_status = "InProgress", "Starting"
        failure = self.run_training_job(arguments)
        job.training_end_time = job.last_modified_time = datetime.now(timezone.utc)
        if failure is None:
            job.training_job_status = job.secondary_status = "Completed"
        else:
            job.training_job_status = job.secondary_status = "Failed"
            job.failure_reason = failure

    def _ensure_sync_rule(self) -> None:
        """The managed rule `.sync` follows training jobs through, made if missing."""
        from botocore.exceptions import ClientError

        events = self._client("events")
        try:
            try:
                events.describe_rule(Name=SYNC_RULE)
                return
            except events.exceptions.ResourceNotFoundException:
                pass
            pattern = {
                "source": ["aws.sagemaker"],
                "detail-type": ["SageMaker Training Job State Change"],
            }
            events.put_rule(Name=SYNC_RULE, EventPattern=json.dumps(pattern), State="ENABLED")
            # The real target is Step Functions' own; any ARN of the account stands for it here.
            target = f"arn:aws:states:{self.region}:{self.account}:stateMachine:{SYNC_RULE}"
            events.put_targets(Rule=SYNC_RULE, Targets=[{"Id": "StepFunctions", "Arn": target}])
        except ClientError as error:
            message = error.response["Error"].get("Message", str(error))
            raise TaskFailed(
                "States.TaskFailed",
                f"The state machine's role is not authorized to create managed-rule: {message}",
            ) from None

    def _moto_job(self, name: str):
        from moto.sagemaker.models import sagemaker_backends

        return sagemaker_backends[self.account][self.region].training_jobs[name]

    def invoke(self, arguments: dict) -> dict:
        from botocore.exceptions import ClientError

        function = arguments["FunctionName"]
        if self.enforcer is not None:
            try:
                self.enforcer.authorize("lambda", "Invoke", {"FunctionName": function})
            except ClientError as error:
                cause = _sdk_cause(error, "AWSLambda")
                raise TaskFailed("Lambda.AWSLambdaException", cause) from None
        handler = self.functions.get(function)
        if handler is None:
            raise TaskFailed("Lambda.ResourceNotFoundException", f"Function not found: {function}")
        try:
            payload = handler(json.loads(json.dumps(arguments.get("Payload", {}))))
        except Exception as error:
            # Lambda's answer for an unhandled error; Step Functions names the error after it.
            kind = type(error).__name__
            cause = {
                "errorMessage": str(error),
                "errorType": kind,
                "requestId": str(uuid.uuid4()),
                "stackTrace": traceback.format_tb(error.__traceback__),
            }
            raise TaskFailed(kind, json.dumps(cause)) from None
        return {
            "ExecutedVersion": "$LATEST",
            "Payload": json.loads(json.dumps(payload)),
            "StatusCode": 200,
        }


@contextlib.contextmanager
def _sdk_errors(client, prefix: str, base: str, service: str) -> Iterator[None]:
    """A `ClientError` as the state's error: `<prefix>.<code>` for an error the operation
    models (e.g. `DynamoDB.ConditionalCheckFailedException`), else `<prefix>.<base>`, the
    SDK's base exception (as Step Functions names an `AccessDenied`)."""
    from botocore.exceptions import ClientError

    try:
        yield
    except ClientError as error:
        code = error.response["Error"].get("Code", "")
        operation = client.meta.service_model.operation_model(error.operation_name)
        modeled = {shape.name for shape in operation.error_shapes}
        name = f"{prefix}.{code}" if code in modeled else f"{prefix}.{base}"
        raise TaskFailed(name, _sdk_cause(error, service)) from None


def _sdk_cause(error, service: str) -> str:
    """The cause as Step Functions writes an SDK error: the message, then the service's
    answer in parentheses."""
    body = error.response.get("Error", {})
    meta = error.response.get("ResponseMetadata", {})
    return (
        f"{body.get('Message', '')} (Service: {service}; Status Code: "
        f"{meta.get('HTTPStatusCode', 400)}; Error Code: {body.get('Code', '')}; "
        f"Request ID: {meta.get('RequestId', '')}; Proxy: null)"
    )


def _result(response: dict) -> dict:
    return {key: value for key, value in response.items() if key != "ResponseMetadata"}


def _epoch_millis(value: Any) -> Any:
    """Timestamps in an integration's result, as Step Functions writes them."""
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
