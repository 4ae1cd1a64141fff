"""The serving image in the stack (`cdk/workshop_infra/serving_image.py`): built in AWS by
CodeBuild from `model_code/serving_image/Dockerfile`, waited for by a custom resource, and run
by the endpoint's model; or, with `serving_image="triton"`, none of it.

One app with three stacks, synthesized once for the module (about 15 s, `bundle=False`, with
cdk-nag): the defaults (the workshop image), a stack with a serving runtime (SageMaker's Triton
image), and one without an endpoint. The build handlers run against CodeBuild in moto.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from iam_enforced import (
    ACCOUNT,
    CDK_DIR,
    Deployment,
    failed_nag_reports,
    import_infra,
    synthesize_with_nag,
)

from helpers.workshop.aws_stack import node_problem

os.environ.setdefault("JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION", "1")
os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")

if (_NODE_PROBLEM := node_problem()) is not None:  # importing aws_cdk starts node
    pytest.skip(f"the CDK needs Node.js: {_NODE_PROBLEM}", allow_module_level=True)

import aws_cdk as cdk
from aws_cdk.assertions import Template

RUNTIME = "runtime-0123456789ab"
REGION = "eu-west-1"
MODEL_CODE = CDK_DIR.parent / "model_code"


@pytest.fixture(scope="module")
def infra():
    return import_infra()


@dataclass
class Synthesized:
    outdir: Path
    workshop: dict
    triton: dict
    no_endpoint: dict


@pytest.fixture(scope="module")
def synthesized(infra, tmp_path_factory) -> Synthesized:
    outdir = tmp_path_factory.mktemp("cdk.out")
    app = cdk.App(outdir=str(outdir))
    stacks = {
        "Workshop": infra.WorkshopProps(bundle=False),
        "Triton": infra.WorkshopProps(bundle=False, serving_runtime=RUNTIME),
        "NoEndpoint": infra.WorkshopProps(bundle=False, deploy_endpoint=False),
    }
    made = {name: infra.WorkshopStack(app, name, props=props) for name, props in stacks.items()}
    synthesize_with_nag(infra, app, outdir)
    workshop, triton, no_endpoint = (Template.from_stack(s).to_json() for s in made.values())
    return Synthesized(outdir, workshop, triton, no_endpoint)


def of_type(template: dict, type_: str) -> dict[str, dict]:
    return {k: r for k, r in template["Resources"].items() if r["Type"] == type_}


def one(template: dict, type_: str) -> tuple[str, dict]:
    found = of_type(template, type_)
    assert len(found) == 1, f"expected one {type_}, found {list(found)}"
    return next(iter(found.items()))


def environment(project: dict) -> dict[str, Any]:
    return {
        v["Name"]: v["Value"] for v in project["Properties"]["Environment"]["EnvironmentVariables"]
    }


def as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def role_statements(template: dict, role_id: str) -> list[dict]:
    return [
        statement
        for policy in of_type(template, "AWS::IAM::Policy").values()
        if {"Ref": role_id} in policy["Properties"]["Roles"]
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]
    ]


def deployed(template: dict) -> Deployment:
    """The template as deployed in `REGION` (intrinsics resolved by the IAM harness)."""
    return Deployment(template, REGION, "workshop-bucket", "workshop-table")


# -------------------------------------------------------------------- the repository and build


@pytest.mark.slow
def test_the_default_stack_builds_the_serving_image_into_its_own_repository(synthesized):
    _, repository = one(synthesized.workshop, "AWS::ECR::Repository")
    properties = repository["Properties"]
    assert properties["ImageScanningConfiguration"] == {"ScanOnPush": True}
    rules = json.loads(properties["LifecyclePolicy"]["LifecyclePolicyText"])["rules"]
    assert [r["selection"]["countNumber"] for r in rules] == [5]
    assert [r["action"]["type"] for r in rules] == ["expire"]
    # Images go with the stack (rebuilt from the checkout in minutes); the bucket stays.
    assert repository["DeletionPolicy"] == "Delete" and properties["EmptyOnDelete"] is True


@pytest.mark.slow
def test_the_build_context_is_model_code_uploaded_as_an_asset(synthesized):
    _, project = one(synthesized.workshop, "AWS::CodeBuild::Project")
    env = environment(project)
    source = deployed(synthesized.workshop).resolve(env["SOURCE_URI"])
    asset_hash = source.rsplit("/", 1)[1].removesuffix(".zip")
    assert source == f"s3://cdk-hnb659fds-assets-{ACCOUNT}-{REGION}/{asset_hash}.zip"
    context = synthesized.outdir / f"asset.{asset_hash}"
    assert (context / env["DOCKERFILE"]).read_bytes() == (
        MODEL_CODE / "serving_image" / "Dockerfile"
    ).read_bytes()
    # Only what the build reads: the Dockerfile and what it copies (the pinned requirements).
    files = {p.relative_to(context).as_posix() for p in context.rglob("*") if p.is_file()}
    assert files == {"serving_image/Dockerfile", "triton_runtime/requirements.txt"}
    # The tag is the context's hash: new pins or a new Dockerfile make a new image.
    assert env["IMAGE_TAG"] == f"serving-{asset_hash[:16]}"


@pytest.mark.slow
def test_the_project_builds_privileged_from_the_regions_triton_image(synthesized):
    _, project = one(synthesized.workshop, "AWS::CodeBuild::Project")
    properties = project["Properties"]
    assert properties["Environment"]["PrivilegedMode"] is True  # docker build needs it
    assert properties["Environment"]["Image"].startswith("aws/codebuild/standard:")
    assert properties["Source"]["Type"] == "NO_SOURCE"  # the build copies its one object
    assert properties["TimeoutInMinutes"] == 60
    env = deployed(synthesized.workshop).resolve(environment(project))
    assert env["BASE_IMAGE"] == (
        f"763104351884.dkr.ecr.{REGION}.amazonaws.com/sagemaker-tritonserver:25.09-py3"
    )
    assert env["BASE_REGISTRY"] == f"763104351884.dkr.ecr.{REGION}.amazonaws.com"
    [(repository_id, _)] = of_type(synthesized.workshop, "AWS::ECR::Repository").items()
    assert env["REPOSITORY_URI"] == (
        f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/{repository_id.lower()}"
    )
    assert env["REPOSITORY_REGISTRY"] == f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com"
    # Its log group keeps a month.
    logs_id = properties["LogsConfig"]["CloudWatchLogs"]["GroupName"]["Ref"]
    assert synthesized.workshop["Resources"][logs_id]["Properties"]["RetentionInDays"] == 30


@pytest.mark.slow
def test_the_buildspec_builds_the_dockerfile_and_pushes_the_hashed_tag(synthesized, tmp_path):
    """The buildspec's commands run by bash as CodeBuild runs them, with the project's
    environment, the asset zipped as synthesis uploads it, and `aws` and `docker` recording
    their arguments (no Docker engine here): the build gets the Dockerfile of the context with
    the region's Triton image as its base, and pushes the tag the endpoint's model runs."""
    _, project = one(synthesized.workshop, "AWS::CodeBuild::Project")
    spec = json.loads(project["Properties"]["Source"]["BuildSpec"])
    env = deployed(synthesized.workshop).resolve(environment(project))
    asset = synthesized.outdir / f"asset.{env['SOURCE_URI'].rsplit('/', 1)[1][:-4]}"
    archive = tmp_path / "uploaded.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted(asset.rglob("*")):
            zipped.write(path, path.relative_to(asset))
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    stubs = {
        # `aws s3 cp <uri> <file>` copies the uploaded zip; `ecr get-login-password` a token.
        "aws": f'echo "aws $*" >> {calls}\n'
        f'if [ "$1" = s3 ]; then [ "$3" = "$SOURCE_URI" ] && cp {archive} "$4"; '
        "else echo token; fi\n",
        # `docker build` checks what a real build would read: the Dockerfile in the context.
        "docker": f'echo "docker $*" >> {calls}\n'
        'if [ "$1" = build ]; then test -f "$3" && grep -q "^ARG BASE_IMAGE" "$3"; fi\n',
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/bash\nset -e\n{body}")
        (bin_dir / name).chmod(stat.S_IRWXU)
    commands = [c for phase in ("pre_build", "build") for c in spec["phases"][phase]["commands"]]
    work = tmp_path / "src"
    work.mkdir()
    result = subprocess.run(
        ["bash", "-e", "-c", "\n".join(commands)],
        cwd=work,
        env={
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "AWS_REGION": REGION,
            **env,
        },
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    image = f"{env['REPOSITORY_URI']}:{env['IMAGE_TAG']}"
    calls = calls.read_text().splitlines()
    assert calls[0] == f"aws s3 cp {env['SOURCE_URI']} context.zip --only-show-errors"
    # Both ends of a pipe run at once: the logins' lines come in either order.
    assert sorted(calls[1:5]) == sorted(
        [
            f"aws ecr get-login-password --region {REGION}",
            f"docker login --username AWS --password-stdin {env['BASE_REGISTRY']}",
            f"aws ecr get-login-password --region {REGION}",
            f"docker login --username AWS --password-stdin {env['REPOSITORY_REGISTRY']}",
        ]
    )
    assert calls[5:] == [
        "docker build --file context/serving_image/Dockerfile "
        f"--build-arg BASE_IMAGE={env['BASE_IMAGE']} --tag {image} context",
        f"docker push {image}",
    ]
    # Build and push in one phase: CodeBuild runs post_build even after a failed build.
    assert set(spec["phases"]) == {"pre_build", "build"}


def test_the_dockerfile_takes_the_base_image_the_build_passes(infra):
    """The build passes `--build-arg BASE_IMAGE=...`: the Dockerfile must declare it before
    `FROM`, or every region would build on us-east-1's image (or fail)."""
    from workshop_infra.serving_image import BASE_IMAGE_ARG, DOCKERFILE

    lines = [
        line.split()
        for line in (MODEL_CODE / DOCKERFILE).read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0][0] == "ARG" and lines[0][1].split("=")[0] == BASE_IMAGE_ARG
    assert lines[1] == ["FROM", f"${{{BASE_IMAGE_ARG}}}"]


