"""IAM enforced in a whole Python process, for processes a test starts but cannot patch: a
notebook's kernel (papermill starts it) and what it starts in turn.

Python imports `sitecustomize` at startup from the first folder of `sys.path` that has one;
`tests/iam_kernel.kernel_enforcement` puts this folder first on `PYTHONPATH`. Without
`WORKSHOP_TEST_IAM_POLICY` in the environment this does nothing. With it:

- `WORKSHOP_TEST_IAM_POLICY`: a JSON file of IAM statements; every botocore call of the
  process is authorized against them (`tests/iam_enforced.py`, `enforced`) for its whole life,
  from the moment it imports botocore;
- `WORKSHOP_TEST_IAM_REGION`, `WORKSHOP_TEST_IAM_ACCOUNT`: the ARNs' region (default
  `AWS_DEFAULT_REGION`) and account (default moto's);
- `WORKSHOP_TEST_IAM_DENIALS`: a file that gets a JSON line per refused request, and per call
  the harness does not know, even when the code swallows the error;
- `WORKSHOP_TEST_IAM_ALLOWED` (*optional*): a file that gets a JSON line per allowed request,
  so a test can tell which statements were used.

Child Python processes inherit the environment and so the enforcement (and the same files).
A `sitecustomize` that this one shadows (a distribution's, further down `sys.path`) still runs.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import os
import sys
import threading
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_LOCK = threading.Lock()
#: The `enforced` context of this process, entered once.
_CONTEXT = None


def _append(path: str | None, record: dict) -> None:
    if not path:
        return
    line = json.dumps(record, sort_keys=True) + "\n"
    with _LOCK, open(path, "a", encoding="utf-8") as file:  # one line per write: no interleaving
        file.write(line)


class _Journal(list):
    """A list of requests that also writes each one appended to a JSON-lines file."""

    def __init__(self, path: str | None, decision: str) -> None:
        super().__init__()
        self.path = path
        self.decision = decision

    def append(self, request) -> None:
        super().append(request)
        _append(
            self.path,
            {
                "decision": self.decision,
                "action": request.action,
                "resource": request.resource,
                "context": dict(request.context),
                "pid": os.getpid(),
            },
        )


def _load_harness():
    """`tests/iam_enforced.py`, loaded by path so that `tests/` is not put on `sys.path`."""
    spec = importlib.util.spec_from_file_location("iam_enforced", _HERE.parent / "iam_enforced.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("iam_enforced", module)
    spec.loader.exec_module(module)
    return module


def _install(policy: str) -> None:
    harness = _load_harness()
    statements = json.loads(Path(policy).read_text())
    region = os.environ.get("WORKSHOP_TEST_IAM_REGION") or os.environ.get(
        "AWS_DEFAULT_REGION", "us-east-1"
    )
    account = os.environ.get("WORKSHOP_TEST_IAM_ACCOUNT") or harness.ACCOUNT
    denials = os.environ.get("WORKSHOP_TEST_IAM_DENIALS")
    # Entered and never left: the process keeps the enforcement until it exits. The context
    # is kept referenced: a collected generator would run its `finally` and undo the patch.
    global _CONTEXT
    _CONTEXT = harness.enforced(statements, region, account)
    enforcer = _CONTEXT.__enter__()
    enforcer.allowed = _Journal(os.environ.get("WORKSHOP_TEST_IAM_ALLOWED"), "allowed")
    enforcer.denied = _Journal(denials, "denied")
    authorize = enforcer.authorize

    def authorize_known(service, operation, params) -> None:
        try:
            authorize(service, operation, params)
        except NotImplementedError as error:  # untaught: a denial too, so the test sees it
            _append(
                denials,
                {
                    "decision": "unknown",
                    "action": f"{service}:{operation}",
                    "resource": "",
                    "context": {},
                    "error": str(error),
                    "pid": os.getpid(),
                },
            )
            raise

    enforcer.authorize = authorize_known


def _run_shadowed() -> None:
    """Run the next `sitecustomize.py` on `sys.path`, the one this module hides."""
    for entry in sys.path:
        candidate = Path(entry or ".").resolve() / "sitecustomize.py"
        if candidate.parent == _HERE or not candidate.is_file():
            continue
        spec = importlib.util.spec_from_file_location("_shadowed_sitecustomize", candidate)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
        return


class _OnceBotocoreLoads(importlib.abc.MetaPathFinder):
    """Installs the enforcement right after `botocore.client` is imported, not at startup:
    importing botocore loads `ssl`, which a process such as locust must patch (gevent) first."""

    def __init__(self, policy: str) -> None:
        self.policy = policy

    def find_spec(self, name, path, target=None):
        if name != "botocore.client":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)  # the real one, this finder out of the way
        load = spec.loader.exec_module

        def load_then_install(module) -> None:
            load(module)
            _install(self.policy)

        spec.loader.exec_module = load_then_install
        return spec


_run_shadowed()
if os.environ.get("WORKSHOP_TEST_IAM_POLICY"):
    sys.meta_path.insert(0, _OnceBotocoreLoads(os.environ["WORKSHOP_TEST_IAM_POLICY"]))
