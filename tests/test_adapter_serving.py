"""Shared-base serving: packaging (helpers.services.serving) and the shared Triton model
(model_code/triton_sd_shared) run in this process, checked against the per-user model.

Correctness tolerance: a shared-base picture may differ from the per-user model's picture of
the same request by at most 1 level (of 255) in any pixel; on this machine they are equal.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from aws_fakes import fake_aws
from lora_training import train_lora

from helpers.domain.archives import safe_extract, write_tar_gz
from helpers.domain.serving import PerUserModels, SharedBase, serving_for, serving_from_record
from helpers.infra.local.store import LocalArtifactStore
from helpers.services.packaging import ModelExists, load_model_code
from helpers.services.serving import (
    adapter_prefix,
    adapter_source,
    build_shared_archive,
    package_for_mode,
    package_shared_base,
    publish_adapter,
    render_shared_config,
    shared_model_files,
    shared_model_name,
)

BUCKET = "workshop-test"
PREFIX = f"s3://{BUCKET}/endpoints/test/models/"
TOLERANCE = 1  # pixel levels
DEFAULTS = {"guidance_scale": 2.0, "width": 64, "height": 64}


# -- helpers ----------------------------------------------------------------------------------


def pbtxt_parameters(config: str) -> dict[str, str]:
    """The `parameters { key: ..., value: { string_value: ... } }` of a config.pbtxt."""
    pattern = r'parameters \{ key: "([^"]+)", value: \{ string_value: "([^"]*)" \} \}'
    return dict(re.findall(pattern, config))


def model_args(parameters: dict[str, str], repository: Path, name: str) -> dict:
    """`initialize`'s arguments as Triton's Python backend passes them."""
    config = {"parameters": {k: {"string_value": v} for k, v in parameters.items()}}
    return {
        "model_config": json.dumps(config),
        "model_repository": str(repository),
        "model_version": "1",
        "model_name": name,
    }


def shipped_shared_model(tmp_path: Path, base_model: str, source: str, **options):
    """The shared model as packaged (archive unpacked), loaded and initialized here."""
    config = render_shared_config(base_model, source, **options)
    name, archive = build_shared_archive(config, tmp_path / "shared.tar.gz")
    folder = safe_extract(archive, tmp_path / "shared") / name
    module = load_model_code(folder / "1" / "model.py", "shared_model_under_test")
    model = module.TritonPythonModel()
    model.initialize(model_args(pbtxt_parameters(config), folder, name))
    return module, model


def per_user_images(module, base_model: str, weights: Path, tmp_path: Path, values: dict):
    """What the per-user model (the one shipped beside the shared one) draws for `values`."""
    version = tmp_path / weights.stem / "1"
    version.mkdir(parents=True)
    (version / "pytorch_lora_weights.safetensors").write_bytes(weights.read_bytes())
    model = module.sd.TritonPythonModel()
    model.initialize(model_args({"base_model": base_model}, version.parent, weights.stem))
    images = model.generate(values)
    model.finalize()
    return images


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def request_values(module, **inputs) -> dict:
    raw = {"prompt": np.array([b"a photo of sks toy"], dtype=np.object_)}
    raw.update({name: np.array([value]) for name, value in inputs.items()})
    return module.parse_inputs(raw, DEFAULTS)


def perturbed(weights: Path, destination: Path, seed: int, metadata: dict | None = None) -> Path:
    """Another LoRA made from `weights` deterministically: noise of 3x each up weight's spread
    added (seed `seed`), and optionally other LoRA metadata."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    generator = torch.Generator().manual_seed(seed)
    for key, value in tensors.items():
        if ".lora.up." in key:
            noise = torch.randn(value.shape, generator=generator) * (3 * float(value.std()) or 0.01)
            tensors[key] = value + noise
    with safe_open(weights, "pt") as file:
        header = dict(file.metadata() or {})
    if metadata is not None:
        config = json.loads(header["lora_adapter_metadata"])
        config.update(metadata)
        header["lora_adapter_metadata"] = json.dumps(config)
    save_file(tensors, destination, metadata=header)
    return destination


@pytest.fixture(scope="module")
def adapters(lora_weights, tmp_path_factory) -> dict[str, Path]:
    """Two different real LoRAs (the trained one, and it perturbed), and the trained one with
    lora_alpha = 2 x rank in its metadata (so a scale of 2)."""
    folder = tmp_path_factory.mktemp("adapters")
    named = {"demo-ada--m1": folder / "demo-ada--m1.safetensors"}
    named["demo-ada--m1"].write_bytes(lora_weights.read_bytes())
    named["demo-bo--m1"] = perturbed(lora_weights, folder / "demo-bo--m1.safetensors", seed=1)
    named["demo-cy--m1"] = perturbed(
        lora_weights, folder / "demo-cy--m1.safetensors", seed=2, metadata={"unet.lora_alpha": 8}
    )
    return named