def test_the_tag_changes_with_what_the_build_reads_and_nothing_else(infra, tmp_path):
    """A new Dockerfile or new pins: a new tag, so a new model and an updated endpoint; an edit
    elsewhere in `model_code/` (the training script): the same image, no 15-minute rebuild and
    no instance replaced."""
    from workshop_infra.serving_image import ServingImage

    def tag(context: Path) -> str:
        return ServingImage(cdk.Stack(cdk.App(), "Image"), "Image", context_dir=context).tag

    context = tmp_path / "model_code"
    shutil.copytree(MODEL_CODE, context, ignore=shutil.ignore_patterns("__pycache__"))
    first = tag(context)
    assert first.startswith("serving-") and len(first) == len("serving-") + 16
    with (context / "train_dreambooth_lora.py").open("a") as script:
        script.write("\n# an edit that the image does not contain\n")
    (context / "triton_runtime" / "__pycache__").mkdir(exist_ok=True)
    (context / "triton_runtime" / "__pycache__" / "x.pyc").write_bytes(b"stale")
    assert tag(context) == first
    with (context / "triton_runtime" / "requirements.txt").open("a") as requirements:
        requirements.write("\n# a new pin\n")
    second = tag(context)
    assert second != first
    with (context / "serving_image" / "Dockerfile").open("a") as dockerfile:
        dockerfile.write("\n# a new step\n")
    assert tag(context) not in (first, second)


