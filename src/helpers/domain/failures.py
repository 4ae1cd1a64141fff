"""Why a model failed, as its user reads it: a fixed vocabulary plus an opaque reference.

A model's `failure_reason` goes to its user (`GET /v1/models/{id}`), so it never holds log
lines, exception text, paths, bucket names or tracebacks. The details are for operators: they
are logged with the reference, and kept on the training job's record and in the model's
`params[FAILURE_PARAM]`, which the API never returns.

    reference = new_reference()
    reason = user_reason(PACKAGING_FAILED, reference)   # "packaging failed (ref 3f9c0a1b2d4e)"
"""

from __future__ import annotations

import re
import secrets

__all__ = [
    "FAILURE_PARAM",
    "NOT_STARTED",
    "ONBOARDING_FAILED",
    "PACKAGING_FAILED",
    "STEP_FAILED",
    "TRAINING_FAILED",
    "interrupted",
    "new_reference",
    "public_reason",
    "user_reason",
]

#: A training job that failed: it could not start, or its script exited with an error.
TRAINING_FAILED = "training failed: the training job ended with an error"
PACKAGING_FAILED = "packaging failed"
NOT_STARTED = "fine-tuning could not start"
#: Anything else, and what a reason outside this vocabulary is shown as.
ONBOARDING_FAILED = "onboarding failed"
#: The phrase for each step of the Step Functions workflow that can fail (others: the last).
STEP_FAILED = {"training": TRAINING_FAILED, "packaging": PACKAGING_FAILED}
#: The key of the model's params that holds `{"reference": ..., "detail": ...}` for operators.
FAILURE_PARAM = "failure"

_REFERENCE = r"[A-Za-z0-9_-]{1,80}"
_VOCABULARY = re.compile(
    "(?:"
    + "|".join(
        [
            re.escape(TRAINING_FAILED),
            re.escape(PACKAGING_FAILED),
            re.escape(NOT_STARTED),
            re.escape(ONBOARDING_FAILED),
            r"training was interrupted \d{1,3} times",
        ]
    )
    + rf")(?: \(ref {_REFERENCE}\))?"
)


def interrupted(attempts: int) -> str:
    """The reason of a model whose training was interrupted `attempts` times."""
    return f"training was interrupted {int(attempts)} times"


def new_reference() -> str:
    """An opaque reference that ties a user's reason to the operator's details."""
    return secrets.token_hex(6)


def user_reason(phrase: str, reference: str) -> str:
    """`phrase` (from this vocabulary) with its reference: `"<phrase> (ref <reference>)"`."""
    reason = f"{phrase} (ref {reference})"
    if _VOCABULARY.fullmatch(reason) is None:
        raise ValueError(f"{reason!r} is not in the failure vocabulary")
    return reason


def public_reason(reason: str | None) -> str | None:
    """`reason` if it is in this vocabulary, else `ONBOARDING_FAILED` (a reason written by an
    older version, or by a writer that forgot to sanitize, never reaches the user)."""
    if reason is None or _VOCABULARY.fullmatch(reason):
        return reason
    return ONBOARDING_FAILED
