"""The workshop's stack as if `cdk deploy` had run it, on the emulated AWS of the notebook tests:
the template `cdk synth` makes, its resources made in moto as CloudFormation would make them,
and each compute part run as AWS runs it:

- the onboarding state machine: its synthesized definition, interpreted by `step_functions`
  for every execution moto starts (a thread each); its training jobs run by moto's
  CreateTrainingJob (`sagemaker_platform.install_training_platform`, installed by the test);
  its packaging function a process of its own, per invocation;
- the API function: the same app in a uvicorn process on loopback, with the function's
  environment (API Gateway and Mangum aside: `test_api_lambda.py` covers them);
- the multi-model endpoint: the template's model, endpoint config and endpoint, served by
  `sagemaker_endpoint_platform` (installed by the test), its serving runtime loaded as an
  operator does after a deployment (`SageMakerEndpoint.prepare`).

Each function process runs under its role's policy (`iam_kernel`): every AWS call it makes is
authorized against the statements the template gives that role, and each refusal is
journaled (`DeployedStack.denials`). The state machine's own calls and the training jobs' run
in this process, unchecked here: `test_iam_workflow.py` and `test_iam_sagemaker_role.py` hold
them to their roles.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx
import iam_enforced
import step_functions
from iam_kernel import KernelEnforcement, kernel_enforcement

API_HANDLER = "helpers.lambdas.api_handler.handler"
PACKAGE_HANDLER = "helpers.lambdas.workflow.package_handler"

#: The API function's app under uvicorn, on the loopback port given as its argument.
_API_SERVER = """
import sys

import uvicorn

from helpers.api.app import create_app
from helpers.lambdas.api_handler import services_from_env

uvicorn.run(create_app(services_from_env()), host="127.0.0.1", port=int(sys.argv[1]),
            log_level="warning")
"""
#: One invocation of the packaging function: the event on stdin, its answer as the last line.
_PACKAGE = """
import json
import sys

from helpers.lambdas.workflow import package_handler

print(json.dumps(package_handler(json.load(sys.stdin))))
"""


@dataclass
class DeployedStack:
    """A deployment of the stack on the emulated AWS.

    Attributes:
        deployment (`iam_enforced.Deployment`): the template and its resolved names.
        api_url (`str`): where the API answers.
        executions (`list[step_functions.Execution]`): the finished onboarding executions.
        journals (`dict[str, KernelEnforcement]`): each function's allowed and refused calls.
        errors (`list[BaseException]`): what broke the interpreter itself (not a FAILED run).
    """

    deployment: iam_enforced.Deployment
    api_url: str = ""
    executions: list[step_functions.Execution] = field(default_factory=list)
    journals: dict[str, KernelEnforcement] = field(default_factory=dict)
    errors: list[BaseException] = field(default_factory=list)

    def denials(self) -> dict[str, list[dict]]:
        """Every function's refused requests, by handler (empty: none refused)."""
        return {h: j.denials() for h, j in self.journals.items() if j.denials()}


@contextlib.contextmanager
def deploy_stack(
    work_dir: Path, region: str, bucket: str, table: str, admin_key: str, **props
) -> Iterator[DeployedStack]:
    """Deploy the stack with `props` (`WorkshopProps`) for `bucket` and `table` (which exist
    already: notebook 01 made them) and the operator's `admin_key`; tear it down on exit.

    The test installs the training and endpoint platforms before, and keeps them after.
    """
    template = iam_enforced.synthesize(
        work_dir / "cdk.out",
        admin_key_sha256=hashlib.sha256(admin_key.encode()).hexdigest(),
        **props,
    )
    deployment = iam_enforced.Deployment(template, region, bucket, table)
    stack = DeployedStack(deployment)
    for handler in (API_HANDLER, PACKAGE_HANDLER):
        statements = deployment.role_statements(deployment.function_role(handler))
        journal = work_dir / "iam" / handler.rsplit(".", 1)[-1]
        stack.journals[handler] = kernel_enforcement(journal, statements, region)
    _create_endpoint(deployment)
    with _state_machine(stack, work_dir), _api(stack, work_dir) as url:
        stack.api_url = url
        yield stack
    _delete_endpoint(deployment)


def _function_env(stack: DeployedStack, handler: str, work_dir: Path) -> dict[str, str]:
    """A function process's environment: the stack's for it, its role's enforcement, and
    this process's way to the emulated AWS (endpoints, credentials)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKSHOP_")}
    env.update(stack.deployment.function_environment(handler))
    del env["WORKSHOP_MODEL_CODE_DIR"]  # the bundle's folder, /var/task/...: the checkout's
    env["WORKSHOP_WORK_DIR"] = str(work_dir / "lambda-tmp")  # Lambda's /tmp
    env.update(stack.journals[handler].env)
    return env


def _create_endpoint(deployment: iam_enforced.Deployment) -> None:
    """The template's SageMaker model, endpoint config and endpoint, in that order (their
    CloudFormation properties are the API's parameters), then the serving runtime loaded."""
    import boto3

    from helpers.infra.aws.endpoint import SageMakerEndpoint

    client = boto3.client("sagemaker", region_name=deployment.region)
    create = {
        "AWS::SageMaker::Model": client.create_model,
        "AWS::SageMaker::EndpointConfig": client.create_endpoint_config,
        "AWS::SageMaker::Endpoint": client.create_endpoint,
    }
    resources = deployment.template["Resources"]
    model = None
    for kind, call in create.items():
        for logical_id, resource in resources.items():
            if resource["Type"] == kind:
                name = deployment.resolve({"Fn::GetAtt": [logical_id, _name_attribute(kind)]})
                properties = deployment.resolve(resource["Properties"])
                call(**{_name_attribute(kind): name, **properties})
                if kind == "AWS::SageMaker::Model":
                    model = properties
    endpoint = SageMakerEndpoint(
        deployment.region, model["ExecutionRoleArn"], name=_endpoint_name(deployment)
    )
    endpoint.wait()  # CreateEndpoint answered once it was up (the platform is synchronous)


