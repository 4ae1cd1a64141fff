"""Check this machine for the workshop: what notebook 01 and ``workshop check`` print.

Every check returns a `CheckResult` and never raises: a failure is a result that says what is
wrong and how to fix it, so one missing piece does not hide the others.

```py
from helpers.workshop.environment import render_checks, run_checks

print(render_checks(run_checks(settings)))
```
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from helpers.settings import Settings

#: Python versions the workshop supports: numpy==1.26.4 (the pin; Triton's Python backend
#: needs numpy below 2) has wheels up to 3.12. pyproject.toml's requires-python agrees.
SUPPORTED_PYTHON = ((3, 10), (3, 12))
#: What a diffusers Stable Diffusion pipeline directory holds besides ``model_index.json``.
PIPELINE_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_TRITON_REINSTALL = 'pip install --force-reinstall "nvidia-pytriton==0.7.0"'
_NUMPY_PIN = 'pip install "numpy==1.26.4" (the pin in requirements.txt)'


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check.

    Args:
        name (`str`): what was checked, e.g. `"Python"`.
        ok (`bool`): whether the workshop can go on as far as this check is concerned.
        detail (`str`): what was found, e.g. `"3.11.7 (/work/.venv/bin/python)"`.
        fix (`str`, *optional*): what to do when `ok` is false.
    """

    name: str
    ok: bool
    detail: str
    fix: str | None = None

    def line(self, name_width: int = 0) -> str:
        """One line (more when `detail` has several), with the name padded to `name_width`."""
        text = f"{'PASS' if self.ok else 'FAIL'}  {self.name.ljust(name_width)} {self.detail}"
        if not self.ok and self.fix:
            text += f" -> fix: {self.fix}"
        return text.replace("\n", "\n      ")

    def __str__(self) -> str:
        return self.line()


def _never_raises(name: str) -> Callable:
    """Turn an unexpected exception in a check into a failed `CheckResult` named `name`."""

    def decorate(check: Callable[..., CheckResult]) -> Callable[..., CheckResult]:
        @functools.wraps(check)
        def guarded(*args, **kwargs) -> CheckResult:
            try:
                return check(*args, **kwargs)
            except Exception as error:
                return CheckResult(
                    name,
                    False,
                    f"the check itself failed: {type(error).__name__}: {error}",
                    fix="report this, with the message, to the workshop's maintainers",
                )

        return guarded

    return decorate


@_never_raises("Python")
def check_python() -> CheckResult:
    """Python 3.10 to 3.12 (the pinned wheels, numpy 1.26.4 among them, exist for those)."""
    version = ".".join(str(part) for part in sys.version_info[:3])
    detail = f"{version} ({sys.executable})"
    low, high = SUPPORTED_PYTHON
    if low <= sys.version_info[:2] <= high:
        return CheckResult("Python", True, detail)
    return CheckResult(
        "Python",
        False,
        f"{detail} is not supported",
        fix=f"create the venv with Python {low[0]}.{low[1]}-{high[0]}.{high[1]} "
        "(3.11 recommended), e.g. `python3.11 -m venv .venv`",
    )


@_never_raises("numpy")
def check_numpy() -> CheckResult:
    """numpy below 2: with numpy 2, Triton's Python backend returns empty outputs silently."""
    try:
        import numpy
    except ImportError:
        return CheckResult("numpy", False, "not installed", fix=_NUMPY_PIN)
    version = numpy.__version__
    if int(version.split(".")[0]) < 2:
        return CheckResult("numpy", True, version)
    return CheckResult(
        "numpy",
        False,
        f"{version}: Triton's Python backend returns empty outputs with numpy 2",
        fix=_NUMPY_PIN,
    )