def test_a_copy_from_outside_the_context_is_refused(infra, tmp_path):
    from workshop_infra.serving_image import copied_sources

    dockerfile = tmp_path / "serving_image" / "Dockerfile"
    dockerfile.parent.mkdir()
    for line, source in (("COPY ../secrets /x", "../secrets"), ("ADD gone.txt /x", "gone.txt")):
        dockerfile.write_text(f"FROM scratch\n{line}\n")
        with pytest.raises(ValueError, match=f"copies '{re.escape(source)}', which must be"):
            copied_sources(tmp_path, "serving_image/Dockerfile")
    # Flags are not sources, lines continue, and a copy from another stage is not the context's.
    dockerfile.write_text(
        "FROM scratch\nCOPY --chown=1000 serving_image/ \\\n  /opt/x/\nCOPY --from=base /a /b\n"
    )
    assert copied_sources(tmp_path, "serving_image/Dockerfile") == ["serving_image"]


@pytest.mark.slow
def test_the_build_role_reads_its_source_pulls_triton_and_pushes_only_its_repository(
    synthesized,
):
    template = synthesized.workshop
    _, project = one(template, "AWS::CodeBuild::Project")
    role_id = project["Properties"]["ServiceRole"]["Fn::GetAtt"][0]
    deployment = deployed(template)
    granted = deployment.resolve(role_statements(template, role_id))
    by_action: dict[str, list[str]] = {}
    for statement in granted:
        assert statement["Effect"] == "Allow"
        for action in as_list(statement["Action"]):
            by_action.setdefault(action, []).extend(as_list(statement["Resource"]))
    source = deployment.resolve(environment(project)["SOURCE_URI"])
    assert by_action.pop("s3:GetObject") == ["arn:aws:s3:::" + source.removeprefix("s3://")]
    repository = f"arn:aws:ecr:{REGION}:{ACCOUNT}:repository/" + (
        one(template, "AWS::ECR::Repository")[0].lower()
    )
    triton = f"arn:aws:ecr:{REGION}:763104351884:repository/sagemaker-tritonserver"
    for action in ("BatchGetImage", "GetDownloadUrlForLayer", "BatchCheckLayerAvailability"):
        assert sorted(by_action.pop(f"ecr:{action}")) == sorted([triton, repository])
    for action in ("PutImage", "InitiateLayerUpload", "UploadLayerPart", "CompleteLayerUpload"):
        assert by_action.pop(f"ecr:{action}") == [repository]
    assert by_action.pop("ecr:GetAuthorizationToken") == ["*"]  # no resource-level permission
    # What remains is logging (its log group) and CDK's report groups of this project.
    assert {a.split(":")[0] for a in by_action} == {"logs", "codebuild"}
    assert all(
        r.startswith(f"arn:aws:codebuild:{REGION}:{ACCOUNT}:report-group/")
        for a, resources in by_action.items()
        if a.startswith("codebuild:")
        for r in resources
    )


