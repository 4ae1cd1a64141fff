"""How an endpoint serves user models: the two serving modes, as routing.

* `"per-user"`: one Triton model per user model (`helpers.services.packaging`); a request's
  `TargetModel` is the user's own archive.
* `"shared-base"`: one shared Triton model holds the base pipeline and swaps in the user's LoRA
  adapter (`helpers.services.serving`); a request targets the shared model and names the
  adapter, which only `Serving.route` sets, from the user's model name: a caller never chooses it.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

from helpers.domain.paths import check_model_name


class Serving(abc.ABC):
    """How an endpoint serves user models: a user's request's `TargetModel` and extra inputs.

    One strategy per serving mode (`PerUserModels`, `SharedBase`); `serving_for(mode)` gives
    the one a mode names. Callers route, invoke and record through it and never compare modes.
    """

    #: The mode's name, as settings, the API's `serving_mode` and the endpoint record spell it.
    mode: ClassVar[str]
    #: Whether each user's first request loads a model of its own (not only an adapter).
    loads_per_user: ClassVar[bool]

    @abc.abstractmethod
    def route(self, model: str) -> tuple[str, dict[str, str]]:
        """The `TargetModel` and extra request inputs for user model `model` (`<user>--<id>`)."""

    @abc.abstractmethod
    def load_test_targets(self, models: list[str]) -> tuple[list[str], str | None]:
        """`helpers.workshop.loadtest.load_test`'s `targets` and `shared_model` for user
        `models`."""

    def endpoint_models(self) -> tuple[str, ...]:
        """The models the endpoint serves beside the users' own (their archives must be on
        the prefix before it is deployed)."""
        return ()

    def record(self) -> dict[str, str]:
        """What an endpoint records of how it serves (`serving_from_record` reads it back)."""
        return {"mode": self.mode}

    def __str__(self) -> str:
        return self.mode

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


@dataclass(frozen=True)
class PerUserModels(Serving):
    """One Triton model per user model: a request targets the user's own archive."""

    mode: ClassVar[str] = "per-user"
    loads_per_user: ClassVar[bool] = True

    def route(self, model: str) -> tuple[str, dict[str, str]]:
        return f"{check_model_name(model)}.tar.gz", {}

    def load_test_targets(self, models: list[str]) -> tuple[list[str], str | None]:
        return [self.route(model)[0] for model in models], None


@dataclass(frozen=True)
class SharedBase(Serving):
    """One shared model for everyone: a request targets it and names the user's adapter.

    Args:
        shared_model (`str`): the shared model's name (`PackagedModel.name` of
            `helpers.services.serving.package_shared_base`).
    """

    shared_model: str
    mode: ClassVar[str] = "shared-base"
    loads_per_user: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not self.shared_model or not isinstance(self.shared_model, str):
            raise ValueError("shared_model must name the shared-base model")

    def route(self, model: str) -> tuple[str, dict[str, str]]:
        return f"{self.shared_model}.tar.gz", {"adapter": check_model_name(model)}

    def load_test_targets(self, models: list[str]) -> tuple[list[str], str | None]:
        return [check_model_name(model) for model in models], self.shared_model

    def endpoint_models(self) -> tuple[str, ...]:
        return (self.shared_model,)

    def record(self) -> dict[str, str]:
        return {"mode": self.mode, "shared_model": self.shared_model}

    def __str__(self) -> str:
        return f"{self.mode} ({self.shared_model})"


_STRATEGIES: dict[str, type[Serving]] = {
    PerUserModels.mode: PerUserModels,
    SharedBase.mode: SharedBase,
}
SERVING_MODES = tuple(_STRATEGIES)


def check_serving_mode(mode: str) -> str:
    """`mode` if it names a serving mode, else `ValueError` naming the choices."""
    if mode not in _STRATEGIES:
        raise ValueError(f"mode must be one of {SERVING_MODES}, got {mode!r}")
    return mode


def serving_for(mode: str = PerUserModels.mode, shared_model: str | None = None) -> Serving:
    """The strategy of serving `mode` (`ValueError` naming the modes for another);
    `shared_model` is the shared-base model's name, which only that mode takes."""
    strategy = _STRATEGIES[check_serving_mode(mode)]
    return strategy(shared_model) if strategy is SharedBase else strategy()


def serving_from_record(record: dict[str, str]) -> Serving:
    """`Serving.record()` read back (per-user models where nothing was recorded)."""
    return serving_for(record.get("mode") or PerUserModels.mode, record.get("shared_model"))
