"""Generate with a user's model on the multi-model endpoint, with errors the API can explain.

The same boto3 `sagemaker-runtime` call serves both backends (the local router speaks
SageMaker's runtime API). SageMaker's error types become `GenerationError`s that say whether
the client should retry and when.
"""

from __future__ import annotations

from botocore.exceptions import BotoCoreError, ClientError

from helpers.api.errors import ApiError
from helpers.api.schemas import GENERATION_INPUTS, GenerateRequest
from helpers.domain.generation import (
    BINARY_JSON,
    WORK_TOO_LARGE,
    build_request,
    parse_response,
    work_allowed,
    work_budget,
    work_error,
)
from helpers.domain.serving import PerUserModels, Serving
from helpers.services.serving import UNKNOWN_ADAPTER

#: The router's error type for a model whose process died and is being loaded again.
MODEL_RESTARTING = "ModelRestarting"


class GenerationError(Exception):
    """The endpoint could not generate. `retry_after` (seconds) is set when a retry helps;
    `status` is the API's answer (503 with a retry, 502 without, 422 for the request's fault)."""

    def __init__(
        self, message: str, code: str, retry_after: int | None = None, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.retry_after = retry_after
        self.status = status or (503 if retry_after else 502)


class EndpointGenerator:
    """Generation through a multi-model endpoint.

    Args:
        runtime: a boto3 `sagemaker-runtime` client (the local router's, or AWS's).
        endpoint_name (`str`): the endpoint.
        serving (`Serving`, defaults to per-user models): how the endpoint serves a user's
            model: its own Triton model, or the shared base with the user's adapter.
    """

    def __init__(self, runtime, endpoint_name: str, serving: Serving | None = None) -> None:
        self.runtime = runtime
        self.endpoint_name = endpoint_name
        self.serving = serving or PerUserModels()

    def generate(self, endpoint_model_name: str, prompt: str, **parameters) -> list[bytes]:
        """PNG files from model `endpoint_model_name` (`<user>--<model_id>`)."""
        target, extra = self.serving.route(endpoint_model_name)
        body, content_type = build_request(prompt, **extra, **parameters)
        try:
            answer = self.runtime.invoke_endpoint(
                EndpointName=self.endpoint_name,
                TargetModel=target,
                ContentType=content_type,
                Accept=BINARY_JSON,
                Body=body,
            )
        except ClientError as error:
            raise _explain(error) from None
        except BotoCoreError as error:
            raise GenerationError(
                f"the inference endpoint did not answer ({type(error).__name__}); retry shortly",
                "endpoint_unavailable",
                retry_after=5,
            ) from None
        return parse_response(answer["Body"].read(), answer.get("ContentType"))


def check_work(request: GenerateRequest, gpu: bool) -> None:
    """Raise a 422 `ApiError` ("work_too_large", naming the field to lower) when `request`
    asks for more work than an endpoint with (or without) a GPU gives one request. Unset sides
    count as the smallest allowed and unset guidance as guided: the model checks again with
    its own defaults, and its refusal is the same 422 (`_explain`)."""
    smallest = GENERATION_INPUTS["width"].low
    values = {
        "width": request.width or smallest,
        "height": request.height or smallest,
        "num_inference_steps": request.num_inference_steps,
        "num_images": request.num_images,
        "guidance_scale": 2.0 if request.guidance_scale is None else request.guidance_scale,
    }
    budget = work_budget(gpu)
    problem = work_error(values, budget)
    if problem:
        field, allowed = work_allowed(values, budget)
        raise ApiError(422, WORK_TOO_LARGE, problem, field=field, allowed=allowed)


def _explain(error: ClientError) -> GenerationError:
    code = error.response.get("Error", {}).get("Code", "")
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code == "ModelNotReadyException" or status == 429:
        return GenerationError(
            "your model is still loading on the inference endpoint; retry in a few seconds",
            "model_loading",
            retry_after=5,
        )
    if code == MODEL_RESTARTING:
        return GenerationError(
            "your model's process on the inference endpoint stopped and is being loaded again; "
            "retry in a few seconds",
            "model_restarting",
            retry_after=5,
        )
    message = error.response.get("OriginalMessage") or error.response.get("Error", {}).get(
        "Message", ""
    )
    if WORK_TOO_LARGE in message:  # the model's own check, where the API could not know a size
        return GenerationError(
            message[message.index(WORK_TOO_LARGE) :], "work_too_large", status=422
        )
    if code == "ModelError" and "timed out" in message:
        return GenerationError(
            "the inference endpoint stopped waiting for your images (it allows a few minutes, "
            "queueing included); ask for fewer steps, images or pixels",
            "generation_timeout",
            status=504,
        )
    if code in ("ServiceUnavailable", "ThrottlingException") or status in (502, 503, 504):
        return GenerationError(
            "the inference endpoint is busy or restarting; retry shortly",
            "endpoint_unavailable",
            retry_after=5,
        )
    if code == "ValidationError" or UNKNOWN_ADAPTER in str(error):
        return GenerationError(
            "your model is not on the inference endpoint (it may still be packaging)",
            "model_not_deployed",
            retry_after=30,
        )
    return GenerationError(f"the model could not generate: {code or status}", "model_error")
