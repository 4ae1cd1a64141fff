"""The training hyperparameters' rules, from the one file that defines them:
`model_code/hyperparameters.py`.

That file ships with the training script in a job's source directory, so it is standard-library
only and lives beside the script, not in this package. This module loads it by path, once, and
re-exports it: the jobs layer (`helpers.ports.jobs.check_hyperparameters`) and the API
(`helpers.api.schemas`) check with the very rules the script parses with.

`model_code/` is found by `helpers.domain.model_code.MODEL_CODE_DIR`.

Example:

    from helpers.domain.hyperparameters import HYPERPARAMETERS, check
    HYPERPARAMETERS["max_train_steps"].high    # 10000, the script's bound
    check({"max_train_steps": 300})            # ValueError naming the argument when not allowed
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

from helpers.domain.model_code import MODEL_CODE_DIR, load_model_code_file

__all__ = [
    "DEFAULTS",
    "HYPERPARAMETERS",
    "RULES_FILE",
    "Hyperparameter",
    "check",
    "rules",
]

#: The hyperparameters' one definition.
RULES_FILE = MODEL_CODE_DIR / "hyperparameters.py"
#: The name the training script imports the rules by (`import hyperparameters`).
_MODULE_NAME = "hyperparameters"


def _load_rules(path: Path = RULES_FILE) -> ModuleType:
    """`model_code/hyperparameters.py`, as the module the training script imports, once."""
    loaded = sys.modules.get(_MODULE_NAME)
    if loaded is not None:
        if Path(getattr(loaded, "__file__", "") or "").resolve() == path.resolve():
            return loaded  # the script (or this module) imported it already
        # Another module has the name: load ours privately.
        return load_model_code_file(path, f"helpers._model_code_{_MODULE_NAME}", register=True)
    return load_model_code_file(path, _MODULE_NAME, register=True)


#: The rules module itself (`model_code/hyperparameters.py`).
rules = _load_rules()
HYPERPARAMETERS = rules.HYPERPARAMETERS
DEFAULTS = rules.DEFAULTS
Hyperparameter = rules.Hyperparameter
check = rules.check
