"""The API's request and response bodies, with the bounds and examples the OpenAPI spec shows.

No bound here is a copy. A generation request's bounds and defaults are the per-user Triton
model's (`INPUTS` in `model_code/triton_sd/1/model.py`, read by
`helpers.domain.generation.generation_inputs`). A fine-tuning request's are the training
script's (`model_code/hyperparameters.py`, through `helpers.domain.hyperparameters`), except
where the API deliberately allows less: `TRAINING_LIMITS`, the product's limits for tenants,
each checked here to lie within the script's bounds.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from helpers.domain.generation import generation_inputs
from helpers.domain.hyperparameters import HYPERPARAMETERS
from helpers.domain.records import ModelStatus

USER_ID = r"^[a-z0-9_-]{1,64}$"
#: What a generation request may hold: the Triton model's input rules.
GENERATION_INPUTS = generation_inputs()
MAX_PROMPT_CHARS = GENERATION_INPUTS["prompt"].high

#: The API's product limits on a tenant's fine-tuning request, narrower than what the training
#: script accepts (`HYPERPARAMETERS`): name -> (low, high), None keeping the script's bound.
#: 10 to 2000 steps bounds a tenant's GPU time per model (fewer than 10 learn nothing);
#: learning rates above 0.1 and ranks above 64 only ruin or bloat a LoRA; a tenant's seeds have
#: one range, the generation seed's (a signed 32-bit integer, whatever the client's language).
TRAINING_LIMITS: dict[str, tuple[float | None, float | None]] = {
    "max_train_steps": (10, 2000),
    "learning_rate": (None, 0.1),
    "rank": (None, 64),
    "seed": (None, GENERATION_INPUTS["seed"].high),
}


def training_bounds(name: str) -> dict[str, Any]:
    """The `Field` bounds of hyperparameter `name`: the script's, narrowed by `TRAINING_LIMITS`.

    Raises:
        ValueError: when a limit lies outside the script's bounds (the API would accept a value
            the training job refuses).
    """
    rule = HYPERPARAMETERS[name]
    low, high = TRAINING_LIMITS.get(name, (None, None))
    low = rule.low if low is None else low
    high = rule.high if high is None else high
    if not (rule.low <= low <= high <= rule.high):
        raise ValueError(
            f"TRAINING_LIMITS[{name!r}] = ({low}, {high}) must lie within the training "
            f"script's bounds {rule.allowed()}"
        )
    bounds: dict[str, Any] = {"le": high}
    bounds["gt" if rule.low_open and low == rule.low else "ge"] = low
    if rule.multiple_of > 1:
        bounds["multiple_of"] = rule.multiple_of
    return bounds


def generation_field(name: str, required: bool = False, **extra: Any) -> Any:
    """A `GenerateRequest` field: the Triton model's default (none when `required`) and bounds
    for input `name`; `extra` goes to `Field` (a description)."""
    rule = GENERATION_INPUTS[name]
    default = ... if required else rule.default
    if rule.kind == "text":
        bounds = {"max_length": rule.high, **({"min_length": rule.low} if rule.low else {})}
    else:
        bounds = {"ge": rule.low, "le": rule.high}
        if rule.multiple_of > 1:
            bounds["multiple_of"] = rule.multiple_of
    return Field(default, **bounds, **extra)


class Body(BaseModel):
    """A request body: unknown fields are an error (a typo must not be silently ignored), and
    values are taken as sent: `"5"` or `false` is no integer, and NaN or infinity no number
    (strict mode). An integer is a valid float, and a whole float (`4.0`) a valid integer, as
    JSON Schema's `integer` says."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _whole_numbers_are_integers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, float) and value.is_integer():
            annotation = cls.model_fields[info.field_name].annotation
            if annotation is int or int in get_args(annotation):
                return int(value)
        return value


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable, machine-readable error code.")
    message: str = Field(description="What went wrong and how to fix it.")
    field: str | None = Field(None, description="The request field at fault, if one is.")
    allowed: str | None = Field(None, description="What the field accepts.")
    problems: list[dict] | None = Field(None, description="Every problem, for uploads.")
    resets_at: str | None = Field(
        None, description="On a 429: when the quota's window resets (ISO 8601 UTC)."
    )


class ErrorResponse(BaseModel):
    error: ErrorDetail

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": {
                        "code": "invalid_field",
                        "message": "num_images: Input should be less than or equal to "
                        f"{GENERATION_INPUTS['num_images'].high}",
                        "field": "num_images",
                        "allowed": f"{GENERATION_INPUTS['num_images'].low}-"
                        f"{GENERATION_INPUTS['num_images'].high}",
                    }
                }
            ]
        }
    )


class Health(BaseModel):
    status: Literal["ok", "unavailable"] = Field(
        "ok", description="unavailable (with status 503) while the inference endpoint is down."
    )
    backend: str
    endpoint: str | None = Field(
        None,
        description="The inference endpoint's state: InService, Restarting (its model server "
        "is not ready, or died and is being started again), Failed (died, not restarted) or "
        "NotDeployed; null where this API does not watch it (on AWS, SageMaker's own health "
        "checks do).",
    )


