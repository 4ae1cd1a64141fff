"""The API's request and response bodies, with the bounds and examples the OpenAPI spec shows."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from helpers.domain.records import ModelStatus

USER_ID = r"^[a-z0-9_-]{1,64}$"
MAX_PROMPT_CHARS = 500


class Body(BaseModel):
    """A request body: unknown fields are an error (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid")


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable, machine-readable error code.")
    message: str = Field(description="What went wrong and how to fix it.")
    field: str | None = Field(None, description="The request field at fault, if one is.")
    allowed: str | None = Field(None, description="What the field accepts.")
    problems: list[dict] | None = Field(None, description="Every problem, for uploads.")


class ErrorResponse(BaseModel):
    error: ErrorDetail

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": {
                        "code": "invalid_field",
                        "message": "num_images: Input should be less than or equal to 4",
                        "field": "num_images",
                        "allowed": "1-4",
                    }
                }
            ]
        }
    )


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    backend: str


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

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"count": 4}]})


class UploadUrl(BaseModel):
    url: str
    method: Literal["PUT"] = "PUT"


class UploadUrls(BaseModel):
    uploads: list[UploadUrl]
    expires_in: int = Field(description="Seconds the URLs stay valid.")


class FineTuneRequest(Body):
    max_train_steps: int = Field(300, ge=10, le=2000, description="Optimizer steps.")
    learning_rate: float | None = Field(None, gt=0, le=0.1)
    rank: int | None = Field(None, ge=1, le=64, description="LoRA rank.")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)

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
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    model_id: str | None = Field(
        None, pattern=USER_ID, description="One of your models; your latest AVAILABLE one if unset."
    )
    num_inference_steps: int = Field(20, ge=1, le=100)
    guidance_scale: float | None = Field(
        None, ge=0, le=20, description="Unset: the model's default (2.0 for the tiny models)."
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Image i uses seed + i.")
    width: int | None = Field(None, ge=64, le=1024, multiple_of=8)
    height: int | None = Field(None, ge=64, le=1024, multiple_of=8)
    num_images: int = Field(1, ge=1, le=4)
    response_format: Literal["png", "json"] = Field(
        "png", description="png: one image/png body (num_images must be 1); json: base64 PNGs."
    )

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"prompt": "a photo of sks toy on the beach", "seed": 7}],
        },
    )

    def parameters(self) -> dict:
        """The generation inputs the endpoint's model takes."""
        return self.model_dump(exclude={"prompt", "model_id", "response_format"}, exclude_none=True)


class GeneratedImage(BaseModel):
    png_base64: str
    seed: int


class Generation(BaseModel):
    model_id: str
    images: list[GeneratedImage]
