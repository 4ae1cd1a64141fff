"""The SageMaker execution role: found through IAM, or from SageMaker Studio's own session."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from helpers.settings import Settings


def resolve_execution_role(settings: Settings, session=None) -> str:
    """The SageMaker execution role ARN: `settings.role_arn` if set, checked with IAM; else
    the role of the current session when it runs as a SageMaker role (as in SageMaker Studio),
    its ARN (with its path) read through IAM.

    Raises:
        ValueError: naming `WORKSHOP_ROLE_ARN` and how to set it, when no role can be found.
    """
    import boto3

    session = session or boto3.Session(region_name=settings.region)
    if settings.role_arn:
        return _role_arn(
            session,
            settings.role_arn.rsplit("/", 1)[-1],
            f"WORKSHOP_ROLE_ARN {settings.role_arn!r} cannot be read through IAM",
            "; check the ARN and that this session may call iam:GetRole",
        )
    caller = session.client("sts").get_caller_identity()["Arn"]
    # Studio runs as arn:aws:sts::<account>:assumed-role/<role>/<session>, which drops the
    # role's path (the console's roles live under service-role/): IAM has the whole ARN.
    if ":assumed-role/" in caller:
        role = caller.split(":assumed-role/", 1)[1].split("/", 1)[0]
        return _role_arn(
            session,
            role,
            f"this session runs as the role {role!r}, whose ARN IAM would not give",
            ": let the role call iam:GetRole on itself, or set WORKSHOP_ROLE_ARN (the "
            "notebook's role_arn parameter) to its ARN, path included",
        )
    raise ValueError(
        f"this session runs as {caller}, not as a SageMaker execution role: set "
        "WORKSHOP_ROLE_ARN (or the notebook's role_arn parameter) to the ARN of a role that "
        "SageMaker can assume"
    )


def _role_arn(session, name: str, problem: str, fix: str) -> str:
    """The role `name`'s whole ARN (its path included) from IAM, or a `ValueError`:
    `problem`, IAM's answer in parentheses, then `fix`."""
    try:
        return session.client("iam").get_role(RoleName=name)["Role"]["Arn"]
    except Exception as error:
        raise ValueError(f"{problem} ({error}){fix}") from None
