"""Each rule has one home: the training hyperparameters are `model_code/hyperparameters.py`, the
generation inputs the Triton model's `INPUTS`; the script, the jobs layer and the API take
theirs from there, and the API's own product limits lie within them."""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from helpers.api import schemas
from helpers.domain import hyperparameters as domain_rules
from helpers.domain.generation import generation_inputs
from helpers.infra.aws.jobs import pack_source_dir
from helpers.ports import jobs
from helpers.services.packaging import MODEL_CODE, load_model_code
from helpers.settings import PROJECT_ROOT

MODEL_CODE_DIR = PROJECT_ROOT / "model_code"
SCRIPT = MODEL_CODE_DIR / "train_dreambooth_lora.py"
PATHS = ["--pretrained_model_name_or_path", "base", "--instance_data_dir", "photos"]


@pytest.fixture(scope="module")
def script():
    """The training script imported in this process, as `python <script>` would find its rules."""
    spec = importlib.util.spec_from_file_location("train_dreambooth_lora_rules", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    sys.path.insert(0, str(MODEL_CODE_DIR))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(MODEL_CODE_DIR))
    yield module
    sys.modules.pop(spec.name, None)


def schema_of(model) -> dict:
    """name -> the JSON schema of a request field (its non-null branch)."""
    fields = {}
    for name, field in model.model_json_schema()["properties"].items():
        options = field.get("anyOf", [field])
        fields[name] = {**field, **next(o for o in options if o.get("type") != "null")}
    return fields


# -- training hyperparameters ----------------------------------------------------------------


def test_the_script_and_the_jobs_layer_share_one_table(script):
    rules = domain_rules.rules
    assert rules.__file__ == str(MODEL_CODE_DIR / "hyperparameters.py")
    assert script.hyperparameters is rules
    assert jobs.HYPERPARAMETER_RULES is rules.HYPERPARAMETERS
    assert jobs.SCRIPT_DEFAULTS is rules.DEFAULTS
    assert (
        jobs.HYPERPARAMETER_RULES["max_train_steps"]
        is script.hyperparameters.HYPERPARAMETERS["max_train_steps"]
    )


def test_max_train_steps_has_one_bound_for_the_script_and_the_jobs_layer(script, capsys):
    rule = domain_rules.HYPERPARAMETERS["max_train_steps"]
    high = int(rule.high)
    assert script.parse_args([*PATHS, "--max_train_steps", str(high)]).max_train_steps == high
    jobs.check_hyperparameters({"max_train_steps": high})
    with pytest.raises(SystemExit):
        script.parse_args([*PATHS, "--max_train_steps", str(high + 1)])
    assert f"from {rule.low} to {high}" in capsys.readouterr().err
    with pytest.raises(ValueError, match=f"max_train_steps must be from {rule.low} to {high}"):
        jobs.check_hyperparameters({"max_train_steps": high + 1})


def test_the_apis_training_bounds_lie_within_the_scripts():
    fields = schema_of(schemas.FineTuneRequest)
    assert set(fields) <= set(domain_rules.HYPERPARAMETERS)
    assert set(schemas.TRAINING_LIMITS) <= set(fields)
    for name, field in fields.items():
        rule = domain_rules.HYPERPARAMETERS[name]
        low = field.get("minimum", field.get("exclusiveMinimum"))
        assert rule.low <= low <= field["maximum"] <= rule.high, name
        if "exclusiveMinimum" not in field:
            assert low > rule.low or not rule.low_open, name
    # The product limit on steps is the API's own, and narrower than the script's.
    steps = fields["max_train_steps"]
    assert (steps["minimum"], steps["maximum"]) == schemas.TRAINING_LIMITS["max_train_steps"]
    assert steps["maximum"] <= domain_rules.HYPERPARAMETERS["max_train_steps"].high
    assert steps["default"] == domain_rules.DEFAULTS["max_train_steps"]


def test_an_api_limit_outside_the_scripts_bounds_is_refused(monkeypatch):
    high = domain_rules.HYPERPARAMETERS["max_train_steps"].high
    monkeypatch.setitem(schemas.TRAINING_LIMITS, "max_train_steps", (10, high + 1))
    with pytest.raises(ValueError, match=r"TRAINING_LIMITS\['max_train_steps'\]"):
        schemas.training_bounds("max_train_steps")