@_never_raises("accelerator")
def check_accelerator() -> CheckResult:
    """Which device torch will use: a CUDA GPU (name and memory), Apple MPS, or the CPU.

    Every one of them runs the workshop (the tiny base model trains and serves on a CPU), so
    the result is ok unless torch itself cannot be imported.
    """
    try:
        import torch  # imported here: the other checks should not wait for torch
    except Exception as error:
        return CheckResult(
            "accelerator",
            False,
            f"torch cannot be imported ({error})",
            fix='pip install "torch==2.13.0" (the pin in requirements.txt)',
        )
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        count = torch.cuda.device_count()
        more = f" (+{count - 1} more)" if count > 1 else ""
        detail = (
            f"CUDA GPU {properties.name}, {properties.total_memory / 2**30:.0f} GiB{more}; "
            f"torch {torch.__version__}, CUDA {torch.version.cuda}"
        )
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        detail = f"Apple MPS; torch {torch.__version__}"
    else:
        detail = (
            f"CPU only ({os.cpu_count()} cores), torch {torch.__version__}: enough for the tiny "
            "base model; a real Stable Diffusion model wants a CUDA GPU"
        )
    return CheckResult("accelerator", True, detail)


@_never_raises("AWS credentials")
def check_aws_credentials(needed: bool) -> CheckResult:
    """Whether boto3 finds AWS credentials (never printed, only where they come from).

    Args:
        needed (`bool`): whether the backend calls AWS (`Backend.needs_aws`); without that the
            result is informational and ok either way.
    """
    try:
        import boto3
    except ImportError:
        return CheckResult(
            "AWS credentials",
            not needed,
            "boto3 is not installed",
            fix='pip install "boto3==1.44.8" (the pin in requirements.txt)',
        )
    session = boto3.Session()
    credentials = session.get_credentials()
    region = session.region_name or "no default region"
    if credentials is not None:
        return CheckResult("AWS credentials", True, f"found ({credentials.method}; {region})")
    if not needed:
        return CheckResult("AWS credentials", True, "none found (the local backend needs none)")
    return CheckResult(
        "AWS credentials",
        False,
        "none found, and the sagemaker backend calls AWS",
        fix="run `aws configure` or `aws sso login` (and set AWS_PROFILE), export "
        "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or run in SageMaker Studio, whose execution "
        "role provides them; or use WORKSHOP_BACKEND=local",
    )


@_never_raises("Node.js")
def check_node(needed: bool) -> CheckResult:
    """Node.js 20 or newer, which the CDK (aws-cdk-lib's jsii runtime) runs on.

    Args:
        needed (`bool`): whether the backend deploys to AWS (`Backend.needs_aws`), since
            `cdk deploy` needs it. Without that notebook 04 skips the CDK synthesis and the CDK
            tests skip, so the result is ok either way, with the fix in its detail.
    """
    from helpers.workshop.aws_stack import NODE_FIX, node_problem, node_version

    version = node_version()
    problem = node_problem(version)
    if problem is None:
        return CheckResult("Node.js", True, f"{version} (the CDK synthesizes the AWS stack)")
    found = "not found" if version is None else f"{version} is too old"
    if not needed:
        return CheckResult(
            "Node.js",
            True,
            f"{found}: notebook 04 skips the CDK synthesis (the local backend runs without "
            f"it); to see it, {NODE_FIX}",
        )
    return CheckResult(
        "Node.js", False, f"{found}, and deploying the stack runs the CDK on it", fix=NODE_FIX
    )


@_never_raises("base model")
def check_base_model(path: str | Path) -> CheckResult:
    """A diffusers pipeline directory: ``model_index.json`` and its component subfolders.

    Args:
        path (`str` or `Path`): the pipeline directory (`settings.base_model`).
    """
    path = Path(path)
    fix = (
        "run `make base-model`, or point WORKSHOP_BASE_MODEL at a diffusers Stable Diffusion "
        "pipeline directory"
    )
    if not path.is_dir():
        return CheckResult("base model", False, f"{path} is not a directory", fix=fix)
    missing = [
        name for name in ("model_index.json", *PIPELINE_SUBFOLDERS) if not (path / name).exists()
    ]
    if missing:
        return CheckResult("base model", False, f"{path} lacks {', '.join(missing)}", fix=fix)
    try:
        pipeline = json.loads((path / "model_index.json").read_text()).get("_class_name", "?")
    except (OSError, ValueError, AttributeError) as error:
        return CheckResult("base model", False, f"{path}/model_index.json: {error}", fix=fix)
    size = sum(file.stat().st_size for file in path.rglob("*") if file.is_file())
    return CheckResult("base model", True, f"{path} ({pipeline}, {size / 1e6:.1f} MB)")


