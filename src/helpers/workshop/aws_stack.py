"""The AWS stack of `cdk/` from Python: synthesize it offline, or deploy it (notebook 04).

Both run `cdk/app.py` in a subprocess (jsii starts a node process; the notebook's kernel stays
free of it), so both need Node.js 20 or newer on `PATH`: `node_problem()` says what is missing
and how to fix it, and `synthesize` and `deploy` refuse with that message rather than a jsii
traceback. Deploying also needs AWS credentials and a bootstrapped account.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import shutil
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


#: The oldest Node.js major version that aws-cdk-lib's jsii runtime is used with here.
MIN_NODE_MAJOR = 20
NODE_FIX = (
    f"install Node.js {MIN_NODE_MAJOR} or newer and put `node` on PATH (https://nodejs.org, "
    "or e.g. `conda install -c conda-forge 'nodejs>=20'`, or NodeSource's packages on "
    "Debian/Ubuntu); restart a running notebook kernel afterwards"
)


class NodeMissingError(RuntimeError):
    """Node.js is missing or too old for the CDK; the message says how to install it."""


def node_version() -> str | None:
    """The version that `node --version` prints (e.g. `"v20.20.2"`), or `None` when there is
    no runnable `node` on `PATH` (jsii's `JSII_NODE`, when set, names another one)."""
    node = shutil.which(os.environ.get("JSII_NODE", "node"))
    if node is None:
        return None
    try:
        result = subprocess.run(
            [node, "--version"], capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def node_problem(version: str | None = None) -> str | None:
    """Why the CDK cannot run on this machine's Node.js, with the fix; `None` when it can.

    Args:
        version (`str`, *optional*): a `node --version` answer; defaults to asking `node`.
    """
    version = version if version is not None else node_version()
    if version is None:
        return f"Node.js is not installed (no `node` on PATH), and the CDK runs on it: {NODE_FIX}"
    match = re.match(r"v?(\d+)\.", version)
    if match is None or int(match.group(1)) < MIN_NODE_MAJOR:
        return f"Node.js {version} is too old for the CDK: {NODE_FIX}"
    return None


def _require_node() -> None:
    problem = node_problem()
    if problem:
        raise NodeMissingError(problem)


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
        NodeMissingError: when Node.js 20+ is not on `PATH` (the message has the fix).
        RuntimeError: with the tail of the synthesis's output when it fails (an open cdk-nag
            finding fails it).
    """
    _require_node()
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
        NodeMissingError: when Node.js 20+ is not on `PATH` (the message has the fix).
        subprocess.CalledProcessError: when `cdk deploy` fails (its output is shown).
    """
    _require_node()
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
