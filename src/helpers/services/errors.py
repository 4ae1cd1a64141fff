"""The onboarding services' error: what a request got wrong, for the API to answer with."""

from __future__ import annotations


class OnboardingError(ValueError):
    """A request that cannot start: `field` names what is wrong, `allowed` what would do."""

    def __init__(self, message: str, field: str | None = None, allowed: str | None = None):
        super().__init__(message)
        self.field = field
        self.allowed = allowed