def _delete_endpoint(deployment: iam_enforced.Deployment) -> None:
    import boto3

    client = boto3.client("sagemaker", region_name=deployment.region)
    with contextlib.suppress(client.exceptions.ClientError):
        client.delete_endpoint(EndpointName=_endpoint_name(deployment))


def _name_attribute(kind: str) -> str:
    return iam_enforced.SAGEMAKER_RESOURCES[kind][1]


def _endpoint_name(deployment: iam_enforced.Deployment) -> str:
    [name] = [
        deployment.resolve(resource["Properties"]["EndpointName"])
        for resource in deployment.template["Resources"].values()
        if resource["Type"] == "AWS::SageMaker::Endpoint"
    ]
    return name


@contextlib.contextmanager
def _state_machine(stack: DeployedStack, work_dir: Path) -> Iterator[None]:
    """The state machine in moto, each execution it starts run by the interpreter."""
    import boto3
    from moto.stepfunctions.models import StepFunctionBackend

    deployment = stack.deployment
    machine_id = iam_enforced.onboarding_machine_id(deployment.template)
    properties = deployment.template["Resources"][machine_id]["Properties"]
    definition = json.loads(deployment.resolve(properties["DefinitionString"]))
    role_arn = deployment.resolve(properties["RoleArn"])
    machine_arn = boto3.client("stepfunctions", region_name=deployment.region).create_state_machine(
        name=deployment.state_machine_name(), definition=json.dumps(definition), roleArn=role_arn
    )["stateMachineArn"]
    assert machine_arn == deployment.resolve({"Ref": machine_id})
    package_arn = deployment.resolve(
        {"Fn::GetAtt": [deployment.function_id(PACKAGE_HANDLER), "Arn"]}
    )
    package_env = _function_env(stack, PACKAGE_HANDLER, work_dir)

    def package(payload: dict) -> dict:
        answer = subprocess.run(
            [sys.executable, "-c", _PACKAGE],
            input=json.dumps(payload),
            capture_output=True,
            text=True,
            env=package_env,
            timeout=300,
        )
        if answer.returncode:
            raise RuntimeError(answer.stderr.strip().splitlines()[-1])
        return json.loads(answer.stdout.strip().splitlines()[-1])

    integrations = step_functions.AwsIntegrations(
        deployment.region, {package_arn: package}, jobs_run_themselves=True, wait_seconds=600
    )

    def run(execution) -> None:
        try:
            finished = step_functions.run_execution(
                definition,
                json.loads(execution.execution_input),
                execution.name,
                integrations,
                state_machine_arn=machine_arn,
                role_arn=role_arn,
            )
        except BaseException as error:  # the interpreter's own failure: the test's to see
            stack.errors.append(error)
            execution.status, execution.error = "FAILED", type(error).__name__
            return
        stack.executions.append(finished)
        if execution.status == "RUNNING":  # not stopped meanwhile
            execution.status = finished.status
            execution.output = json.dumps(finished.output) if finished.output else None
            execution.error, execution.cause = finished.error, finished.cause
        execution.stop_date = datetime.now(timezone.utc)

    threads: list[threading.Thread] = []
    start_execution = StepFunctionBackend.start_execution

    def starting(backend, state_machine_arn, name, execution_input):
        execution = start_execution(backend, state_machine_arn, name, execution_input)
        new = execution.name not in {thread.name for thread in threads}
        if state_machine_arn == machine_arn and execution.status == "RUNNING" and new:
            thread = threading.Thread(target=run, args=(execution,), name=execution.name)
            threads.append(thread)
            thread.start()
        return execution

    StepFunctionBackend.start_execution = starting
    try:
        yield
    finally:
        StepFunctionBackend.start_execution = start_execution
        for thread in threads:
            thread.join(timeout=600)


@contextlib.contextmanager
def _api(stack: DeployedStack, work_dir: Path) -> Iterator[str]:
    """The API function's app under uvicorn on a free loopback port, until the block ends."""
    from helpers.infra.local.processes import spawn
    from helpers.infra.local.triton_server import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (work_dir / "api.log").open("w")
    process = spawn(
        [sys.executable, "-c", _API_SERVER, str(port)],
        env=_function_env(stack, API_HANDLER, work_dir),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the API process ended: {(work_dir / 'api.log').read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=5, trust_env=False).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the API did not answer: {(work_dir / 'api.log').read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
