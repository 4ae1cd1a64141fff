"""Synthesizing the AWS stack from Python (what notebook 04 shows), and the deploy command."""

from __future__ import annotations

import hashlib

import pytest

from helpers.workshop.aws_stack import (
    STACK_NAME,
    NodeMissingError,
    deploy,
    deploy_command,
    node_problem,
    node_version,
    synthesize,
)

NODE_PROBLEM = node_problem()


@pytest.mark.slow
@pytest.mark.skipif(NODE_PROBLEM is not None, reason=f"the CDK needs Node.js: {NODE_PROBLEM}")
def test_synthesis_is_offline_and_nag_clean_with_every_acknowledgment_explained():
    result = synthesize()
    counts = result.resource_counts()
    # The onboarding workflow, and the waiter of the serving image's build (the default image).
    assert counts["AWS::StepFunctions::StateMachine"] == 2
    assert counts["AWS::CodeBuild::Project"] == 1 and counts["AWS::ECR::Repository"] == 1
    assert counts["AWS::SageMaker::Endpoint"] == 1 and counts["AWS::DynamoDB::Table"] == 1
    assert result.open_findings == []
    assert "AwsSolutions-APIG4" in result.acknowledged
    assert all(len(reason.split()) >= 10 for reason in result.acknowledged.values())


def test_the_deploy_command_passes_only_the_admin_keys_hash(tmp_path):
    key = "operator-key-0123456789"
    command = deploy_command(key, tmp_path / "out.json", {"workshop:deploy_endpoint": "false"})
    assert command[:5] == ["npx", "--yes", "aws-cdk@2", "deploy", STACK_NAME]
    assert f"AdminKeySha256={hashlib.sha256(key.encode()).hexdigest()}" in command
    assert key not in " ".join(command)
    assert "--context=workshop:deploy_endpoint=false" in command
    assert command[command.index("--outputs-file") + 1] == str(tmp_path / "out.json")


def test_without_node_synthesis_and_deploy_refuse_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no node on it
    monkeypatch.delenv("JSII_NODE", raising=False)
    assert node_version() is None
    with pytest.raises(NodeMissingError, match=r"no `node` on PATH.*install Node.js 20 or newer"):
        synthesize()
    with pytest.raises(NodeMissingError, match=r"Node\.js 20 or newer"):
        deploy("operator-key-0123456789")


@pytest.mark.parametrize(
    ("version", "ok"), [("v20.20.2", True), ("v22.1.0", True), ("v18.19.0", False), ("", False)]
)
def test_node_versions(version, ok):
    problem = node_problem(version or "garbage")
    assert (problem is None) == ok
    if not ok:
        assert "too old" in problem and "Node.js 20 or newer" in problem