def test_whatever_the_api_accepts_the_jobs_layer_accepts():
    fields = schema_of(schemas.FineTuneRequest)
    extremes = {name: (field.get("minimum"), field["maximum"]) for name, field in fields.items()}
    for name, (low, high) in extremes.items():
        for value in (low, high):
            if value is None:
                continue
            body = schemas.FineTuneRequest(**{name: value})
            jobs.check_hyperparameters(body.hyperparameters())


def test_the_script_takes_the_tables_hyperparameters_and_the_jobs_paths(script):
    args = vars(script.parse_args(PATHS))
    assert set(args) == set(domain_rules.HYPERPARAMETERS) | jobs.RESERVED_HYPERPARAMETERS
    lora_layers = domain_rules.HYPERPARAMETERS["lora_layers"].choices
    assert sorted(lora_layers) == sorted(script.UNET_LORA_TARGETS)


@pytest.mark.parametrize(
    ("hyperparameters", "flag"),
    [
        ({"with_prior_preservation": True}, "--class_prompt"),
        ({"checkpoints_total_limit": 2}, "--checkpointing_steps"),
        ({"lr_warmup_steps": 300}, "--max_train_steps"),
    ],
)
def test_the_script_and_the_jobs_layer_refuse_the_same_combinations(
    script, hyperparameters, flag, capsys
):
    with pytest.raises(ValueError) as refused:
        jobs.check_hyperparameters(hyperparameters)
    argv = [item for name, value in hyperparameters.items() for item in (f"--{name}", str(value))]
    with pytest.raises(SystemExit):
        script.parse_args([*PATHS, *argv])
    error = capsys.readouterr().err
    assert flag in error
    # The same words, named as options instead of hyperparameters.
    reason = str(refused.value).split(": ", 1)[1]
    assert reason.replace("--", "") in error.replace("--", "")


def test_the_rules_ship_beside_the_script_in_the_jobs_source_directory():
    with tarfile.open(fileobj=io.BytesIO(pack_source_dir())) as archive:
        names = archive.getnames()
    assert {"train_dreambooth_lora.py", "hyperparameters.py"} <= set(names)


def test_the_library_finds_the_rules_through_workshop_model_code_dir(tmp_path):
    """As in the Lambda bundle: the package without its checkout, `model_code/` named by the
    environment. Importing the API's schemas imports neither torch nor diffusers."""
    copy = tmp_path / "model_code"
    shutil.copytree(MODEL_CODE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    code = (
        "import sys, helpers.api.schemas, helpers.ports.jobs;"
        "from helpers.domain import hyperparameters as h, generation as g;"
        "heavy = sorted({'torch', 'diffusers'} & set(sys.modules));"
        "print(h.rules.__file__, g.TRITON_MODEL_FILE, heavy)"
    )
    env = {**os.environ, "WORKSHOP_MODEL_CODE_DIR": str(copy)}
    found = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert found == [
        str(copy / "hyperparameters.py"),
        str(copy / "triton_sd" / "1" / "model.py"),
        "[]",
    ]


# -- generation inputs -----------------------------------------------------------------------


def test_the_apis_generation_bounds_are_the_triton_models():
    """What the API accepts, the model that the archives ship accepts, with its defaults."""
    model = load_model_code(MODEL_CODE / "1" / "model.py")
    fields = schema_of(schemas.GenerateRequest)
    json_type = {"text": "string", "int": "integer", "float": "number"}
    for name, (kind, default, low, high) in model.INPUTS.items():
        field = fields[name]
        assert field["type"] == json_type[kind], name
        if kind == "text":
            assert (field.get("minLength", 0), field["maxLength"]) == (low, high), name
        else:
            assert (field["minimum"], field["maximum"]) == (low, high), name
        assert field.get("multipleOf", 1) == model.MULTIPLE_OF.get(name, 1), name
        assert field.get("default") == default, name
    assert "prompt" in schemas.GenerateRequest.model_json_schema()["required"]
    assert dict(generation_inputs()).keys() == model.INPUTS.keys()


def test_the_models_multiple_of_rule_is_enforced_by_both():
    model = load_model_code(MODEL_CODE / "1" / "model.py")
    for name, step in model.MULTIPLE_OF.items():
        low = model.INPUTS[name][2]
        with pytest.raises(ValueError, match=f"multiple of {step}"):
            schemas.GenerateRequest(prompt="x", **{name: low + 1})
        with pytest.raises(model.InputError, match=f"{name} must be a multiple of {step}"):
            model.parse_inputs({"prompt": np.array([b"x"]), name: np.array([low + 1])}, {})
