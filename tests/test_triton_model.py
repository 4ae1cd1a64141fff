"""The per-user Triton model (model_code/triton_sd) and its packaging, on a real tritonserver."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from helpers.domain.archives import safe_extract, write_tar_gz
from helpers.domain.generation import make_inputs
from helpers.infra.local.store import LocalArtifactStore
from helpers.infra.local.triton_server import TritonServer, free_ports
from helpers.services.packaging import (
    ModelExists,
    build_archive,
    check_model_name,
    load_model_code,
    model_name,
    package_user_model,
    render_config,
)

model_py = load_model_code()
DEFAULTS = {"guidance_scale": 2.0, "width": 64, "height": 64}


def raw(**values) -> dict:
    """Inputs as Triton hands them to the model: numpy arrays of shape [1]."""
    arrays = {}
    for name, value in values.items():
        if isinstance(value, str):
            value = value.encode()
        arrays[name] = np.array([value], dtype=np.object_ if isinstance(value, bytes) else None)
    return arrays


# -- input checking (no server) -------------------------------------------------------------


def test_inputs_get_defaults_and_types():
    values = model_py.parse_inputs(raw(prompt="a photo of sks toy"), DEFAULTS)
    assert values == {
        "prompt": "a photo of sks toy",
        "negative_prompt": "",
        "num_inference_steps": 20,
        "guidance_scale": 2.0,
        "seed": 0,
        "width": 64,
        "height": 64,
        "num_images": 1,
    }
    values = model_py.parse_inputs(
        raw(prompt="x", num_inference_steps=np.int32(5), guidance_scale=np.float32(7.5)), DEFAULTS
    )
    assert values["num_inference_steps"] == 5 and values["guidance_scale"] == 7.5


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({}, "prompt is required"),
        ({"prompt": "   "}, "prompt must be 1-500 characters"),
        ({"prompt": "x" * 501}, "prompt must be 1-500 characters, got 501"),
        ({"prompt": b"\xff\xfe"}, "prompt must be UTF-8"),
        (
            {"prompt": "x", "num_inference_steps": 0},
            "num_inference_steps must be between 1 and 100",
        ),
        ({"prompt": "x", "num_inference_steps": 2.5}, "num_inference_steps must be a whole"),
        ({"prompt": "x", "guidance_scale": float("nan")}, "guidance_scale must be a finite"),
        ({"prompt": "x", "guidance_scale": 21.0}, "guidance_scale must be between 0.0 and 20.0"),
        ({"prompt": "x", "seed": -1}, "seed must be between 0"),
        ({"prompt": "x", "width": 70}, "width must be a multiple of 8"),
        ({"prompt": "x", "height": 4096}, "height must be between 64 and 1024"),
        ({"prompt": "x", "num_images": 5}, "num_images must be between 1 and 4"),
    ],
)
def test_bad_inputs_name_the_input_and_what_is_allowed(inputs, message):
    with pytest.raises(model_py.InputError, match=message.replace("(", r"\(")):
        model_py.parse_inputs(raw(**inputs), DEFAULTS)


def test_more_than_one_value_or_unknown_inputs_are_refused():
    with pytest.raises(model_py.InputError, match=r"seed must hold exactly one value"):
        model_py.parse_inputs({**raw(prompt="x"), "seed": np.array([1, 2])}, DEFAULTS)
    with pytest.raises(model_py.InputError, match=r"unknown inputs \['model'\]"):
        model_py.parse_inputs({**raw(prompt="x"), "model": np.array([b"other"])}, DEFAULTS)


# -- packaging --------------------------------------------------------------------------------


def test_model_names_carry_user_and_model_and_refuse_the_rest():
    assert model_name("demo-ada", "ft-1") == "demo-ada--ft-1"
    for bad in ("../x", "demo-ada", "Demo--x", "a--b/c", ""):
        with pytest.raises(ValueError, match="model name"):
            check_model_name(bad)
    with pytest.raises(ValueError, match="user_id"):
        model_name("Ada!", "m1")


def test_config_names_the_base_model_and_instance_kind():
    config = render_config("/models/base", gpu=True, guidance=3.0)
    assert 'string_value: "/models/base"' in config and "KIND_GPU" in config
    assert 'string_value: "3.0"' in config
    assert not [line for line in config.splitlines() if line.startswith("name:")]
    with pytest.raises(ValueError, match="quotes"):
        render_config('x" } parameters { key: "y')


def test_packaging_puts_one_mme_archive_per_model_and_never_replaces_it(
    tmp_path, lora_weights, tiny_pipeline_dir
):
    store = LocalArtifactStore(tmp_path / "store")
    store.create_bucket("workshop-test")
    jobs, prefix, base = (
        "s3://workshop-test/jobs/",
        "s3://workshop-test/endpoint/models",
        str(tiny_pipeline_dir),
    )
    training = write_tar_gz(
        tmp_path / "model.tar.gz",
        {"pytorch_lora_weights.safetensors": lora_weights, "training_summary.json": "{}"},
    )
    store.put_file("s3://workshop-test/jobs/j1/output/model.tar.gz", training)
    packaged = package_user_model(
        store,
        "s3://workshop-test/jobs/j1/output/model.tar.gz",
        "s3://workshop-test/endpoint/models/",
        "demo-ada",
        "m1",
        str(tiny_pipeline_dir),
    )
    assert packaged.uri == "s3://workshop-test/endpoint/models/demo-ada--m1.tar.gz"
    assert packaged.target_model == "demo-ada--m1.tar.gz"
    store.get_file(packaged.uri, tmp_path / "packaged.tar.gz")
    with tarfile.open(tmp_path / "packaged.tar.gz") as archive:
        assert archive.getnames() == [
            "demo-ada--m1/config.pbtxt",
            "demo-ada--m1/1/model.py",
            "demo-ada--m1/1/pytorch_lora_weights.safetensors",
        ]
    assert packaged.size_bytes < 1_000_000  # the LoRA, never the base model
    with pytest.raises(ModelExists, match="never reused"):
        package_user_model(store, jobs + "j1/output/model.tar.gz", prefix, "demo-ada", "m1", base)

    empty = write_tar_gz(tmp_path / "empty.tar.gz", {"training_summary.json": "{}"})
    store.put_file("s3://workshop-test/jobs/j2/output/model.tar.gz", empty)
    with pytest.raises(ValueError, match="holds no pytorch_lora_weights"):
        package_user_model(store, jobs + "j2/output/model.tar.gz", prefix, "demo-ada", "m2", base)
    assert not store.exists("s3://workshop-test/endpoint/models/demo-ada--m2.tar.gz")


# -- on a real tritonserver -------------------------------------------------------------------


def infer(client, name: str, **values):
    return list(client.infer(name, make_inputs(**values)).as_numpy("images"))


@pytest.mark.slow
def test_a_packaged_model_generates_pngs_on_triton_and_survives_bad_requests(
    tmp_path, lora_weights, tiny_pipeline_dir
):
    from tritonclient.utils import InferenceServerException

    archive = build_archive(
        "demo-ada--m1", lora_weights, str(tiny_pipeline_dir), tmp_path / "m.tar.gz"
    )
    repository = safe_extract(archive, tmp_path / "repository")
    http, grpc, metrics = free_ports(3)
    with TritonServer(repository, http, grpc, metrics, tmp_path / "triton.log") as server:
        client = server.client()
        client.load_model("demo-ada--m1")
        first = infer(client, "demo-ada--m1", prompt="a photo of sks toy", num_inference_steps=2)
        assert len(first) == 1
        image = Image.open(io.BytesIO(first[0]))
        assert image.format == "PNG" and image.size == (64, 64)

        again = infer(client, "demo-ada--m1", prompt="a photo of sks toy", num_inference_steps=2)
        two = infer(
            client, "demo-ada--m1", prompt="a photo of sks toy", num_inference_steps=2,
            seed=0, num_images=2,
        )  # fmt: skip
        other = infer(
            client, "demo-ada--m1", prompt="a photo of sks toy", num_inference_steps=2, seed=1
        )
        assert again == first  # same seed, same bytes
        assert len(two) == 2 and other[0] != first[0]
        pixels = [np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16) for png in (*two, *other)]
        assert np.abs(pixels[1] - pixels[2]).max() <= 2  # image i of a batch is seed + i

        with pytest.raises(InferenceServerException, match="num_inference_steps must be between"):
            infer(client, "demo-ada--m1", prompt="x", num_inference_steps=500)
        with pytest.raises(InferenceServerException, match="prompt must be 1-500"):
            infer(client, "demo-ada--m1", prompt="x" * 600)
        # the model is still there and well after the refused requests
        assert infer(client, "demo-ada--m1", prompt="toy", num_inference_steps=1)
