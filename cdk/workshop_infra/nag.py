"""cdk-nag's AwsSolutions checks, and how this app acknowledges a finding it accepts.

cdk-nag 3 reports through CDK's validation plugins: an unacknowledged error makes synthesis
fail with a report in `cdk.out/validation-report.json`. Every acknowledgment carries a reason
that a reviewer can check, and is copied into the template's `Metadata.cdk_nag`.
"""

from __future__ import annotations

from aws_cdk import Acknowledgment, App, Stack, Validations
from cdk_nag import AwsSolutionsChecks
from constructs import IConstruct

#: An acknowledgment must say why in at least this many words.
MIN_REASON_WORDS = 10


def add_nag_checks(app: App) -> None:
    """Run cdk-nag's AwsSolutions rules on every stack of `app` when it synthesizes."""
    Validations.of(app).add_plugins(
        AwsSolutionsChecks(app, write_suppressions_to_cloud_formation=True)
    )


def acknowledge(construct: IConstruct, rule: str, reason: str) -> None:
    """Accept the cdk-nag finding `rule` on `construct` and everything below it.

    Args:
        construct (`IConstruct`): where the finding is.
        rule (`str`): the finding's id, e.g. `"AwsSolutions-APIG4"`, or
            `"AwsSolutions-IAM5[Resource::*]"` for one finding of a rule that reports several.
        reason (`str`): why it is acceptable here, in at least `MIN_REASON_WORDS` words.

    Raises:
        ValueError: when `reason` is too short to explain anything.
    """
    if len(reason.split()) < MIN_REASON_WORDS:
        raise ValueError(
            f"reason for {rule} must say why in at least {MIN_REASON_WORDS} words, got {reason!r}"
        )
    Validations.of(construct).acknowledge(Acknowledgment(id=rule, reason=reason))


def arn_reference(construct: IConstruct) -> str:
    """How cdk-nag writes the `Arn` attribute of `construct`'s resource in a finding's id,
    `<LogicalId.Arn>`, for acknowledging a wildcard on that resource's ARN."""
    resource = construct.node.default_child or construct
    return f"<{Stack.of(construct).resolve(resource.logical_id)}.Arn>"


def wildcard_resource(resource: str) -> str:
    """The id of cdk-nag's finding of a wildcard in the IAM resource `resource` (written as
    cdk-nag writes it: `<AWS::Region>`, `<LogicalId.Arn>`)."""
    return f"AwsSolutions-IAM5[Resource::{resource}]"
