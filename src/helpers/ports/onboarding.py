"""The onboarding driver port: what moves a REQUESTED model to AVAILABLE or FAILED.

`helpers.services.local_onboarding.LocalOnboarding` drives models with threads of this process;
`helpers.infra.aws.onboarding.StepFunctionsOnboarding` starts the state machine of `cdk/`.
`helpers.backend.open_backend(...).onboarding()` picks one.
"""

from __future__ import annotations

import abc

from helpers.domain.records import ModelRecord


class Onboarding(abc.ABC):
    """Drives REQUESTED models to AVAILABLE or FAILED."""

    @abc.abstractmethod
    def start(self, model: ModelRecord) -> None:
        """Begin driving `model` (REQUESTED, just created); returns at once."""

    @abc.abstractmethod
    def cancel(self, model: ModelRecord) -> None:
        """Stop driving `model` and its training (its user is being deleted); returns once
        nothing more will be written for it."""

    def resume(self) -> int:
        """Pick up models a previous process left unfinished; return how many."""
        return 0

    def close(self) -> None:  # noqa: B027 (a driver with nothing to stop need not override)
        """Stop driving (work in the store and the jobs is left to resume)."""