# -------------------------------------------------------------------- waiting for the build


@pytest.mark.slow
def test_a_custom_resource_waits_for_the_build_for_up_to_75_minutes(synthesized):
    template = synthesized.workshop
    _, resource = one(template, "Custom::ServingImageBuild")
    project_id, project = one(template, "AWS::CodeBuild::Project")
    properties = resource["Properties"]
    assert properties["ProjectName"] == {"Ref": project_id}
    assert properties["ImageTag"] == environment(project)["IMAGE_TAG"]
    # The provider's framework: onEvent starts the build, the waiter polls isComplete.
    provider = template["Resources"][properties["ServiceToken"]["Fn::GetAtt"][0]]
    variables = provider["Properties"]["Environment"]["Variables"]
    handlers = {
        name: template["Resources"][variables[f"USER_{name}_FUNCTION_ARN"]["Fn::GetAtt"][0]]
        for name in ("ON_EVENT", "IS_COMPLETE")
    }
    assert {n: h["Properties"]["Handler"] for n, h in handlers.items()} == {
        "ON_EVENT": "image_build_handler.on_event",
        "IS_COMPLETE": "image_build_handler.is_complete",
    }
    waiter = template["Resources"][variables["WAITER_STATE_MACHINE_ARN"]["Ref"]]
    definition = "".join(
        p for p in waiter["Properties"]["DefinitionString"]["Fn::Join"][1] if isinstance(p, str)
    )
    assert '"IntervalSeconds":30,"MaxAttempts":150' in definition  # 75 minutes
    # Each handler may only start, or only follow, builds of this one project.
    expected = {"ON_EVENT": "codebuild:StartBuild", "IS_COMPLETE": "codebuild:BatchGetBuilds"}
    for name, handler in handlers.items():
        role_id = handler["Properties"]["Role"]["Fn::GetAtt"][0]
        granted = {
            action: statement["Resource"]
            for statement in role_statements(template, role_id)
            for action in as_list(statement["Action"])
            if not action.startswith("logs:")
        }
        assert granted == {expected[name]: {"Fn::GetAtt": [project_id, "Arn"]}}
    # The handlers' code is the one module, nothing else.
    key = handlers["ON_EVENT"]["Properties"]["Code"]["S3Key"].removesuffix(".zip")
    assert sorted(p.name for p in (synthesized.outdir / f"asset.{key}").iterdir()) == [
        "image_build_handler.py"
    ]


