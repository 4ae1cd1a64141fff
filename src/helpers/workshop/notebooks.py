"""Run the workshop's notebooks in order with papermill (what ``make workshop`` does)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from helpers.settings import PROJECT_ROOT

NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"
#: The kernel papermill runs the notebooks on: the "python3" kernelspec that the Makefile
#: installs inside .venv, which a Jupyter running from .venv finds before any in the home
#: directory (and ipykernel's own, this interpreter, where it is missing). `make kernel`
#: registers the same venv as "workshop" in the home directory for other Jupyters (Studio).
KERNEL_NAME = "python3"


@dataclass(frozen=True)
class NotebookRun:
    """One executed notebook: where its executed copy is and how long it took."""

    source: Path
    output: Path
    seconds: float


def workshop_notebooks(directory: Path = NOTEBOOK_DIR) -> list[Path]:
    """The numbered notebooks (``01_*.ipynb``, ``02_*.ipynb``, ...) in running order."""
    return sorted(path for path in directory.glob("[0-9][0-9]_*.ipynb"))


def run_notebook(
    source: Path, output_dir: Path, parameters: dict | None = None, progress: bool = True
) -> NotebookRun:
    """Execute `source` with papermill into `output_dir`, in the notebook's own directory.

    Raises papermill's `PapermillExecutionError` (naming the failing cell) when a cell fails;
    the executed copy, with the error, is still written for inspection.
    """
    import papermill

    output_dir.mkdir(parents=True, exist_ok=True)
    output = output_dir / source.name
    started = time.perf_counter()
    papermill.execute_notebook(
        str(source),
        str(output),
        parameters=parameters or {},
        cwd=str(source.parent),
        kernel_name=KERNEL_NAME,
        progress_bar=progress,
    )
    return NotebookRun(source, output, time.perf_counter() - started)


def run_workshop(
    output_dir: Path, parameters: dict | None = None, notebooks: list[Path] | None = None
) -> list[NotebookRun]:
    """Run every workshop notebook in order, stopping at the first that fails."""
    runs = []
    for source in notebooks or workshop_notebooks():
        print(f"running {source.name} ...", flush=True)
        run = run_notebook(source, output_dir, parameters)
        print(f"  done in {run.seconds:.0f} s -> {run.output}", flush=True)
        runs.append(run)
    return runs