class CreateUser(Body):
    user_id: str = Field(pattern=USER_ID, description="1-64 of a-z, 0-9, '-' and '_'.")
    display_name: str | None = Field(None, max_length=100)

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"user_id": "ada", "display_name": "Ada"}]}
    )


class CreatedUser(BaseModel):
    user_id: str
    api_key: str = Field(description="Shown once; only its hash is stored. Send it as a Bearer.")
    created_at: str


class NewApiKey(BaseModel):
    user_id: str
    api_key: str = Field(
        description="Shown once; only its hash is stored. The key it replaces no longer works."
    )
    created_at: str


class UserInfo(BaseModel):
    user_id: str
    display_name: str | None
    created_at: str
    photos: int
    models: int


class Photo(BaseModel):
    name: str = Field(description="The stored photo (a hash of its content, PNG).")


class PhotoList(BaseModel):
    photos: list[Photo]
    count: int


class UploadUrlsRequest(Body):
    count: int = Field(1, ge=1, le=10, description="How many photos to upload.")
    content_type: Literal["image/jpeg", "image/png", "image/webp"] = Field(
        "image/jpeg",
        description="The photos' media type; each upload must send exactly this Content-Type.",
    )

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"count": 4, "content_type": "image/jpeg"}]},
    )


class UploadUrl(BaseModel):
    id: str = Field(description="The pending upload's id (GET /v1/photos/uploads lists them).")
    url: str = Field(description="POST a multipart/form-data body here.")
    fields: dict[str, str] = Field(
        description="Form fields to send as given, before the file (field `file`)."
    )
    method: Literal["POST"] = "POST"


class UploadUrls(BaseModel):
    uploads: list[UploadUrl]
    expires_in: int = Field(description="Seconds the forms stay valid.")
    max_bytes: int = Field(description="The largest file each form accepts; S3 refuses more.")


class PendingUpload(BaseModel):
    id: str
    bytes: int = Field(description="Its size; it is checked when fine-tuning starts.")


class PendingUploadList(BaseModel):
    uploads: list[PendingUpload]
    count: int


class FineTuneRequest(Body):
    max_train_steps: int = Field(
        HYPERPARAMETERS["max_train_steps"].default,
        **training_bounds("max_train_steps"),
        description="Optimizer steps.",
    )
    learning_rate: float | None = Field(None, **training_bounds("learning_rate"))
    rank: int | None = Field(None, **training_bounds("rank"), description="LoRA rank.")
    seed: int | None = Field(None, **training_bounds("seed"))

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"max_train_steps": 300}]}
    )

    def hyperparameters(self) -> dict:
        return self.model_dump(exclude_none=True)


class ModelInfo(BaseModel):
    model_id: str
    status: ModelStatus
    created_at: str
    updated_at: str
    failure_reason: str | None = None
    max_train_steps: int | None = None

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model_id": "m1",
                    "status": "TRAINING",
                    "created_at": "2026-11-26T05:00:00+00:00",
                    "updated_at": "2026-11-26T05:00:02+00:00",
                    "failure_reason": None,
                    "max_train_steps": 300,
                }
            ]
        }
    )


class ModelList(BaseModel):
    models: list[ModelInfo]


class GenerateRequest(Body):
    prompt: str = generation_field("prompt", required=True)
    negative_prompt: str = generation_field("negative_prompt")
    model_id: str | None = Field(
        None, pattern=USER_ID, description="One of your models; your latest AVAILABLE one if unset."
    )
    num_inference_steps: int = generation_field("num_inference_steps")
    guidance_scale: float | None = generation_field(
        "guidance_scale", description="Unset: the model's default (2.0 for the tiny models)."
    )
    seed: int = generation_field("seed", description="Image i uses seed + i.")
    width: int | None = generation_field("width")
    height: int | None = generation_field("height")
    num_images: int = generation_field("num_images")
    response_format: Literal["png", "json"] = Field(
        "png", description="png: one image/png body (num_images must be 1); json: base64 PNGs."
    )

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"prompt": "a photo of sks toy on the beach", "seed": 7}],
            # response_format png (the default) returns one image: num_images must be 1.
            "if": {"properties": {"response_format": {"const": "png"}}},
            "then": {"properties": {"num_images": {"const": 1}}},
        },
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_says_something(cls, prompt: str) -> str:
        # The model refuses a prompt of spaces; refused here it is a 422, not the model's 502.
        if not prompt.strip():
            raise ValueError("prompt must say what to draw, not only spaces")
        return prompt

    def parameters(self) -> dict:
        """The generation inputs the endpoint's model takes."""
        return self.model_dump(exclude={"prompt", "model_id", "response_format"}, exclude_none=True)


class GeneratedImage(BaseModel):
    png_base64: str
    seed: int


class Generation(BaseModel):
    model_id: str
    images: list[GeneratedImage]
