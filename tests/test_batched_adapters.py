"""Many users' adapters in one denoising batch (model_code/triton_sd_shared: `BatchedGenerator`,
`AdapterPool`, `MixedAdapters`), in this process, against the same requests served alone.

"Alone" is the shared model's single-request path (`generate_for`: the hot-swap slot, itself
checked against the per-user model in test_adapter_serving.py); for a request without an
adapter, the bare base pipeline. Tolerance: at most 1 level (of 255) in any pixel.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from lora_training import train_lora

from helpers.services.packaging import load_model_code
from helpers.services.serving import SHARED_MODEL_CODE
from helpers.workshop.serving_comparison import synthetic_adapter

TOLERANCE = 1  # pixel levels
DEFAULTS = {"guidance_scale": 2.0, "width": 64, "height": 64}
USERS = [f"demo-u{i}--m1" for i in range(5)]


@pytest.fixture(scope="module")
def shared_py():
    return load_model_code(SHARED_MODEL_CODE / "1" / "model.py", "shared_model_batched")


@pytest.fixture(scope="module")
def adapter_folder(lora_weights, tmp_path_factory) -> Path:
    """Five users' distinct LoRAs (the trained one's shapes, random values), and two broken
    ones: a file that is no LoRA, and a LoRA for layers of another shape."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("batched-adapters")
    template = lora_weights.read_bytes()
    for seed, name in enumerate(USERS):
        (folder / f"{name}.safetensors").write_bytes(synthetic_adapter(template, seed))
    (folder / "demo-junk--m1.safetensors").write_bytes(b"not a safetensors file")
    misfit = {
        key: torch.zeros(*value.shape[:-1], value.shape[-1] + 3) if ".down." in key else value
        for key, value in load_file(lora_weights).items()
    }
    save_file(misfit, folder / "demo-misfit--m1.safetensors")
    return folder


def model_args(parameters: dict[str, str], name: str) -> dict:
    """`initialize`'s arguments as Triton's Python backend passes them."""
    config = {"parameters": {k: {"string_value": v} for k, v in parameters.items()}}
    return {"model_config": json.dumps(config), "model_name": name, "model_version": "1"}


def request_values(module, **inputs) -> dict:
    raw = {"prompt": np.array([inputs.pop("prompt", "a photo of sks toy").encode()], object)}
    for name, value in inputs.items():
        raw[name] = np.array([value.encode() if isinstance(value, str) else value])
    return module.parse_inputs(raw, DEFAULTS)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def alone_model(module, base: str, folder: Path):
    """The shared model's single-request path (the hot-swap slot)."""
    model = module.TritonPythonModel()
    parameters = {"base_model": base, "adapter_source": str(folder), "hotswap_rank": "8"}
    model.initialize(model_args(parameters, "shared-alone"))
    return model


def base_model(module, base: str):
    """The bare base pipeline, served as the per-user model serves (no LoRA)."""
    model = module.sd.TritonPythonModel()
    model.name = "bare-base"
    model.use(model.load_base({"base_model": base}), {"default_guidance_scale": "2.0"})
    return model


def batched(module, base: str, folder: Path, pool_size: int = 4, rank: int = 8, lora="peft"):
    pipe = base_model(module, base).pipe
    cache = module.AdapterCache(module.DirectorySource(str(folder)), 100, 1 << 30)
    return module.BatchedGenerator(pipe, cache, pool_size, rank, lora)


def assert_close(images, expected, label) -> None:
    assert len(images) == len(expected), label
    for image, want in zip(images, expected, strict=True):
        diff = int(np.abs(pixels(image) - pixels(want)).max())
        assert diff <= TOLERANCE, f"{label}: {diff} levels off"


# -- the grouping rule and the pool, without a picture ----------------------------------------