@pytest.fixture(scope="module")
def text_encoder_lora(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """A LoRA with text-encoder layers, rank 8, on the UNet's cross-attention only."""
    return train_lora(
        tiny_pipeline_dir,
        tmp_path_factory.mktemp("lora-te"),
        "demo-bo",
        "--train_text_encoder",
        "--rank=8",
        "--lora_layers=cross_attention",
    )


# -- packaging and routing ------------------------------------------------------------------


def test_serving_routes_a_user_to_their_target_and_never_takes_an_adapter_from_the_caller():
    assert PerUserModels().route("demo-ada--m1") == ("demo-ada--m1.tar.gz", {})
    shared = SharedBase("shared-base-0123456789ab")
    assert shared.route("demo-ada--m1") == (
        "shared-base-0123456789ab.tar.gz",
        {"adapter": "demo-ada--m1"},
    )
    with pytest.raises(ValueError, match="adapter is set from the user's model name"):
        shared.invoke(None, "workshop-mme", "demo-ada--m1", "x", adapter="demo-bo--m1")
    with pytest.raises(ValueError, match="model name"):
        shared.route("../demo-bo--m1")
    with pytest.raises(ValueError, match="mode must be one of"):
        serving_for("per-tenant")
    with pytest.raises(ValueError, match="shared_model"):
        serving_for("shared-base")
    # what an endpoint records of it reads back the same
    assert serving_from_record(shared.record()) == shared
    assert serving_from_record({}) == PerUserModels()
    assert shared.endpoint_models() == ("shared-base-0123456789ab",)


def test_adapters_live_beside_the_models_and_are_never_replaced(tmp_path, lora_weights):
    store = LocalArtifactStore(tmp_path / "store")
    store.create_bucket(BUCKET)
    adapters = adapter_prefix(PREFIX)
    assert adapters == f"s3://{BUCKET}/endpoints/test/adapters/"
    published = publish_adapter(store, lora_weights, adapters, "demo-ada", "m1")
    assert published.name == "demo-ada--m1"
    assert published.uri == f"{adapters}demo-ada--m1.safetensors"
    assert store.get_bytes(published.uri) == lora_weights.read_bytes()
    with pytest.raises(ModelExists, match="never reused"):
        publish_adapter(store, lora_weights, adapters, "demo-ada", "m1")
    # the local store's folder is what the model reads
    assert Path(adapter_source(store, adapters), "demo-ada--m1.safetensors").is_file()


def test_shared_config_names_base_source_and_bounds_and_refuses_injection():
    config = render_shared_config(
        "/models/base",
        "s3://bucket/endpoints/e/adapters/",
        gpu=True,
        region="eu-west-1",
        cache_max_count=10,
        cache_max_bytes=1000,
        hotswap_rank=8,
        runtime="/tmp/workshop-runtime/runtime-0123456789ab",
    )
    assert pbtxt_parameters(config) == {
        "runtime": "/tmp/workshop-runtime/runtime-0123456789ab",
        "base_model": "/models/base",
        "default_guidance_scale": "2.0",
        "cpu_threads": "0",  # the machine's one model process has every core
        "adapter_source": "s3://bucket/endpoints/e/adapters/",
        "aws_region": "eu-west-1",
        "adapter_cache_max_count": "10",
        "adapter_cache_max_bytes": "1000",
        "hotswap_rank": "8",
        "lora_batching": "grouped",
        "fetch_grace_ms": "10",
    }
    assert "KIND_GPU" in config and not re.search(r"^name:", config, re.M)
    assert 'name: "adapter", data_type: TYPE_STRING' in config
    # batches of up to 8 by default, with no wait beyond the time the model is busy
    assert re.search(r"^max_batch_size: 8$", config, re.M)
    assert "dynamic_batching { max_queue_delay_microseconds: 0 }" in config
    one = render_shared_config("/base", "/adapters", max_batch=1)
    assert re.search(r"^max_batch_size: 1$", one, re.M) and "dynamic_batching {" not in one
    assert pbtxt_parameters(one)["cpu_threads"] == "0"  # one at a time too
    with pytest.raises(ValueError, match="quotes"):
        render_shared_config('x" } }', "/adapters")
    with pytest.raises(ValueError, match="hotswap_rank"):
        render_shared_config("/base", "/adapters", hotswap_rank=0)


def test_a_batching_shared_config_turns_on_the_dynamic_batcher_with_a_bounded_delay():
    config = render_shared_config(
        "/base", "/adapters", max_batch=8, queue_delay_ms=2.5, lora_batching="peft", cpu_threads=2
    )
    assert re.search(r"^max_batch_size: 8$", config, re.M)
    assert "dynamic_batching { max_queue_delay_microseconds: 2500 }" in config
    parameters = pbtxt_parameters(config)
    assert parameters["lora_batching"] == "peft" and parameters["cpu_threads"] == "2"
    for bad, match in (
        ({"max_batch": 0}, "max_batch"),
        ({"queue_delay_ms": 5000}, "queue_delay_ms must be between 0 and 1000"),
        ({"fetch_grace_ms": -1}, "fetch_grace_ms"),
        ({"lora_batching": "fast"}, "lora_batching must be one of"),
        ({"cpu_threads": -1}, "cpu_threads"),
    ):
        with pytest.raises(ValueError, match=match):
            render_shared_config("/base", "/adapters", **bad)


def test_the_shared_model_is_named_by_its_content_and_packaged_once(tmp_path):
    store = LocalArtifactStore(tmp_path / "store")
    store.create_bucket(BUCKET)
    files = shared_model_files(render_shared_config("/base", "/adapters"))
    assert set(files) == {"config.pbtxt", "1/model.py", "1/triton_sd_model.py"}
    name = shared_model_name(files)
    assert re.fullmatch(r"shared-base-[0-9a-f]{12}", name)
    assert shared_model_name(files) == name
    assert shared_model_name(shared_model_files(render_shared_config("/b", "/adapters"))) != name
    first = package_shared_base(store, PREFIX, "/base", "/adapters")
    again = package_shared_base(store, PREFIX, "/base", "/adapters")
    assert first == again and first.name == name
    assert first.uri == f"{PREFIX}{name}.tar.gz" and first.size_bytes < 100_000  # no weights


def test_package_for_mode_publishes_each_users_newest_adapter_and_the_shared_model(
    tmp_path, lora_weights
):
    store = LocalArtifactStore(tmp_path / "store")
    store.create_bucket(BUCKET)
    training = write_tar_gz(
        tmp_path / "model.tar.gz", {"pytorch_lora_weights.safetensors": lora_weights}
    )
    jobs = []
    for user, model_id, ended in [
        ("demo-ada", "m1", "1"),
        ("demo-ada", "m2", "2"),
        ("bo", "m1", "1"),
    ]:
        uri = f"s3://{BUCKET}/jobs/{user}-{model_id}/output/model.tar.gz"
        store.put_file(uri, training)
        job = {"user_id": user, "model_id": model_id, "output_uri": uri, "ended_at": ended}
        jobs.append(SimpleNamespace(status=SimpleNamespace(value="COMPLETED"), **job))
    fake_jobs = SimpleNamespace(list=lambda: jobs)
    serving, published = package_for_mode("shared-base", fake_jobs, store, PREFIX, "/base")
    assert {user: adapter.name for user, adapter in published.items()} == {
        "bo": "bo--m1",
        "demo-ada": "demo-ada--m2",
    }
    assert serving.mode == "shared-base" and store.exists(f"{PREFIX}{serving.shared_model}.tar.gz")
    again, _ = package_for_mode("shared-base", fake_jobs, store, PREFIX, "/base")
    assert again == serving  # nothing new, nothing replaced
    per_user, archives = package_for_mode("per-user", fake_jobs, store, PREFIX, "/base")
    assert (
        per_user == PerUserModels() and archives["demo-ada"].target_model == "demo-ada--m2.tar.gz"
    )


# -- the shared model's parts, in this process ------------------------------------------------


@pytest.fixture(scope="module")
def shared_py():
    from helpers.services.serving import SHARED_MODEL_CODE

    return load_model_code(SHARED_MODEL_CODE / "1" / "model.py", "shared_model_parts")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "adapter is required"),
        (np.array([b"../demo-ada--m1"], dtype=np.object_), "adapter must look like"),
        (np.array([b"demo-ada"], dtype=np.object_), "adapter must look like"),
        (np.array([b"a--b", b"c--d"], dtype=np.object_), "exactly one value"),
    ],
)
def test_a_bad_adapter_input_is_an_input_error_naming_it(shared_py, value, message):
    with pytest.raises(shared_py.InputError, match=message):
        shared_py.parse_adapter(value)


