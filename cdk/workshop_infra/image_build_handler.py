"""The serving image's build as a CloudFormation custom resource (`custom_resources.Provider`).

This file is the whole code of two Lambda functions (`serving_image.ServingImage` packages it
alone): it needs nothing but boto3, which Lambda's Python runtime has.

- `on_event` starts a build of the CodeBuild project named in the resource's properties on
  Create and on Update (a new `ImageTag`: the Dockerfile or the pinned packages changed). On
  Delete it does nothing: the repository's lifecycle rule expires old images and the repository
  goes with the stack.
- `is_complete` polls that build until it ends: SUCCEEDED completes the resource; any other end
  raises, which fails the deployment with the phase that failed, its reason and where the
  build's log is, so that the SageMaker model is never created with an image that is not there.
"""

from __future__ import annotations

from typing import Any

import boto3

#: `buildStatus` while a build runs; every other status is an end.
IN_PROGRESS = "IN_PROGRESS"
SUCCEEDED = "SUCCEEDED"


def on_event(event: dict[str, Any], context: Any = None, codebuild=None) -> dict[str, Any]:
    """Start the image's build on Create and Update; nothing on Delete.

    Args:
        event (`dict`): CloudFormation's request; `ResourceProperties` holds `ProjectName`
            and `ImageUri` (`<repository uri>:<tag>`).
        context: Lambda's context (unused).
        codebuild (*optional*): a boto3 `codebuild` client.

    Returns:
        `dict`: the physical id (the image URI: a new tag replaces the resource) and, as
        `Data.BuildId`, the build that `is_complete` follows.
    """
    if event["RequestType"] == "Delete":
        return {"PhysicalResourceId": event["PhysicalResourceId"]}
    properties = event["ResourceProperties"]
    client = codebuild or boto3.client("codebuild")
    build = client.start_build(projectName=properties["ProjectName"])["build"]
    print(f"started {build['id']} for {properties['ImageUri']}")
    return {"PhysicalResourceId": properties["ImageUri"], "Data": {"BuildId": build["id"]}}


def is_complete(event: dict[str, Any], context: Any = None, codebuild=None) -> dict[str, Any]:
    """Whether the build that `on_event` started has pushed the image.

    Args:
        event (`dict`): CloudFormation's request with `on_event`'s answer merged in.
        context: Lambda's context (unused).
        codebuild (*optional*): a boto3 `codebuild` client.

    Raises:
        RuntimeError: the build ended without success (the message says where and why).
    """
    if event["RequestType"] == "Delete":
        return {"IsComplete": True}
    build_id = event["Data"]["BuildId"]
    client = codebuild or boto3.client("codebuild")
    builds = client.batch_get_builds(ids=[build_id])["builds"]
    if not builds:
        raise RuntimeError(f"the serving image's build {build_id} is gone")
    build = builds[0]
    status = build["buildStatus"]
    if status == IN_PROGRESS:
        return {"IsComplete": False}
    if status == SUCCEEDED:
        image_uri = event["ResourceProperties"]["ImageUri"]
        return {"IsComplete": True, "Data": {"ImageUri": image_uri}}
    raise RuntimeError(failure_message(build))


def failure_message(build: dict[str, Any]) -> str:
    """What went wrong in `build` (an entry of `BatchGetBuilds`): its status, the first phase
    that did not succeed with CodeBuild's reason, and its log."""
    failed = [
        phase
        for phase in build.get("phases", [])
        if phase.get("phaseStatus") not in (None, SUCCEEDED)
    ]
    where = ""
    if failed:
        phase = failed[0]
        reasons = "; ".join(
            context["message"] for context in phase.get("contexts", []) if context.get("message")
        )
        where = f" in phase {phase['phaseType']} ({phase['phaseStatus']})"
        where += f": {reasons}" if reasons else ""
    logs = build.get("logs", {}).get("deepLink")
    return f"the serving image's build {build['id']} ended {build['buildStatus']}{where}" + (
        f"; log: {logs}" if logs else ""
    )
