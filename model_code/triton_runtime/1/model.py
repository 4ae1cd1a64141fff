"""Triton Python-backend model that installs the workshop's serving runtime on its instance.

SageMaker's Triton image has Python and numpy, but not torch, diffusers, transformers or peft,
and it cannot see the base model on the machine that packaged the users' models. This model's
archive carries both, as two folders beside this file:

    1/site-packages/   the packages, installed for the image's Python
                       (`helpers.services.serving_runtime.build_site_packages`)
    1/base_model/      a diffusers pipeline directory (optional: a hub id works without it)

The endpoint deletes a model's folder when it evicts the model, so `initialize` copies both to
`<runtime_root>/<runtime_name>/` on the instance (config parameters), once per instance: the
copy goes to a temporary folder that is renamed into place when whole, under a file lock, so
that models loading at the same time never see half a runtime. The users' models name that
folder in their config (`runtime`): they put its `site-packages` first on `sys.path` and load
`base_model` from it (`triton_sd/1/model.py`, `use_runtime`).

Any request answers `runtime`: JSON with the runtime's name, folder and contents. Only the
standard library and numpy are used, since this runs before the packages are there.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import sys
from pathlib import Path

import numpy as np

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton, e.g. to test `install`
    pb_utils = None

PARTS = ("site-packages", "base_model")
#: Written last into an installed runtime: a folder without it is not complete.
COMPLETE = "runtime.json"


def install(source: Path, root: Path, name: str) -> Path:
    """Copy the runtime parts in `source` to `root/name` (once) and return that folder.

    Safe when several processes install the same runtime at once: one copies, the others wait
    on the lock and find it done.
    """
    target = root / name
    if (target / COMPLETE).exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / COMPLETE).exists():
            return target
        staging = root / f".{name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)  # an incomplete earlier attempt
        staging.mkdir()
        parts = [part for part in PARTS if (source / part).is_dir()]
        for part in parts:
            shutil.copytree(source / part, staging / part, symlinks=False)
        info = {"name": name, "parts": parts, "python": sys.version.split()[0]}
        (staging / COMPLETE).write_text(json.dumps(info))
        staging.rename(target)
    return target


def describe(target: Path) -> dict:
    """What `install` put in `target`, and where."""
    return {**json.loads((target / COMPLETE).read_text()), "path": str(target)}


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        parameters = json.loads(args["model_config"])["parameters"]
        # Not the model's name: SageMaker may load a model under a name of its own.
        name = parameters["runtime_name"]["string_value"]
        root = Path(parameters["runtime_root"]["string_value"])
        source = Path(args["model_repository"]) / args["model_version"]
        self.target = install(source, root, name)

    def execute(self, requests: list) -> list:
        status = np.array([json.dumps(describe(self.target)).encode()], dtype=np.object_)
        return [
            pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("runtime", status)])
            for _ in requests
        ]
