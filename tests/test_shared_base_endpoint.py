"""Shared-base serving on the local endpoint: real tritonserver + router, invoked through boto3,
next to the per-user models it must match (same prefix, same endpoint)."""

from __future__ import annotations

import csv
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from botocore.exceptions import ClientError

from helpers.domain.generation import build_request, parse_response
from helpers.domain.serving import PerUserModels, SharedBase
from helpers.infra.local.endpoint import LocalEndpoint
from helpers.infra.local.store import LocalArtifactStore
from helpers.services.packaging import build_archive
from helpers.services.serving import (
    adapter_prefix,
    adapter_source,
    package_shared_base,
    publish_adapter,
)
from helpers.workshop.serving_comparison import synthetic_adapter

pytestmark = pytest.mark.slow

BUCKET = "workshop-test"
PREFIX = f"s3://{BUCKET}/endpoints/test/models/"
USERS = ["demo-ada--m1", "demo-bo--m1"]
MANY = [f"load-u{i:02d}--m1" for i in range(30)]
FAST = {"num_inference_steps": 2, "seed": 3}
TOLERANCE = 1  # pixel levels, as in test_adapter_serving


@pytest.fixture(scope="module")
def registered(tmp_path_factory, lora_weights, tiny_pipeline_dir):
    """Both modes on one prefix: a per-user archive and an adapter for each of USERS (two
    different LoRAs), synthetic adapters for MANY, and the shared model serving one request
    at a time."""
    root = tmp_path_factory.mktemp("shared-endpoint")
    store = LocalArtifactStore(root / "store")
    store.create_bucket(BUCKET)
    adapters = adapter_prefix(PREFIX)
    template = lora_weights.read_bytes()
    for i, name in enumerate(USERS + MANY):
        weights = root / f"{name}.safetensors"
        weights.write_bytes(template if i == 0 else synthetic_adapter(template, seed=i))
        user, model = name.split("--")
        publish_adapter(store, weights, adapters, user, model)
        if name in USERS:
            archive = build_archive(name, weights, str(tiny_pipeline_dir), root / f"{name}.tar.gz")
            store.put_file(f"{PREFIX}{name}.tar.gz", archive)
    shared = package_shared_base(
        store, PREFIX, str(tiny_pipeline_dir), adapter_source(store, adapters), max_batch=1
    )
    return store, SharedBase(shared.name)


@pytest.fixture(scope="module")
def batching(registered, tiny_pipeline_dir):
    """A second shared model on the prefix, packaged to batch up to 4 requests; a long queue
    delay, so that requests sent together are batched together."""
    store, _ = registered
    source = adapter_source(store, adapter_prefix(PREFIX))
    shared = package_shared_base(
        store, PREFIX, str(tiny_pipeline_dir), source, max_batch=4, queue_delay_ms=300
    )
    return SharedBase(shared.name)


@pytest.fixture(scope="module")
def endpoint(registered, tmp_path_factory):
    store, _ = registered
    work = tmp_path_factory.mktemp("endpoint")
    with LocalEndpoint(store, PREFIX, work, max_loaded_models=3) as endpoint:
        yield endpoint
    assert not endpoint.triton.is_running()


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_the_shared_base_draws_each_users_own_picture_in_one_process(endpoint, registered):
    _, shared = registered
    runtime = endpoint.runtime_client()
    per_user = PerUserModels()
    expected = {
        user: pixels(per_user.invoke(runtime, endpoint.name, user, "a photo of sks toy", **FAST)[0])
        for user in USERS
    }
    assert np.abs(expected[USERS[0]] - expected[USERS[1]]).max() > 8  # a leak would show
    for user in [*USERS, *USERS, USERS[0]]:  # A, B, A, B, A
        images = shared.invoke(runtime, endpoint.name, user, "a photo of sks toy", **FAST)
        assert np.abs(pixels(images[0]) - expected[user]).max() <= TOLERANCE, user
    # one process for every shared-base user, beside one per per-user model
    assert len(endpoint.triton.model_stub_pids(shared.shared_model)) == 1
    assert len(endpoint.triton.stub_pids()) == 3