@pytest.mark.slow
def test_the_model_runs_the_pushed_image_and_no_runtime_model(synthesized):
    template = synthesized.workshop
    build_id, build = one(template, "Custom::ServingImageBuild")
    _, model = one(template, "AWS::SageMaker::Model")
    container = model["Properties"]["PrimaryContainer"]
    assert build_id in model["DependsOn"]  # created only once the image is pushed
    assert container["Image"] == build["Properties"]["ImageUri"]
    [(repository_id, _)] = of_type(template, "AWS::ECR::Repository").items()
    tag = build["Properties"]["ImageTag"]
    assert deployed(template).resolve(container["Image"]) == (
        f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/{repository_id.lower()}:{tag}"
    )
    assert "Environment" not in container  # no WORKSHOP_RUNTIME_MODEL to prepare()
    # The packaging function names no runtime: user models import the image's packages.
    for function in of_type(template, "AWS::Lambda::Function").values():
        variables = function["Properties"].get("Environment", {}).get("Variables", {})
        assert "WORKSHOP_SERVING_RUNTIME" not in variables


@pytest.mark.slow
def test_the_execution_role_may_pull_the_serving_image_and_push_nothing(synthesized):
    template = synthesized.workshop
    _, model = one(template, "AWS::SageMaker::Model")
    role_id = model["Properties"]["ExecutionRoleArn"]["Fn::GetAtt"][0]
    ecr = [
        s
        for s in deployed(template).resolve(role_statements(template, role_id))
        if any(a.startswith("ecr:") for a in as_list(s["Action"]))
    ]
    repository = f"arn:aws:ecr:{REGION}:{ACCOUNT}:repository/" + (
        one(template, "AWS::ECR::Repository")[0].lower()
    )
    pull = [s for s in ecr if repository in as_list(s["Resource"])]
    assert len(pull) == 1
    assert sorted(as_list(pull[0]["Action"])) == [
        "ecr:BatchCheckLayerAvailability",
        "ecr:BatchGetImage",
        "ecr:GetDownloadUrlForLayer",
    ]
    # Every ECR statement is the pull statement, or the token that has no resource.
    for statement in ecr:
        if statement is not pull[0]:
            assert statement["Action"] == "ecr:GetAuthorizationToken"
            assert statement["Resource"] == "*"
    # The repositories it pulls from: AWS's training and Triton images, and this one.
    assert len(as_list(pull[0]["Resource"])) == 3


# -------------------------------------------------------------------- the other choices


IMAGE_RESOURCES = (
    "AWS::ECR::Repository",
    "AWS::CodeBuild::Project",
    "Custom::ServingImageBuild",
)


@pytest.mark.slow
def test_the_triton_image_needs_no_build_and_keeps_the_runtime_model(synthesized):
    from helpers.infra.aws.endpoint import RUNTIME_MODEL_ENV

    template = synthesized.triton
    for type_ in IMAGE_RESOURCES:
        assert not of_type(template, type_), type_
    _, model = one(template, "AWS::SageMaker::Model")
    container = deployed(template).resolve(model["Properties"]["PrimaryContainer"])
    assert container["Image"] == (
        f"763104351884.dkr.ecr.{REGION}.amazonaws.com/sagemaker-tritonserver:25.09-py3"
    )
    assert container["Environment"] == {RUNTIME_MODEL_ENV: f"{RUNTIME}.tar.gz"}
    package = [
        f
        for f in of_type(template, "AWS::Lambda::Function").values()
        if f["Properties"]["Handler"] == "helpers.lambdas.workflow.package_handler"
    ]
    assert package[0]["Properties"]["Environment"]["Variables"]["WORKSHOP_SERVING_RUNTIME"]


@pytest.mark.slow
def test_no_endpoint_no_image_build(synthesized):
    for type_ in (*IMAGE_RESOURCES, "AWS::SageMaker::Model"):
        assert not of_type(synthesized.no_endpoint, type_), type_


@pytest.mark.slow
def test_cdk_nag_finds_nothing_open_in_any_choice(synthesized):
    assert failed_nag_reports(synthesized.outdir) == []
    acknowledged = {
        rule["id"].split("[")[0]
        for resource in synthesized.workshop["Resources"].values()
        for rule in resource.get("Metadata", {}).get("cdk_nag", {}).get("rules_to_suppress", [])
    }
    assert {"AwsSolutions-CB3", "AwsSolutions-SF2"} <= acknowledged


# -------------------------------------------------------------------- the prop


