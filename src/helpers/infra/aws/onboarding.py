"""The AWS onboarding driver: one execution of the `cdk/` state machine per model.

The state machine trains (SageMaker `CreateTrainingJob.sync`), packages (a Lambda running
`helpers.lambdas.workflow.package_handler`) and marks the model AVAILABLE or FAILED: the steps
`helpers.services.local_onboarding.LocalOnboarding` runs in threads of its own process.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from helpers.domain.paths import source_dir_uri
from helpers.domain.records import ModelRecord
from helpers.infra.aws.jobs import SageMakerTrainingJobs, pack_source_dir
from helpers.ports.jobs import TrainingJobRequest
from helpers.ports.onboarding import Onboarding

if TYPE_CHECKING:
    from helpers.ports.store import ArtifactStore
    from helpers.settings import Settings


class StepFunctionsOnboarding(Onboarding):
    """Starts the onboarding state machine of `cdk/` for each model.

    The execution's name is `<user_id>-<model_id>`, so a repeated start is refused by Step
    Functions instead of training twice.

    Args:
        settings (`Settings`), store (`ArtifactStore`): the bucket the code and photos are in.
        state_machine_arn (`str`): the onboarding state machine.
        jobs (`SageMakerTrainingJobs`): builds each execution's training-job configuration.
        training_request (`Callable[[ModelRecord], TrainingJobRequest]`): the job a model
            trains with (`helpers.services.onboarding.training_request`, bound to settings).
        client (*optional*): a boto3 `stepfunctions` client.
    """

    def __init__(
        self,
        settings: Settings,
        store: ArtifactStore,
        state_machine_arn: str,
        jobs: SageMakerTrainingJobs,
        training_request: Callable[[ModelRecord], TrainingJobRequest],
        client=None,
    ) -> None:
        import boto3

        self.settings = settings
        self.store = store
        self.state_machine_arn = state_machine_arn
        self.jobs = jobs
        self.training_request = training_request
        self.client = client or boto3.client("stepfunctions", region_name=settings.region)

    def execution_input(self, model: ModelRecord) -> dict[str, Any]:
        # A local base model directory (the default) is uploaded once, as `submit` does.
        request = self.jobs.with_training_base_model(self.training_request(model))
        source_uri = source_dir_uri(self.settings.bucket, request.job_name)
        self.store.put_bytes(source_uri, pack_source_dir(self.jobs.code_dir))
        return {
            "user_id": model.user_id,
            "model_id": model.model_id,
            "training_job": self.jobs.training_job_config(request, source_uri),
            "training_output_uri": request.output_uri,
        }

    def start(self, model: ModelRecord) -> None:
        self.client.start_execution(
            stateMachineArn=self.state_machine_arn,
            name=execution_name(model),
            input=json.dumps(self.execution_input(model), default=str),
        )

    def cancel(self, model: ModelRecord) -> None:
        """Stop the model's execution; Step Functions stops a `.sync` training job with it."""
        arn = self.state_machine_arn.replace(":stateMachine:", ":execution:", 1)
        with contextlib.suppress(self.client.exceptions.ExecutionDoesNotExist):
            self.client.stop_execution(
                executionArn=f"{arn}:{execution_name(model)}", cause="the user was deleted"
            )


def execution_name(model: ModelRecord) -> str:
    """One execution per model: Step Functions refuses a second start of the same name."""
    return f"{model.user_id}-{model.model_id}"[:80]
