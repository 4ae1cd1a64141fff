"""How an endpoint serves user models: the two serving modes, as routing.

* `"per-user"`: one Triton model per user model (`helpers.services.packaging`); a request's
  `TargetModel` is the user's own archive.
* `"shared-base"`: one shared Triton model holds the base pipeline and swaps in the user's LoRA
  adapter (`helpers.services.serving`); a request targets the shared model and names the
  adapter, which only `Serving.route` sets, from the user's model name: a caller never chooses it.
"""

from __future__ import annotations

from dataclasses import dataclass

from helpers.domain.paths import check_model_name

SERVING_MODES = ("per-user", "shared-base")


@dataclass(frozen=True)
class Serving:
    """How an endpoint serves user models: a user's request's `TargetModel` and extra inputs.

    Args:
        mode (`str`, defaults to `"per-user"`): `"per-user"` (one Triton model per user model)
            or `"shared-base"` (one shared model; the user's adapter named in the request).
        shared_model (`str`, *optional*): the shared model's name (`PackagedModel.name` of
            `package_shared_base`); required for `"shared-base"`.
    """

    mode: str = "per-user"
    shared_model: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in SERVING_MODES:
            raise ValueError(f"mode must be one of {SERVING_MODES}, got {self.mode!r}")
        if self.mode == "shared-base" and not self.shared_model:
            raise ValueError("shared_model must name the shared-base model in 'shared-base' mode")

    def route(self, model: str) -> tuple[str, dict[str, str]]:
        """The `TargetModel` and extra request inputs for user model `model` (`<user>--<id>`)."""
        check_model_name(model)
        if self.mode == "per-user":
            return f"{model}.tar.gz", {}
        return f"{self.shared_model}.tar.gz", {"adapter": model}

    def load_test_targets(self, models: list[str]) -> tuple[list[str], str | None]:
        """`helpers.workshop.loadtest.run_load_test`'s `targets` and `shared_model` for user
        `models`."""
        if self.mode == "per-user":
            return [self.route(model)[0] for model in models], None
        return [check_model_name(model) for model in models], self.shared_model

    def invoke(self, runtime, endpoint_name: str, model: str, prompt: str, **parameters):
        """Generate with user model `model` through a boto3 `sagemaker-runtime` client.

        `parameters` are the generation inputs of `helpers.domain.generation.INPUT_TYPES`,
        except `adapter`, which comes from `model` alone.
        """
        from helpers.domain.generation import invoke_model

        if "adapter" in parameters:
            raise ValueError("adapter is set from the user's model name, never by the caller")
        target, extra = self.route(model)
        return invoke_model(runtime, endpoint_name, target, prompt, **extra, **parameters)
