"""The serving runtime: what a SageMaker endpoint's models need that its Triton image lacks.

SageMaker's Triton image runs Python-backend models with its own Python and numpy only; the
workshop's models also need torch, diffusers, transformers and peft (and boto3 for the shared
base), and a base model the endpoint can read. Rather than a custom image, the endpoint gets
one more model on its prefix, `runtime-<hash of its files>` (`model_code/triton_runtime/`),
whose archive carries

- `site-packages/`: `model_code/triton_runtime/requirements.txt` installed by pip for the
  image's Python and platform (`build_site_packages`; pip's cross-platform install, so it
  builds anywhere with PyPI access, SageMaker Studio included, with no conda and no Docker);
- `base_model/` (optional): the base pipeline directory, such as the workshop's tiny model (a
  hub id needs none, where the endpoint can reach the hub).

Loading it installs both in `<RUNTIME_ROOT>/<name>/` on the instance, once. The users' models
are packaged with `runtime=ServingRuntime.path` (and, with a base in the runtime,
`base_model=ServingRuntime.base_model`), so they find both there. The runtime model must be
loaded on an instance before a user's model: `SageMakerEndpoint.prepare` invokes it, and a
user's model loaded first fails with an error that says so.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from helpers.domain.archives import base_model_files, content_name, write_tar_gz
from helpers.domain.runtime import RUNTIME_ROOT, ServingRuntime
from helpers.ports.store import ArtifactStore, as_prefix
from helpers.services.packaging import MODEL_CODE
from helpers.settings import HUB_ID_RE

RUNTIME_CODE = MODEL_CODE.parent / "triton_runtime"
REQUIREMENTS = RUNTIME_CODE / "requirements.txt"
NAME_PREFIX = "runtime-"
#: The Python of the Triton image the SageMaker adapter deploys (`sagemaker-tritonserver`
#: 25.09, Ubuntu 24.04), and the wheel platforms it can run, newest first.
TRITON_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def build_site_packages(
    destination: str | Path,
    requirements: str | Path = REQUIREMENTS,
    python_version: str = TRITON_PYTHON,
    platforms: tuple[str, ...] = PLATFORMS,
    pip_args: tuple[str, ...] = (),
) -> Path:
    """Install `requirements` into the folder `destination` for another Python and platform.

    pip picks binary wheels for `python_version` on `platforms`, whatever this machine runs
    (its `--target`, `--python-version`, `--platform` and `--only-binary=:all:`). The folder
    appears whole or not at all. With the default requirements it downloads several GB (torch
    with CUDA). `pip_args` go to pip as they are (for example `--no-index --find-links DIR`).

    Raises:
        FileExistsError: `destination` exists.
        RuntimeError: pip failed; the message ends with pip's own last lines.
    """
    destination = Path(destination)
    if destination.exists():
        raise FileExistsError(f"{destination} exists: remove it, or package it as it is")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}."))
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--target",
        str(staging),
        "--python-version",
        python_version,
        "--implementation",
        "cp",
        "--only-binary=:all:",
        *(f"--platform={platform}" for platform in platforms),
        "--requirement",
        str(requirements),
        *pip_args,
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        shutil.rmtree(staging, ignore_errors=True)
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
        raise RuntimeError(
            f"pip could not install {requirements} for Python {python_version}:\n{tail}"
        )
    staging.rename(destination)
    return destination


def runtime_files(site_packages: Path, base_model: Path | None = None) -> dict[str, Path]:
    """The runtime model's files (relative to its folder), config aside: every file of the
    packages, and the base pipeline's files as `helpers.domain.archives.base_model_files` finds them
    (a hub cache's snapshot of symbolic links included)."""
    for part, folder in (("site-packages", site_packages), ("base_model", base_model)):
        if folder is not None and not Path(folder).is_dir():
            raise ValueError(f"{part}: {folder} is not a directory")
    files = {"1/model.py": RUNTIME_CODE / "1" / "model.py"}
    packages = Path(site_packages)
    for path in sorted(packages.rglob("*")):
        if path.is_file() and not path.is_symlink():
            files[f"1/site-packages/{path.relative_to(packages).as_posix()}"] = path
    if base_model is not None:
        for name, path in base_model_files(base_model).items():
            files[f"1/base_model/{name}"] = path
    return files


def render_runtime_config(name: str, root: str = RUNTIME_ROOT) -> str:
    if not root.startswith("/") or any(c in root for c in '"\n\\'):
        raise ValueError(f"root must be an absolute path without quotes, got {root!r}")
    text = (RUNTIME_CODE / "config.pbtxt").read_text()
    text = text.replace(f'string_value: "{RUNTIME_ROOT}"', f'string_value: "{root}"')
    return text.replace('string_value: "RUNTIME_NAME"', f'string_value: "{name}"')


def runtime_name(files: dict[str, Path], root: str = RUNTIME_ROOT) -> str:
    """`runtime-<hash of the files and the config>`: new content, new name."""
    return content_name(NAME_PREFIX, {**files, "config.pbtxt": render_runtime_config("", root)})


def write_runtime_archive(
    name: str, files: dict[str, Path], destination: Path, root: str = RUNTIME_ROOT
) -> Path:
    """Write the MME archive of runtime `name` holding `files` (`runtime_files`)."""
    members = {f"{name}/config.pbtxt": render_runtime_config(name, root)}
    members.update({f"{name}/{path}": source for path, source in files.items()})
    return write_tar_gz(destination, members)


def package_runtime(
    store: ArtifactStore,
    endpoint_prefix_uri: str,
    site_packages: str | Path,
    base_model: str | Path | None = None,
    root: str = RUNTIME_ROOT,
) -> ServingRuntime:
    """Put the runtime model's archive on the endpoint's prefix (kept if it is there: the same
    files give the same name).

    Args:
        site_packages: the packages folder (`build_site_packages`).
        base_model: a base pipeline directory to carry, or None (a hub id needs none).
        root: where the runtime installs itself on an instance.
    """
    base = None if base_model is None else Path(base_model)
    files = runtime_files(Path(site_packages), base)
    name = runtime_name(files, root)
    uri = f"{as_prefix(endpoint_prefix_uri)!s}/{name}.tar.gz"
    if not store.exists(uri):
        with tempfile.TemporaryDirectory(prefix="runtime-") as tmp:
            archive = write_runtime_archive(name, files, Path(tmp) / "model.tar.gz", root)
            store.put_file(uri, archive)
    return ServingRuntime(name, uri, store.size(uri), base is not None, root)


def serving_base_model(base_model: str, runtime: str) -> str:
    """The base model as the endpoint's models name it: a hub id as it is; a directory or an
    `s3://` folder (which the endpoint cannot read) as the copy the runtime `runtime` carries,
    `<runtime>/base_model` (`package_runtime(..., base_model=<that directory>)`)."""
    if not runtime or (HUB_ID_RE.match(base_model) and not Path(base_model).exists()):
        return base_model
    return f"{runtime}/base_model"


def runtime_for(
    store: ArtifactStore, endpoint_prefix_uri: str, work_dir: str | Path, base_model: str
) -> ServingRuntime:
    """The serving runtime for a SageMaker endpoint on `endpoint_prefix_uri`, packaged there.

    The packages are built once, into `<work_dir>/serving-runtime/site-packages`
    (`build_site_packages`; delete the folder to build them again). The runtime carries
    `base_model` when it is a directory; a hub id stays with the hub.
    """
    site_packages = Path(work_dir) / "serving-runtime" / "site-packages"
    if not site_packages.exists():
        build_site_packages(site_packages)
    base = Path(base_model) if Path(base_model).is_dir() else None
    return package_runtime(store, endpoint_prefix_uri, site_packages, base)