def test_only_steps_size_and_guidance_keep_requests_apart(shared_py):
    one = request_values(shared_py, num_inference_steps=2, seed=1)
    same = request_values(
        shared_py, num_inference_steps=2, seed=9, prompt="a dog", negative_prompt="blurry"
    )
    assert shared_py.batch_key(one) == shared_py.batch_key(same)
    for other in (
        {"num_inference_steps": 3},
        {"width": 72},
        {"height": 72},
        {"guidance_scale": 1.0},
    ):
        changed = request_values(shared_py, **{"num_inference_steps": 2, "seed": 1, **other})
        assert shared_py.batch_key(changed) != shared_py.batch_key(one), other


@pytest.mark.parametrize(("count", "fits"), [(4, True), (8, True), (6, False), (2, False)])
def test_a_layer_takes_the_names_of_the_batch_or_of_the_guided_batch(shared_py, count, fits):
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    model = torch.nn.Module()
    model.linear = torch.nn.Linear(3, 3)
    model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["linear"]), model, "pool0")
    torch.nn.init.normal_(model.linear.lora_B["pool0"].weight)
    x = torch.randn(count, 3)
    names = ["pool0", "__base__", "pool0", "__base__"]
    with shared_py.MixedAdapters([model], names):
        if not fits:
            with pytest.raises(ValueError, match=f"batch of {count} for 4 samples"):
                model.linear(x)
            return
        mixed = model.linear(x)
    base = model.linear.base_layer(x)
    for i, name in enumerate(names * (count // 4)):
        if name == "__base__":
            assert torch.equal(mixed[i], base[i])
        else:
            assert not torch.allclose(mixed[i], base[i])
    # the hooks are gone: outside the block every layer applies its active adapter as before
    assert not model.linear._forward_pre_hooks


# -- pictures: batched against alone ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("lora", ["peft", "grouped"])
@pytest.mark.parametrize("guidance", [2.0, 1.0])
def test_a_batch_of_interleaved_users_draws_each_users_own_picture(
    shared_py, tiny_pipeline_dir, adapter_folder, guidance, lora
):
    base = str(tiny_pipeline_dir)
    steps = {"num_inference_steps": 2, "guidance_scale": guidance}
    items = [
        (USERS[0], request_values(shared_py, seed=1, **steps)),
        (USERS[1], request_values(shared_py, seed=2, **steps)),
        (None, request_values(shared_py, seed=3, **steps)),  # a user with no adapter yet
        (USERS[0], request_values(shared_py, seed=4, prompt="a red toy", **steps)),
        (USERS[2], request_values(shared_py, seed=5, negative_prompt="blurry", **steps)),
        (USERS[1], request_values(shared_py, seed=6, num_images=2, **steps)),
    ]
    alone, bare = alone_model(shared_py, base, adapter_folder), base_model(shared_py, base)
    expected = [
        alone.generate_for(name, values)[0] if name else bare.generate(values)
        for name, values in items
    ]
    # the users' pictures of one request differ, so a leaked adapter would show
    same = items[0][1]
    pictures = [pixels(alone.generate_for(name, same)[0][0]) for name in USERS[:3]]
    pictures.append(pixels(bare.generate(same)[0]))
    for i in range(len(pictures)):
        for j in range(i):
            assert np.abs(pictures[i] - pictures[j]).max() > 8, (i, j)

    generator = batched(shared_py, base, adapter_folder, lora=lora)
    results = generator.generate(items)
    for (name, _), images, want in zip(items, results, expected, strict=True):
        assert_close(images, want, name)
    assert generator.batches == 1 and generator.samples == 7
    # the text encoder ran once per distinct (prompt, negative prompt): three, not seven
    assert generator.encoded == 3
    assert generator.pool.stats()["resident"] == 3

    # the same users again, in another order, with two new ones: residents cost nothing, the
    # new ones take the least recently used slots that this batch does not need
    again = [items[4], (USERS[3], items[1][1]), items[0], (USERS[4], items[2][1])]
    loads, copies = generator.pool.loads, generator.pool.copies
    results = generator.generate(again)
    for name, values in again:
        want = alone.generate_for(name, values)[0]
        assert_close(results[again.index((name, values))], want, name)
    assert generator.pool.loads + generator.pool.copies - loads - copies == 2
    assert set(generator.pool.resident) >= {USERS[0], USERS[2], USERS[3], USERS[4]}
    # a batch of one user's requests (the grouped path's single-adapter shortcut)
    results = generator.generate([items[0], items[3]])
    assert_close(results[0], expected[0], "one user, first")
    assert_close(results[1], expected[3], "one user, second")
    alone.finalize()


@pytest.mark.slow
def test_only_the_requests_of_a_failing_adapter_fail(shared_py, tiny_pipeline_dir, adapter_folder):
    base = str(tiny_pipeline_dir)
    values = request_values(shared_py, num_inference_steps=1, seed=7)
    names = [USERS[0], "demo-zed--m1", "demo-junk--m1", USERS[1], "demo-misfit--m1", USERS[0]]
    generator = batched(shared_py, base, adapter_folder, pool_size=3)
    results = generator.generate([(name, values) for name in names])
    assert isinstance(results[1], shared_py.AdapterNotFound) and "demo-zed--m1" in str(results[1])
    assert isinstance(results[2], shared_py.AdapterError) and "not a readable LoRA" in str(
        results[2]
    )
    assert isinstance(results[4], shared_py.AdapterError) and "does not fit" in str(results[4])
    alone = alone_model(shared_py, base, adapter_folder)
    for i in (0, 3, 5):
        assert_close(results[i], alone.generate_for(names[i], values)[0], names[i])
    # the misfit's slot is empty again and serves the next user correctly
    assert "demo-misfit--m1" not in generator.pool.resident
    results = generator.generate([(USERS[2], values), (USERS[0], values)])
    for name, images in zip([USERS[2], USERS[0]], results, strict=True):
        assert_close(images, alone.generate_for(name, values)[0], name)
    alone.finalize()


@pytest.mark.slow
def test_batches_split_by_the_grouping_rule_and_the_pool_size(
    shared_py, tiny_pipeline_dir, adapter_folder
):
    base = str(tiny_pipeline_dir)
    one = request_values(shared_py, num_inference_steps=1, seed=3)
    two = request_values(shared_py, num_inference_steps=2, seed=3)
    items = [(USERS[0], one), (USERS[1], two), (USERS[2], one), (USERS[3], one), (USERS[4], two)]
    generator = batched(shared_py, base, adapter_folder, pool_size=2)
    results = generator.generate(items)
    # one step: three users over a pool of two, so two batches; two steps: one batch
    assert generator.batches == 3
    alone = alone_model(shared_py, base, adapter_folder)
    for (name, values), images in zip(items, results, strict=True):
        assert_close(images, alone.generate_for(name, values)[0], name)
    alone.finalize()


@pytest.fixture(scope="module")
def text_encoder_adapter(tiny_pipeline_dir, adapter_folder, tmp_path_factory) -> str:
    """A LoRA with text-encoder layers (rank 8, cross-attention only in the UNet)."""
    weights = train_lora(
        tiny_pipeline_dir,
        tmp_path_factory.mktemp("lora-te"),
        "demo-bo",
        "--train_text_encoder",
        "--rank=8",
        "--lora_layers=cross_attention",
    )
    (adapter_folder / "demo-te--m1.safetensors").write_bytes(weights.read_bytes())
    return "demo-te--m1"


@pytest.mark.slow
@pytest.mark.parametrize("lora", ["peft", "grouped"])
def test_a_text_encoder_lora_applies_to_its_own_samples_only(
    shared_py, tiny_pipeline_dir, adapter_folder, text_encoder_adapter, lora
):
    base = str(tiny_pipeline_dir)
    values = request_values(shared_py, num_inference_steps=2, seed=11)
    names = [USERS[0], text_encoder_adapter, None, USERS[1], text_encoder_adapter]
    generator = batched(shared_py, base, adapter_folder, lora=lora)
    results = generator.generate([(name, values) for name in names])
    alone, bare = alone_model(shared_py, base, adapter_folder), base_model(shared_py, base)
    for name, images in zip(names, results, strict=True):
        want = alone.generate_for(name, values)[0] if name else bare.generate(values)
        assert_close(images, want, name)
    # one encoding for the text-encoder adapter's two samples, one for the other three
    assert generator.batches == 1 and generator.encoded == 2
    alone.finalize()


class SlowSource:
    """An adapter store whose `slow` adapters take `delay` seconds to fetch (S3 on a bad day);
    `fetched[name]` is when each fetch ended."""

    def __init__(self, module, folder: Path, slow: set[str], delay: float) -> None:
        self.source = module.DirectorySource(str(folder))
        self.slow, self.delay = slow, delay
        self.fetched: dict[str, float] = {}

    def fetch(self, name: str) -> bytes:
        import time

        if name in self.slow:
            time.sleep(self.delay)
        self.fetched[name] = time.perf_counter()
        return self.source.fetch(name)


@pytest.mark.slow
def test_a_cold_users_fetch_does_not_hold_back_the_warm_users_batch(
    shared_py, tiny_pipeline_dir, adapter_folder
):
    import time

    base = str(tiny_pipeline_dir)
    source = SlowSource(shared_py, adapter_folder, {USERS[2]}, delay=1.5)
    cache = shared_py.AdapterCache(source, 100, 1 << 30)
    generator = shared_py.BatchedGenerator(
        base_model(shared_py, base).pipe, cache, 4, 8, "grouped", fetch_grace=0.01
    )
    cache.get(USERS[0])  # a warm user
    values = request_values(shared_py, num_inference_steps=1, seed=5)
    items = [(USERS[0], values), (USERS[2], values), (None, values)]
    answered: dict[int, tuple[float, object, object]] = {}

    def deliver(index, result, hit) -> None:
        answered[index] = (time.perf_counter(), result, hit)

    generator.serve(items, deliver)
    # the warm user and the user with no adapter were answered while the cold fetch ran
    assert answered[0][0] < source.fetched[USERS[2]] and answered[2][0] < source.fetched[USERS[2]]
    assert answered[1][0] > source.fetched[USERS[2]]
    assert [answered[i][2] for i in range(3)] == [True, False, None]  # hit, miss, no adapter
    assert generator.deferred == 1 and generator.batches == 2
    alone, bare = alone_model(shared_py, base, adapter_folder), base_model(shared_py, base)
    assert_close(answered[0][1], alone.generate_for(USERS[0], values)[0], "warm")
    assert_close(answered[1][1], alone.generate_for(USERS[2], values)[0], "cold")
    assert_close(answered[2][1], bare.generate(values), "no adapter")
    # a fast store's adapters (fetched within the grace) join the batch instead
    source.slow.clear()
    before = generator.batches
    generator.serve([(USERS[0], values), (USERS[3], values)], deliver)
    assert generator.batches == before + 1 and generator.deferred == 1
    alone.finalize()


@pytest.mark.slow
def test_a_cancelled_request_stops_its_batch_only_when_all_of_it_is_cancelled(
    shared_py, tiny_pipeline_dir, adapter_folder
):
    base = str(tiny_pipeline_dir)
    generator = batched(shared_py, base, adapter_folder, lora="grouped")
    values = request_values(shared_py, num_inference_steps=3, seed=2)
    items = [(USERS[0], values), (USERS[1], values)]
    results: dict[int, object] = {}

    def deliver(index, result, hit) -> None:
        results[index] = result

    generator.serve(items, deliver, [lambda: True, None])
    assert isinstance(results[0], shared_py.sd.Cancelled)
    alone = alone_model(shared_py, base, adapter_folder)
    assert_close(results[1], alone.generate_for(USERS[1], values)[0], "the one still waiting")
    # everyone gone: the batch stops after its first step
    generator.serve(items, deliver, [lambda: True, lambda: True])
    for index in (0, 1):
        assert isinstance(results[index], shared_py.sd.Cancelled)
        assert "after 1 denoising steps" in str(results[index])
    alone.finalize()
