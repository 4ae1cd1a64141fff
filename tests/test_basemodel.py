"""The offline base model: drawn data, tokenizer, detector, build, and the committed weights."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from helpers.settings import DEFAULT_BASE_MODEL
from helpers.workshop.basemodel.drawing import COLORS, SHAPES, Scene, draw, make_dataset, prompt_for
from helpers.workshop.basemodel.loading import (
    check_base_pipeline,
    check_pipeline_dir,
    is_shapes_model,
    load_base_pipeline,
    read_build_info,
    sample_size,
    weights_bytes,
)
from helpers.workshop.basemodel.parts import evaluate_parts
from helpers.workshop.basemodel.pretrain import BuildConfig, build_base_model
from helpers.workshop.basemodel.prompt_following import detect, evaluate_pipeline
from helpers.workshop.basemodel.tokenizer import MAX_LENGTH


def test_drawings_are_deterministic_and_balanced():
    first, scenes = make_dataset(48, seed=3)
    again, _ = make_dataset(48, seed=3)
    other, _ = make_dataset(48, seed=4)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    assert {(s.color, s.shape) for s in scenes} == {(c, s) for c in COLORS for s in SHAPES}


def test_draw_rejects_unknown_shape_and_colour():
    with pytest.raises(ValueError, match="shape"):
        draw(Scene("hexagon", "red", (32, 32), 30, (255, 255, 255)))
    with pytest.raises(ValueError, match="color"):
        draw(Scene("circle", "teal", (32, 32), 30, (255, 255, 255)))


def test_detector_reads_the_training_pictures():
    images, scenes = make_dataset(240, seed=11)
    found = [detect(image) for image in images]
    assert all(d.color == s.color for d, s in zip(found, scenes, strict=True))
    assert sum(d.shape == s.shape for d, s in zip(found, scenes, strict=True)) >= 0.98 * 240


def test_detector_sees_nothing_in_an_empty_picture():
    blank = np.full((64, 64, 3), 240, dtype=np.uint8)
    assert detect(blank).color is None and detect(blank).shape is None


def test_tokenizer_gives_a_rare_identifier_real_tokens(tiny_pipeline):
    tokenizer = tiny_pipeline.tokenizer
    ids = tokenizer("a photo of sks toy").input_ids
    class_ids = tokenizer("a photo of a toy").input_ids
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert ids != class_ids and ids[-2] == class_ids[-2]  # same class noun, new identifier
    longest = max((prompt_for(c, s) for c in COLORS for s in SHAPES), key=len)
    assert len(tokenizer(longest).input_ids) <= MAX_LENGTH


def test_random_pipeline_saves_and_loads_offline(tiny_pipeline_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check_pipeline_dir(tiny_pipeline_dir)
    pipe = load_base_pipeline(tiny_pipeline_dir, device="cpu")
    image = pipe(
        "a photo of a red toy",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)


def test_pipeline_dir_check_names_what_is_missing(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match=r"unet.*make base-model"):
        check_pipeline_dir(tmp_path)


def test_build_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unet_batch_size"):
        BuildConfig(unet_batch_size=0)


@pytest.mark.slow
def test_build_is_deterministic_and_atomic(tmp_path):
    config = BuildConfig(
        dataset_size=48,
        vae_steps=2,
        unet_steps=2,
        vae_batch_size=4,
        unet_batch_size=4,
        eval_per_prompt=0,
    )
    first = build_base_model(tmp_path / "a", config)
    second = build_base_model(tmp_path / "b", config)
    assert first["weights_sha256"] == second["weights_sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no staging left over
    check_pipeline_dir(tmp_path / "a")
    info = read_build_info(tmp_path / "a")
    assert info["config"]["unet_steps"] == 2 and info["vae_scaling_factor"] > 0
    assert info["weights_bytes"] == weights_bytes(tmp_path / "a") > 0


def test_committed_weights_are_the_recorded_build():
    info = read_build_info(DEFAULT_BASE_MODEL)
    assert info is not None, "assets/tiny-sd-shapes/build_info.json is missing"
    for name, digest in info["weights_sha256"].items():
        path = DEFAULT_BASE_MODEL / name
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, name
    size = sum(p.stat().st_size for p in DEFAULT_BASE_MODEL.rglob("*") if p.is_file())
    assert size < 30 * 2**20
    assert info["weights_bytes"] == weights_bytes(DEFAULT_BASE_MODEL)


def test_base_pipeline_check_loads_and_describes_the_model(tiny_pipeline_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = check_base_pipeline(tiny_pipeline_dir, device="cpu")
    assert loaded.check.ok, loaded.check
    assert loaded.check.name == "base model load"
    assert f"{tiny_pipeline_dir} on cpu (float32, 64 px)" in loaded.check.detail
    assert sample_size(loaded.pipe) == 64
    assert loaded.info is None and not is_shapes_model(tiny_pipeline_dir)  # no build report
    assert is_shapes_model(DEFAULT_BASE_MODEL)


def test_base_pipeline_check_fails_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "model_index.json").write_text("{}")
    loaded = check_base_pipeline(tmp_path, device="cpu")
    assert not loaded.check.ok and loaded.pipe is None
    assert "lacks" in loaded.check.detail and "make base-model" in loaded.check.fix
    hub = check_base_pipeline("no-such-org/no-such-model", device="cpu")
    assert not hub.check.ok and "Hugging Face hub" in hub.check.fix


@pytest.mark.slow
def test_committed_base_model_follows_prompts():
    """The base model draws the colour and the shape its prompt names, and a toy's parts, far
    above chance."""
    pipe = load_base_pipeline(DEFAULT_BASE_MODEL, device="cpu")
    report = evaluate_pipeline(pipe, per_prompt=2, seed=99)
    print(json.dumps({k: v for k, v in vars(report).items() if k != "per_prompt"}))
    assert report.color_accuracy >= 0.9, report.summary()
    assert report.shape_accuracy >= 0.9, report.summary()
    parts = evaluate_parts(pipe, per_prompt=2, seed=99)
    print(parts.summary())
    assert min(parts.color, parts.accent, parts.pattern) >= 0.85, parts.summary()
    assert parts.accuracy >= 0.8, parts.summary()