def test_prepared_adapters_fold_alpha_into_the_up_weights_and_refuse_non_loras(shared_py, adapters):
    from safetensors.torch import load_file, save

    data = adapters["demo-ada--m1"].read_bytes()
    plain = shared_py.prepare_adapter("demo-ada--m1", data)
    assert plain.rank == 4 and not plain.text_encoder and not plain.scales
    assert plain.nbytes == len(data)  # the cache holds the file's bytes, not tensor objects
    raw = load_file(adapters["demo-ada--m1"])
    assert plain.keys == set(raw)
    for key, value in plain.state_dict.items():
        assert np.array_equal(value.numpy(), raw[key].numpy()), key
    scaled = shared_py.prepare_adapter("demo-cy--m1", adapters["demo-cy--m1"].read_bytes())
    raw = load_file(adapters["demo-cy--m1"])
    for key, value in scaled.state_dict.items():
        factor = 2.0 if ".lora.up." in key else 1.0  # lora_alpha 8 over rank 4
        assert np.allclose(value.numpy(), raw[key].numpy() * factor), key
    with pytest.raises(shared_py.AdapterError, match="not a readable LoRA"):
        shared_py.prepare_adapter("x--y", b"not a safetensors file")
    import torch

    with pytest.raises(shared_py.AdapterError, match="is not a LoRA"):
        shared_py.prepare_adapter("x--y", save({"unet.conv.weight": torch.zeros(2)}))


