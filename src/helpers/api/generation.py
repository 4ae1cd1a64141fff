"""Generate with a user's model on the multi-model endpoint, with errors the API can explain.

The same boto3 `sagemaker-runtime` call serves both backends (the local router speaks
SageMaker's runtime API). SageMaker's error types become `GenerationError`s that say whether
the client should retry and when.
"""

from __future__ import annotations

from botocore.exceptions import BotoCoreError, ClientError

from helpers.domain.generation import BINARY_JSON, build_request, parse_response
from helpers.domain.serving import PerUserModels, Serving
from helpers.services.serving import UNKNOWN_ADAPTER


class GenerationError(Exception):
    """The endpoint could not generate. `retry_after` (seconds) is set when a retry helps."""

    def __init__(self, message: str, code: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.retry_after = retry_after


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


def _explain(error: ClientError) -> GenerationError:
    code = error.response.get("Error", {}).get("Code", "")
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code == "ModelNotReadyException" or status == 429:
        return GenerationError(
            "your model is still loading on the inference endpoint; retry in a few seconds",
            "model_loading",
            retry_after=5,
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
