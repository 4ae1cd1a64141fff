"""The Lambda functions' code, bundled on this machine (no Docker).

One asset serves both functions (the API and the packaging step). Its root, Lambda's
`/var/task`, holds the pinned dependencies of `cdk/lambda-requirements.txt` installed by pip
for Lambda's platform, the `helpers` package, and `model_code/` (the training source that the
API uploads and the Triton model that packaging puts in every archive). The installed package
finds `model_code/` through `WORKSHOP_MODEL_CODE_DIR`, as its checkout's path is not there.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import jsii
from aws_cdk import AssetHashType, BundlingOptions, ILocalBundling
from aws_cdk import aws_lambda as lambda_

REPO_ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = REPO_ROOT / "cdk" / "lambda-requirements.txt"
#: Both functions' runtime: numpy 1.26 (kept below 2 for Triton) has wheels up to Python 3.12.
RUNTIME = lambda_.Runtime.PYTHON_3_12
#: Wheels that run on Lambda's x86_64 Amazon Linux 2023 (glibc 2.34).
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_28_x86_64")
#: Where `model_code/` is inside the functions.
MODEL_CODE_DIR = "/var/task/model_code"
_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")


@jsii.implements(ILocalBundling)
class LocalBundling:
    """Builds the asset folder with pip and file copies, so synthesis never needs Docker.

    Args:
        install (`bool`): pip-install the dependencies (to deploy); False packages only the
            project's code, for fast offline synthesis in tests (the result cannot run).
        requirements (`Path`, defaults to `cdk/lambda-requirements.txt`): what to install.
        repo_root (`Path`, defaults to this checkout): where `src/helpers` and `model_code` are.
    """

    def __init__(
        self, install: bool, requirements: Path = REQUIREMENTS, repo_root: Path = REPO_ROOT
    ) -> None:
        self.install = install
        self.requirements = Path(requirements)
        self.repo_root = Path(repo_root)

    def try_bundle(self, output_dir: str, options: BundlingOptions) -> bool:
        out = Path(output_dir)
        if self.install:
            self.pip_install(out)
        shutil.copytree(
            self.repo_root / "src" / "helpers", out / "helpers", ignore=_SKIP, dirs_exist_ok=True
        )
        shutil.copytree(
            self.repo_root / "model_code", out / "model_code", ignore=_SKIP, dirs_exist_ok=True
        )
        return True

    def pip_install(self, out: Path) -> None:
        """Install the requirements' wheels for Lambda's Python and platform into `out`.

        Raises:
            RuntimeError: with pip's output, when pip fails.
        """
        python_version = RUNTIME.name.removeprefix("python")
        platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
        command = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--requirement",
            str(self.requirements),
            "--target",
            str(out),
            "--implementation",
            "cp",
            "--python-version",
            python_version,
            "--only-binary=:all:",
            *platforms,
            # .pyc files differ between builds and would change the asset's hash every time.
            "--no-compile",
            "--disable-pip-version-check",
            "--quiet",
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"bundling the Lambda code failed: {' '.join(command)}\n{result.stderr[-4000:]}"
            )


def lambda_code(install: bool = True) -> lambda_.Code:
    """The functions' code asset; see `LocalBundling` for `install`.

    The asset's hash is the bundle's, so a change to `model_code/` or to the requirements
    deploys new code although the asset's source folder is `src/`.
    """
    return lambda_.Code.from_asset(
        str(REPO_ROOT / "src"),
        asset_hash_type=AssetHashType.OUTPUT,
        bundling=BundlingOptions(image=RUNTIME.bundling_image, local=LocalBundling(install)),
    )