def test_the_cache_keeps_the_most_recent_adapters_within_count_and_bytes(shared_py, adapters):
    class Source:
        def fetch(self, name):
            if name == "demo-zed--m1":
                raise shared_py.AdapterNotFound(f"unknown adapter {name!r}")
            return adapters[name].read_bytes()

    source = Source()
    size = max(len(path.read_bytes()) for path in adapters.values())
    cache = shared_py.AdapterCache(source, max_count=2, max_bytes=10 * size)
    for name in ["demo-ada--m1", "demo-bo--m1", "demo-ada--m1", "demo-cy--m1"]:
        cache.get(name)
    assert list(cache.entries) == ["demo-ada--m1", "demo-cy--m1"]  # bo was the LRU one
    assert (cache.hits, cache.misses, cache.evictions) == (1, 3, 1)
    assert cache.bytes == sum(adapter.nbytes for adapter in cache.entries.values())
    assert cache.get("demo-ada--m1")[1] is True and cache.get("demo-bo--m1")[1] is False
    with pytest.raises(shared_py.AdapterNotFound, match="demo-zed--m1"):
        cache.get("demo-zed--m1")
    by_bytes = shared_py.AdapterCache(source, max_count=100, max_bytes=2 * size)
    for name in ["demo-ada--m1", "demo-bo--m1", "demo-cy--m1"]:
        by_bytes.get(name)
    assert list(by_bytes.entries) == ["demo-bo--m1", "demo-cy--m1"] and by_bytes.bytes <= 2 * size
    with pytest.raises(shared_py.AdapterError, match="adapter_cache_max_bytes"):
        shared_py.AdapterCache(source, max_count=1, max_bytes=1000).get("demo-ada--m1")


def test_adapters_come_from_s3_with_the_model_s_own_boto3(shared_py, adapters, monkeypatch):
    from moto import mock_aws

    fake_aws(monkeypatch, "eu-west-1")
    with mock_aws():
        import boto3

        s3 = boto3.client("s3", region_name="eu-west-1")
        s3.create_bucket(
            Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}
        )
        data = adapters["demo-ada--m1"].read_bytes()
        s3.put_object(Bucket=BUCKET, Key="endpoints/e/adapters/demo-ada--m1.safetensors", Body=data)
        source = shared_py.open_adapter_source(f"s3://{BUCKET}/endpoints/e/adapters/", "eu-west-1")
        assert source.fetch("demo-ada--m1") == data
        with pytest.raises(shared_py.AdapterNotFound, match="unknown adapter 'demo-zed--m1'"):
            source.fetch("demo-zed--m1")
    with pytest.raises(ValueError, match="adapter_source must be an existing directory"):
        shared_py.open_adapter_source("ADAPTER_SOURCE", "", "shared-base-x")


# -- correctness: the shared model against the per-user model ---------------------------------


