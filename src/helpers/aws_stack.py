"""The AWS stack of `cdk/` from Python: synthesize it offline, or deploy it (notebook 04).

Both run `cdk/app.py` in a subprocess (jsii starts a node process; the notebook's kernel stays
free of it). Deploying needs AWS credentials, a bootstrapped account and `npx` (node).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from helpers.settings import PROJECT_ROOT

CDK_DIR = PROJECT_ROOT / "cdk"
STACK_NAME = "PersonalizedGenAiWorkshop"
#: node 20 synthesizes fine; jsii's end-of-life banner would bury the output.
_QUIET_NODE = {
    "JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION": "1",
    "JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION": "20",
}


@dataclass(frozen=True)
class Synthesis:
    """What `synthesize` made: the template, how long it took, and cdk-nag's verdict.

    Args:
        template (`dict`): the CloudFormation template.
        seconds (`float`): the synthesis's wall time.
        open_findings (`list`): cdk-nag reports that did not succeed (empty when clean).
        acknowledged (`dict[str, str]`): each acknowledged rule and a reason given for it.
    """

    template: dict
    seconds: float
    open_findings: list = field(default_factory=list)
    acknowledged: dict[str, str] = field(default_factory=dict)

    def resource_counts(self) -> dict[str, int]:
        """Resources per CloudFormation type, sorted by type."""
        kinds = collections.Counter(r["Type"] for r in self.template["Resources"].values())
        return dict(sorted(kinds.items()))


def synthesize(context: Mapping[str, str] | None = None, bundle: bool = False) -> Synthesis:
    """Synthesize the stack into `cdk/cdk.out` (offline; `bundle=False` skips the pip install
    of the functions' dependencies, so the result is for reading, not deploying).

    Raises:
        RuntimeError: with the tail of the synthesis's output when it fails (an open cdk-nag
            finding fails it).
    """
    context = {"workshop:bundle": str(bundle).lower(), **(context or {})}
    command = [sys.executable, "app.py"]
    for key, value in context.items():
        command += ["-c", f"{key}={value}"]
    started = time.perf_counter()
    result = subprocess.run(
        command, cwd=CDK_DIR, capture_output=True, text=True, env={**os.environ, **_QUIET_NODE}
    )
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"cdk synthesis failed:\n{(result.stdout + result.stderr)[-3000:]}")
    out = CDK_DIR / "cdk.out"
    report = json.loads((out / "validation-report.json").read_text())
    stack_name = context.get("workshop:stack_name", STACK_NAME)
    template = json.loads((out / f"{stack_name}.template.json").read_text())
    acknowledged = {
        rule["id"].split("[")[0]: rule["reason"]
        for resource in template["Resources"].values()
        for rule in resource.get("Metadata", {}).get("cdk_nag", {}).get("rules_to_suppress", [])
    }
    return Synthesis(
        template=template,
        seconds=seconds,
        open_findings=[r for r in report["pluginReports"] if r["conclusion"] != "success"],
        acknowledged=dict(sorted(acknowledged.items())),
    )


def deploy_command(
    admin_key: str, outputs_file: Path, context: Mapping[str, str] | None = None
) -> list[str]:
    """The `cdk deploy` command line: the admin key goes in as its SHA-256 only."""
    digest = hashlib.sha256(admin_key.encode()).hexdigest()
    return [
        "npx",
        "--yes",
        "aws-cdk@2",
        "deploy",
        (context or {}).get("workshop:stack_name", STACK_NAME),
        "--require-approval",
        "never",
        "--outputs-file",
        str(outputs_file),
        "--parameters",
        f"AdminKeySha256={digest}",
        *(f"--context={key}={value}" for key, value in (context or {}).items()),
    ]


def deploy(admin_key: str, context: Mapping[str, str] | None = None) -> dict[str, str]:
    """Deploy the stack with the operator's `admin_key`; return its outputs (`ApiUrl`, ...).

    Raises:
        subprocess.CalledProcessError: when `cdk deploy` fails (its output is shown).
    """
    with tempfile.TemporaryDirectory() as tmp:
        outputs_file = Path(tmp) / "outputs.json"
        subprocess.run(
            deploy_command(admin_key, outputs_file, context),
            cwd=CDK_DIR,
            check=True,
            env={**os.environ, **_QUIET_NODE},
        )
        stack_name = (context or {}).get("workshop:stack_name", STACK_NAME)
        return json.loads(outputs_file.read_text())[stack_name]