@_never_raises("tritonserver")
def check_tritonserver(settings: Settings) -> CheckResult:
    """Start Triton on free ports with an empty model repository, ask its version, stop it.

    The log goes to ``<work_dir>/logs/check-tritonserver.log``. The settings' own ports are
    left alone, so the check also passes while the workshop's server runs.
    """
    from helpers.infra.local.triton_server import TritonServer, free_ports

    log_path = settings.work_dir / "logs" / "check-tritonserver.log"
    with tempfile.TemporaryDirectory(prefix="triton-check-") as repository:
        http, grpc, metrics = free_ports(3)
        server = TritonServer(Path(repository), http, grpc, metrics, log_path)
        try:
            with server:
                client = server.client()
                if not client.is_server_ready():
                    raise RuntimeError(f"{server.url}/v2/health/ready stopped answering 200")
                version = client.get_server_metadata()["version"]
        except Exception as error:
            detail, fix = _triton_fix(str(error))
            return CheckResult("tritonserver", False, detail, fix=fix)
    return CheckResult(
        "tritonserver",
        True,
        f"{version} ready in {server.startup_seconds:.2f} s, stopped in "
        f"{server.shutdown_seconds:.2f} s (log: {log_path})",
    )


def _triton_fix(message: str) -> tuple[str, str]:
    """Split a `TritonServerError` message into what went wrong and its ``fix:`` line."""
    detail, marker, fix = message.partition("\nfix: ")
    if marker:
        return detail, fix
    return message, f"read the log named above; if the install is damaged, {_TRITON_REINSTALL}"


def run_checks(settings: Settings, triton: bool = True) -> list[CheckResult]:
    """Every check for `settings`' backend, in the order notebook 01 explains them.

    Args:
        settings (`Settings`): what to check.
        triton (`bool`, defaults to `True`): start and stop a local `tritonserver` once.
    """
    from helpers.backend import open_backend

    backend = open_backend(settings)
    results = [
        check_python(),
        check_numpy(),
        check_accelerator(),
        check_aws_credentials(backend.needs_aws),
        check_node(backend.needs_aws),
    ]
    if not Path(settings.base_model).is_dir():
        # Settings accept a hub id only where a training job downloads it (SageMaker).
        results.append(
            CheckResult("base model", True, f"hub model {settings.base_model} (training job)")
        )
    else:
        results.append(check_base_model(settings.base_model))
    if triton:
        results.append(check_tritonserver(settings))
    return results


class ChecksFailed(RuntimeError):
    """Some checks failed; the message lists each with its fix."""


def require(results: list[CheckResult]) -> None:
    """Stop here when a check failed that the rest of the workshop cannot do without.

    Raises:
        ChecksFailed: naming each failed check, what was found and the fix.
    """
    failed = [result for result in results if not result.ok]
    if failed:
        raise ChecksFailed(
            "fix these before going on:\n" + "\n".join(result.line() for result in failed)
        )


def render_checks(results: list[CheckResult]) -> str:
    """The results as aligned ``PASS``/``FAIL`` lines and, for several, a summary line."""
    width = max((len(result.name) for result in results), default=0)
    if len(results) == 1:
        return results[0].line()
    failed = sum(not result.ok for result in results)
    summary = (
        f"all {len(results)} checks passed"
        if not failed
        else f"{failed} of {len(results)} checks failed"
    )
    return "\n".join([*(result.line(width) for result in results), summary])