@pytest.mark.slow
def test_interleaved_users_get_exactly_their_own_models_pictures(
    tmp_path, tiny_pipeline_dir, adapters
):
    base = str(tiny_pipeline_dir)
    # slot rank 4 = the adapters' rank: no padding, the case where a parameter could alias a
    # cached adapter if the slot's first load did not copy it
    module, model = shipped_shared_model(
        tmp_path, base, str(adapters["demo-ada--m1"].parent), hotswap_rank=4
    )
    values = request_values(module, num_inference_steps=2, seed=3)
    expected = {
        name: pixels(per_user_images(module, base, path, tmp_path, values)[0])
        for name, path in adapters.items()
    }
    # the users' pictures differ, so a leaked adapter would show
    assert np.abs(expected["demo-ada--m1"] - expected["demo-bo--m1"]).max() > 8
    assert np.abs(expected["demo-ada--m1"] - expected["demo-cy--m1"]).max() > 8

    order = ["demo-ada--m1", "demo-bo--m1", "demo-ada--m1", "demo-bo--m1", "demo-cy--m1"]
    order += ["demo-ada--m1", "demo-cy--m1", "demo-bo--m1"]
    hits = []
    for name in order:
        images, hit = model.generate_for(name, values)
        hits.append(hit)
        assert np.abs(pixels(images[0]) - expected[name]).max() <= TOLERANCE, name
    assert hits == [False, False, True, True, False, True, True, True]
    stats = model.stats()
    assert stats["slot_loads"] == 1 and stats["hotswaps"] == len(order) - 1
    assert stats["swaps_by_copy"] is True

    # the same through diffusers' own hot-swap, the path where the copy does not apply
    model.slot.params = None
    for name in ["demo-ada--m1", "demo-cy--m1", "demo-bo--m1"]:
        images, _ = model.generate_for(name, values)
        assert model.slot.last == "hotswap"
        assert np.abs(pixels(images[0]) - expected[name]).max() <= TOLERANCE, name

    # several pictures in one request, and an unknown user, who changes nothing
    two = request_values(module, num_inference_steps=2, seed=3, num_images=2)
    images, _ = model.generate_for("demo-bo--m1", two)
    assert np.abs(pixels(images[0]) - expected["demo-bo--m1"]).max() <= 2  # batched rounding
    with pytest.raises(module.AdapterNotFound, match="unknown adapter 'demo-zed--m1'"):
        model.generate_for("demo-zed--m1", values)
    images, _ = model.generate_for("demo-bo--m1", values)
    assert np.abs(pixels(images[0]) - expected["demo-bo--m1"]).max() <= TOLERANCE
    model.finalize()


@pytest.mark.slow
def test_adapters_that_cannot_hot_swap_reload_the_slot_and_stay_correct(
    tmp_path, tiny_pipeline_dir, adapters, text_encoder_lora
):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "adapters"
    folder.mkdir()
    for name in ("demo-ada--m1", "demo-bo--m1"):
        (folder / f"{name}.safetensors").write_bytes(adapters[name].read_bytes())
    (folder / "demo-te--m1.safetensors").write_bytes(text_encoder_lora.read_bytes())
    unet_only = {k: v for k, v in load_file(text_encoder_lora).items() if k.startswith("unet.")}
    save_file(unet_only, folder / "demo-x--m1.safetensors", metadata={"format": "pt"})
    base = str(tiny_pipeline_dir)
    module, model = shipped_shared_model(tmp_path, base, str(folder), hotswap_rank=4)
    values = request_values(module, num_inference_steps=2, seed=5)
    expected = {
        path.stem: pixels(per_user_images(module, base, path, tmp_path, values)[0])
        for path in folder.iterdir()
    }
    order = ["demo-ada--m1", "demo-x--m1", "demo-bo--m1", "demo-te--m1", "demo-ada--m1"]
    order += ["demo-x--m1", "demo-te--m1", "demo-te--m1", "demo-bo--m1"]
    swaps = []
    for name in order:
        images, _ = model.generate_for(name, values)
        swaps.append(model.slot.last)
        assert np.abs(pixels(images[0]) - expected[name]).max() <= TOLERANCE, name
    # x has rank 8 > the slot's 4: reload at 8; bo then swaps into it. te has text-encoder
    # layers, which cannot be hot-swapped: reloads to and from it. x after ada swaps: the slot
    # keeps every layer seen (zeros where the adapter has none) at the largest rank seen.
    assert swaps == ["load", "load", "hotswap", "load", "load", "hotswap", "load", "active", "load"]
    model.finalize()
