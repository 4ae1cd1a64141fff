"""Where `model_code/` is, and how the library imports a file of it.

`model_code/` holds what runs inside the jobs and the endpoint (the training script and its
rules, the Triton models), so it is shipped as files, not as part of this package. It is the
checkout's, beside `src/`, or `WORKSHOP_MODEL_CODE_DIR` where the package runs without its
checkout (the Lambda bundle of `cdk/` copies `model_code/` beside the package and sets it).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["MODEL_CODE_DIR", "load_model_code_file"]

#: src/helpers/domain/model_code.py -> the checkout's root.
_CHECKOUT = Path(__file__).resolve().parents[3]
#: The folder shipped to jobs and endpoints: the training script, its rules, the Triton models.
MODEL_CODE_DIR = Path(os.environ.get("WORKSHOP_MODEL_CODE_DIR") or _CHECKOUT / "model_code")


def load_model_code_file(path: Path, name: str, register: bool = False) -> ModuleType:
    """Import a file of `model_code/` (not a package) as module `name`.

    Args:
        path (`Path`): the file.
        name (`str`): the module's name.
        register (`bool`, defaults to False): keep it in `sys.modules` under `name`, so that a
            later `import name` (the training script's, imported in this process) gets this
            same module rather than a second copy.

    Raises:
        ImportError: naming the file and `WORKSHOP_MODEL_CODE_DIR` when it is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise ImportError(
            f"{path} is missing: the package needs the checkout's model_code/, or "
            "WORKSHOP_MODEL_CODE_DIR naming a copy of it"
        )
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    previous = sys.modules.get(name)

    def restore() -> None:
        if previous is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = previous

    sys.modules[name] = module  # dataclasses look their module up while it executes
    try:
        spec.loader.exec_module(module)
    except BaseException:
        restore()
        raise
    if not register:
        restore()
    return module
