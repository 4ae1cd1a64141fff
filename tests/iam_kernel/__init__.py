"""IAM enforced in notebook kernels: `kernel_enforcement` gives the environment that makes
this folder's `sitecustomize.py` authorize every AWS call of a kernel (and of the Python
processes it starts) against a policy, and reads back what was allowed and refused.

```py
enforcement = kernel_enforcement(tmp_path, statements, region="eu-west-1")
for name, value in enforcement.env.items():
    monkeypatch.setenv(name, value)  # papermill's kernels inherit the test's environment
run_notebook(...)
assert enforcement.denials() == []
```
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

FOLDER = Path(__file__).resolve().parent


@dataclass(frozen=True)
class KernelEnforcement:
    """The files of one enforcement and the environment that turns it on.

    Args:
        env (`dict[str, str]`): the variables to set for the processes to check.
        denials_path (`Path`): a JSON line per refused request (or untaught call).
        allowed_path (`Path`): a JSON line per allowed request.
    """

    env: dict[str, str]
    denials_path: Path
    allowed_path: Path

    def denials(self) -> list[dict]:
        """Every refused request so far: `action`, `resource`, `context`, `decision`
        (`"denied"`, or `"unknown"` for a call the harness was not taught), `pid`."""
        return _read(self.denials_path)

    def allowed(self) -> list[dict]:
        """Every allowed request so far, as `denials` reports them."""
        return _read(self.allowed_path)


def kernel_enforcement(
    directory: Path,
    statements: list[dict],
    region: str,
    account: str | None = None,
) -> KernelEnforcement:
    """Write `statements` under `directory` and give the environment that enforces them.

    Args:
        directory (`Path`): where the policy and the journals go (a test's `tmp_path`).
        statements (`list[dict]`): resolved IAM statements (`studio_role.studio_policy`).
        region (`str`): the region of the ARNs the calls are checked as.
        account (`str`, *optional*): their account; moto's by default.
    """
    directory.mkdir(parents=True, exist_ok=True)
    policy = directory / "iam-policy.json"
    policy.write_text(json.dumps(statements, indent=2))
    denials, allowed = directory / "iam-denied.jsonl", directory / "iam-allowed.jsonl"
    for journal in (denials, allowed):
        journal.write_text("")
    python_path = [str(FOLDER), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {
        "PYTHONPATH": os.pathsep.join(python_path),
        "WORKSHOP_TEST_IAM_POLICY": str(policy),
        "WORKSHOP_TEST_IAM_REGION": region,
        "WORKSHOP_TEST_IAM_DENIALS": str(denials),
        "WORKSHOP_TEST_IAM_ALLOWED": str(allowed),
    }
    if account:
        env["WORKSHOP_TEST_IAM_ACCOUNT"] = account
    return KernelEnforcement(env, denials, allowed)


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