def test_the_serving_image_prop_resolves_and_names_bad_values(infra):
    props = infra.WorkshopProps
    assert props().endpoint_image == "workshop"
    assert props(serving_runtime=RUNTIME).endpoint_image == "triton"
    assert props(serving_image="triton").endpoint_image == "triton"
    assert props.from_context({"workshop:serving_image": "triton"}.get).endpoint_image == "triton"
    with pytest.raises(ValueError, match=r"serving_image='workshop' and serving_runtime"):
        props(serving_image="workshop", serving_runtime=RUNTIME)
    with pytest.raises(ValueError, match=r"serving_image must be one of 'workshop', 'triton'"):
        props(serving_image="docker")


def test_the_endpoint_refuses_an_image_and_a_runtime_together(infra):
    from workshop_infra.endpoint import MultiModelEndpoint
    from workshop_infra.sagemaker_role import SageMakerExecutionRole
    from workshop_infra.storage import Storage

    stack = cdk.Stack(cdk.App(), "Endpoint")
    storage = Storage(stack, "Storage")
    role = SageMakerExecutionRole(stack, "SageMaker", storage).role
    with pytest.raises(ValueError, match="image_uri and serving_runtime"):
        MultiModelEndpoint(
            stack,
            "Mme",
            storage,
            role,
            "workshop-mme",
            "ml.g5.xlarge",
            serving_runtime=RUNTIME,
            image_uri="123456789012.dkr.ecr.eu-west-1.amazonaws.com/x:y",
        )


def test_a_missing_dockerfile_is_named(infra, tmp_path):
    from workshop_infra.serving_image import ServingImage

    stack = cdk.Stack(cdk.App(), "Image")
    with pytest.raises(ValueError, match=r"no Dockerfile at .*serving_image/Dockerfile"):
        ServingImage(stack, "Image", context_dir=tmp_path)


# -------------------------------------------------------------------- the handlers, on moto


@pytest.fixture
def codebuild(infra, monkeypatch):
    """CodeBuild in moto with a project like the stack's."""
    from moto import mock_aws

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    with mock_aws():
        import boto3

        client = boto3.client("codebuild", region_name=REGION)
        client.create_project(
            name="serving-image",
            # moto wants a location even where AWS has none (the stack's has NO_SOURCE).
            source={"type": "S3", "location": "bucket/context.zip", "buildspec": "version: 0.2"},
            artifacts={"type": "NO_ARTIFACTS"},
            environment={
                "type": "LINUX_CONTAINER",
                "image": "aws/codebuild/standard:7.0",
                "computeType": "BUILD_GENERAL1_MEDIUM",
                "privilegedMode": True,
            },
            serviceRole=f"arn:aws:iam::{ACCOUNT}:role/build",
        )
        yield client


def request(kind: str, **extra) -> dict:
    return {
        "RequestType": kind,
        "ResourceProperties": {
            "ProjectName": "serving-image",
            "ImageUri": f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/repo:serving-0123",
            "ImageTag": "serving-0123",
        },
        **extra,
    }


def test_creating_the_resource_starts_a_build_and_completes_when_it_succeeds(infra, codebuild):
    from workshop_infra import image_build_handler as handler

    started = handler.on_event(request("Create"))
    build_id = started["Data"]["BuildId"]
    assert started["PhysicalResourceId"].endswith("/repo:serving-0123")
    assert codebuild.list_builds_for_project(projectName="serving-image")["ids"] == [build_id]
    # The provider framework merges on_event's answer into the event it polls with.
    done = handler.is_complete({**request("Create"), **started})
    assert done == {"IsComplete": True, "Data": {"ImageUri": started["PhysicalResourceId"]}}
    # A new tag is an Update: another build; deleting the old image's resource builds nothing.
    handler.on_event(request("Update", PhysicalResourceId="old"))
    deleted = handler.on_event(request("Delete", PhysicalResourceId="old"))
    assert deleted == {"PhysicalResourceId": "old"}
    assert handler.is_complete(request("Delete", PhysicalResourceId="old"))["IsComplete"]
    assert len(codebuild.list_builds_for_project(projectName="serving-image")["ids"]) == 2