def request_without_adapter() -> tuple[bytes, str]:
    from tritonclient.http import InferenceServerClient

    from helpers.domain.generation import BINARY_JSON, make_inputs

    inputs = make_inputs("a photo of sks toy", num_inference_steps=1, adapter="demo-ada--m1")
    inputs = [tensor for tensor in inputs if tensor.name() != "adapter"]
    body, json_size = InferenceServerClient.generate_request_body(inputs)
    return body, f"{BINARY_JSON};json-header-size={json_size}"


def test_unknown_or_malformed_adapters_fail_that_request_only(endpoint, registered):
    _, shared = registered
    runtime = endpoint.runtime_client()
    target = f"{shared.shared_model}.tar.gz"

    def error_of(**inputs) -> ClientError:
        body, content_type = build_request(
            "a photo of sks toy", num_inference_steps=1, **{"adapter": "demo-ada--m1", **inputs}
        )
        if inputs.get("adapter", "") is None:  # the other inputs as a shared-model request's
            body, content_type = request_without_adapter()
        with pytest.raises(ClientError) as caught:
            runtime.invoke_endpoint(
                EndpointName=endpoint.name, TargetModel=target, ContentType=content_type, Body=body
            )
        return caught.value

    unknown = error_of(adapter="demo-zed--m1")
    assert unknown.response["Error"]["Code"] == "ModelError"
    assert "unknown adapter 'demo-zed--m1'" in str(unknown)
    assert "adapter must look like" in str(error_of(adapter="../demo-ada--m1"))
    # Triton itself refuses a request without the input (one sample's shape, [1, 1])
    assert "adapter" in str(error_of(adapter=None))
    assert shared.invoke(runtime, endpoint.name, USERS[1], "a photo of sks toy", **FAST)


def test_adapter_cache_output_and_a_zipf_load_test_over_many_users(endpoint, registered, tmp_path):
    from helpers.workshop.loadtest import run_load_test

    _, shared = registered
    runtime = endpoint.runtime_client()
    body, content_type = build_request(
        "x", outputs=("images", "adapter_cache"), adapter=MANY[-1], num_inference_steps=1
    )
    caches = []
    for _ in range(2):
        answer = runtime.invoke_endpoint(
            EndpointName=endpoint.name,
            TargetModel=f"{shared.shared_model}.tar.gz",
            ContentType=content_type,
            Body=body,
        )
        caches += parse_response(answer["Body"].read(), answer["ContentType"], "adapter_cache")
    assert caches == [b"miss", b"hit"]

    result = run_load_test(
        endpoint.url,
        endpoint.name,
        MANY,
        tmp_path / "load",
        users=2,
        duration_s=5,
        shared_model=shared.shared_model,
    )
    assert result.failures == 0 and result.requests >= 10
    with (tmp_path / "load" / "requests.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert {row["target"] for row in rows} <= set(MANY)
    assert {row["cache"] for row in rows} == {"hit", "miss"}  # adapters fetched, then cached


def test_a_batching_shared_model_draws_each_users_picture_from_one_batch(
    endpoint, registered, batching
):
    _, shared = registered
    runtime = endpoint.runtime_client()
    requests = [
        (USERS[0], 1),
        (USERS[1], 2),
        (MANY[5], 3),  # a user whose adapter the batching model has not fetched yet
        ("demo-zed--m1", 4),  # no such user: fails alone
        (USERS[0], 5),
    ]

    def draw(serving, user, seed):
        try:
            (image,) = serving.invoke(
                runtime, endpoint.name, user, "a photo of sks toy", num_inference_steps=2, seed=seed
            )
            return pixels(image)
        except ClientError as error:
            return error

    draw(batching, USERS[1], 9)  # the model loads; USERS[1]'s adapter is then cached
    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(lambda request: draw(batching, *request), requests))
    assert isinstance(answers[3], ClientError) and "unknown adapter 'demo-zed--m1'" in str(
        answers[3]
    )
    for (user, seed), answer in zip(requests, answers, strict=True):
        if user in (USERS + MANY):  # as the one-at-a-time model draws it
            want = draw(shared, user, seed)
            assert np.abs(answer - want).max() <= TOLERANCE, user
    # Triton handed the model more than one request at once
    client = endpoint.triton.client()
    stats = client.get_inference_statistics(
        batching.shared_model, headers=endpoint.triton.restricted_headers
    )
    sizes = {batch["batch_size"] for batch in stats["model_stats"][0]["batch_stats"]}
    assert max(sizes) > 1, sizes
