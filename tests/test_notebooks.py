"""The workshop notebooks: committed clean, and executed end to end with papermill."""

from __future__ import annotations

import nbformat
import pytest

from helpers.workshop.aws_stack import node_problem
from helpers.workshop.notebooks import run_notebook, workshop_notebooks

NOTEBOOKS = workshop_notebooks()


def _outputs(notebook) -> list[dict]:
    return [
        output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    ]


def _data(notebook, mime: str) -> list:
    """Every output of `notebook` of type `mime` (`"image/png"`, `"text/markdown"`, ...)."""
    return [o["data"][mime] for o in _outputs(notebook) if mime in o.get("data", {})]


def _text(notebook) -> str:
    parts = []
    for output in _outputs(notebook):
        parts.append(output.get("text", ""))
        parts.append(output.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def test_the_workshop_has_its_notebooks_in_order():
    assert [path.name for path in NOTEBOOKS] == [
        "01_setup.ipynb",
        "02_finetune.ipynb",
        "03_mme_triton.ipynb",
        "04_api.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_is_committed_without_outputs_and_has_parameters(path):
    notebook = nbformat.read(path, as_version=4)
    dirty = [
        i
        for i, cell in enumerate(notebook.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count)
    ]
    assert not dirty, f"{path.name}: cells {dirty} have outputs; clear them before committing"
    tagged = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
    assert notebook.cells[0].cell_type == "markdown" and notebook.cells[0].source.startswith("# ")


@pytest.mark.slow
@pytest.mark.notebook
def test_setup_notebook_runs_locally(tmp_path):
    run = run_notebook(
        NOTEBOOKS[0], tmp_path / "executed", {"work_dir": str(tmp_path / "work")}, progress=False
    )
    executed = nbformat.read(run.output, as_version=4)
    text = _text(executed)
    assert "FAIL" not in text, text
    assert "PASS" in text and "tritonserver" in text.lower()
    images = _data(executed, "image/png")
    assert len(images) >= 3  # the prompt grid, the prompt-following heatmap, the toys' parts
    assert "22 toys: body colour" in text
    assert (tmp_path / "work" / "metadata.sqlite").exists()
    assert (tmp_path / "work" / "store" / "workshop-artifacts").is_dir()


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """Notebook 02 executed once; notebook 03 then serves the models it trained."""
    root = tmp_path_factory.mktemp("workshop")
    run = run_notebook(
        NOTEBOOKS[1], root / "executed", {"work_dir": str(root / "work")}, progress=False
    )
    return root, nbformat.read(run.output, as_version=4)


@pytest.mark.slow
@pytest.mark.notebook
def test_finetune_notebook_trains_a_personal_model_per_demo_user(finetuned):
    from helpers.workshop.demo_subjects import DEMO_SUBJECTS

    root, executed = finetuned
    text = _text(executed)
    assert "NOT PERSONALIZED" not in text, text
    assert text.count(": PERSONALIZED") == len(DEMO_SUBJECTS)
    assert "NOT THEIR TOY" not in text, text
    assert text.count(": THEIR TOY") == len(DEMO_SUBJECTS)
    images = _data(executed, "image/png")
    # photos, base pictures (instance and class prompts), loss curves, a grid per user
    assert len(images) >= 4 + len(DEMO_SUBJECTS)
    tables = _data(executed, "text/markdown")
    assert any(all(s.user_id in table for s in DEMO_SUBJECTS) for table in tables)
    assert any(table.startswith("| user | toy | user's model |") for table in tables)
    models = list((root / "work" / "store").rglob("model.tar.gz"))
    assert len(models) == len(DEMO_SUBJECTS)


@pytest.mark.slow
@pytest.mark.notebook
def test_endpoint_notebook_serves_every_user_evicts_and_load_tests(finetuned):
    from helpers.workshop.demo_subjects import DEMO_SUBJECTS

    root, _ = finetuned
    run = run_notebook(
        NOTEBOOKS[2],
        root / "executed",
        {
            "work_dir": str(root / "work"),
            "load_test_seconds": 8,
            "compare_user_counts": [1, 10],
            "compare_load_seconds": 5,
            "interactive": False,
        },
        progress=False,
    )
    executed = nbformat.read(run.output, as_version=4)
    text = _text(executed)
    for subject in DEMO_SUBJECTS:
        assert f"{subject.user_id}: cold" in text
    assert "evicted, in order: ['" in text and "'LoadedModelCount': 2.0" in text
    assert "unloaded for the cold phase: [" in text  # the endpoint's own verbs, no branch
    assert "'failures': 0" in text and "endpoint stopped: NotDeployed" in text
    images = _data(executed, "image/png")
    # the users' pictures, cold vs warm, the load-test plots, the serving-mode comparison
    assert len(images) >= 4
    assert (root / "work" / "loadtest" / "warm" / "requests.csv").exists()
    tables = _data(executed, "text/markdown")
    assert any(table.startswith("| figure | per-user | shared-base |") for table in tables)
    assert "'load_test_without_errors': True" in text  # the shared base's, over every user
    # the capacity model: both modes at 1k, 100k and 10M users, the crossover, what binds first
    assert any(
        table.startswith("| users | mode | cache-hit ratio")
        and "| 10,000,000 | shared-base |" in table
        for table in tables
    )
    assert "per-user models cost more from" in text and "binds first: " in text


@pytest.mark.slow
@pytest.mark.notebook
def test_endpoint_notebook_serves_every_user_from_one_shared_base(finetuned):
    from helpers.workshop.demo_subjects import DEMO_SUBJECTS

    root, _ = finetuned
    run = run_notebook(
        NOTEBOOKS[2],
        root / "executed-shared-base",
        {
            "work_dir": str(root / "work"),
            "serving_mode": "shared-base",
            "compare_modes": False,
            "load_test_seconds": 5,
            "interactive": False,
        },
        progress=False,
    )
    text = _text(nbformat.read(run.output, as_version=4))
    for subject in DEMO_SUBJECTS:
        assert f"{subject.user_id}: cold" in text
    assert "serving mode: shared-base" in text and "evicted, in order: []" in text
    assert "'failures': 0" in text and "endpoint stopped: NotDeployed" in text


@pytest.mark.slow
@pytest.mark.notebook
def test_api_notebook_onboards_a_user_over_http_and_synthesizes_the_stack(tmp_path):
    run = run_notebook(
        NOTEBOOKS[3],
        tmp_path / "executed",
        {"work_dir": str(tmp_path / "work"), "max_train_steps": 30, "num_inference_steps": 4},
        progress=False,
    )
    executed = nbformat.read(run.output, as_version=4)
    text = _text(executed)
    assert "retry: 202, same model: True" in text
    assert "AVAILABLE" in text and "cold" in text and "warm" in text
    assert "404  GET /v1/models/m1" in text  # the other user cannot see the model
    assert "415 not JSON" in text and "422 not an image" in text
    if node_problem() is None:
        assert "AWS::StepFunctions::StateMachine" in text and "0 open cdk-nag findings" in text
    else:  # the rest of the notebook runs without Node.js
        assert "skipping the CDK synthesis: Node.js" in text
    images = _data(executed, "image/png")
    assert len(images) >= 2  # the uploaded photos and the generated pictures
    assert "service stopped" in text


# Notebook 01 on the sagemaker backend against moto runs in test_studio_role.py, its kernel
# under the Studio role's policy (the bucket, its encryption and public access block, the
# table, and no AWS call refused).