@pytest.mark.parametrize("status", ["IN_PROGRESS", "FAILED"])
def test_a_running_build_is_polled_again_and_a_failed_one_fails_with_its_reason(
    infra, codebuild, monkeypatch, status
):
    from moto.codebuild.models import CodeBuildBackend
    from workshop_infra import image_build_handler as handler

    started = handler.on_event(request("Create"))
    answer = CodeBuildBackend.batch_get_builds

    def as_it_ends(backend, ids):  # moto reports every build SUCCEEDED at once
        builds = answer(backend, ids)
        for build in builds:
            build["buildStatus"] = status
            for phase in build["phases"]:
                if phase["phaseType"] == "BUILD" and status == "FAILED":
                    phase["phaseStatus"] = "FAILED"
                    phase["contexts"] = [
                        {"statusCode": "COMMAND_EXECUTION_ERROR", "message": "exit status 1"}
                    ]
        return builds

    monkeypatch.setattr(CodeBuildBackend, "batch_get_builds", as_it_ends)
    event = {**request("Create"), **started}
    if status == "IN_PROGRESS":
        assert handler.is_complete(event) == {"IsComplete": False}  # no Data: the framework
        return  # refuses Data while incomplete
    with pytest.raises(RuntimeError) as failure:
        handler.is_complete(event)
    assert str(failure.value).startswith(
        f"the serving image's build {started['Data']['BuildId']} ended FAILED in phase BUILD "
        "(FAILED): exit status 1; log: https://console.aws.amazon.com/cloudwatch/"
    )


def test_the_handler_module_imports_only_what_lambda_has():
    """Lambda runs the module alone (no workshop_infra, no aws_cdk): boto3 and the stdlib."""
    source = (CDK_DIR / "workshop_infra" / "image_build_handler.py").read_text()
    imports = {
        line.split()[1].split(".")[0]
        for line in source.splitlines()
        if line.startswith(("import ", "from "))
    }
    assert imports == {"__future__", "typing", "boto3"}


# -------------------------------------------------------------------- the emulated deployment


@pytest.mark.slow
def test_the_emulated_deployment_serves_user_models_as_the_image_does(
    synthesized, monkeypatch, tmp_path, lora_weights, tiny_pipeline_dir
):
    """The default template's endpoint as `emulated_stack` deploys it (its model, config and
    endpoint created from the resolved template on the emulated SageMaker): a user model
    packaged as the packaging function packages it for this image (no runtime folder) serves
    a picture from its first request, with no runtime model loaded and none to `prepare()`:
    the emulated instance's Python has the packages, as the image's has."""
    import boto3
    import emulated_stack
    from aws_fakes import fake_aws
    from moto import mock_aws
    from sagemaker_endpoint_platform import install_endpoint_platform, training_output

    from helpers.domain.serving import PerUserModels
    from helpers.infra.aws.endpoint import RUNTIME_MODEL_ENV
    from helpers.infra.aws.store import S3ArtifactStore
    from helpers.services.serving import publish_user_model

    fake_aws(monkeypatch, REGION)
    deployment = Deployment(synthesized.workshop, REGION, "workshop-emulated", "workshop-table")
    model_id, model = one(synthesized.workshop, "AWS::SageMaker::Model")
    _, build = one(synthesized.workshop, "Custom::ServingImageBuild")
    prefix = deployment.resolve(model["Properties"]["PrimaryContainer"]["ModelDataUrl"])
    with mock_aws(), install_endpoint_platform(tmp_path / "platform") as platform:
        store = S3ArtifactStore(REGION)
        store.create_bucket(deployment.bucket)
        output = training_output(
            store, f"s3://{deployment.bucket}/jobs/j/output/model.tar.gz", lora_weights
        )
        publish_user_model(store, output, prefix, "demo-ada", "m1", str(tiny_pipeline_dir))
        emulated_stack._create_endpoint(deployment)  # waits, and prepare() finds nothing to do
        try:
            client = boto3.client("sagemaker-runtime", region_name=REGION)
            [image] = PerUserModels().invoke(
                client, "workshop-mme", "demo-ada--m1", "a photo of sks toy", num_inference_steps=2
            )
            assert image.size == (64, 64)
            local = platform.local("workshop-mme")
            assert local.loaded_models() == ["demo-ada--m1"]  # no runtime model
            model_name = deployment.resolve({"Fn::GetAtt": [model_id, "ModelName"]})
            sagemaker = boto3.client("sagemaker", region_name=REGION)
            container = sagemaker.describe_model(ModelName=model_name)["PrimaryContainer"]
            assert container["Image"] == deployment.resolve(build["Properties"]["ImageUri"])
            assert RUNTIME_MODEL_ENV not in container.get("Environment", {})
        finally:
            emulated_stack._delete_endpoint(deployment)
    assert platform.tritonserver_pids() == []
