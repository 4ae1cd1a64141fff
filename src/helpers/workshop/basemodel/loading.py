"""Load the base pipeline the settings name: the committed tiny model or a hub model id."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers.workshop.environment import CheckResult

BUILD_INFO = "build_info.json"
_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def check_pipeline_dir(path: str | Path) -> Path:
    """`path` as a `Path` if it holds a diffusers Stable Diffusion pipeline, else `ValueError`."""
    path = Path(path)
    missing = [name for name in ("model_index.json", *_COMPONENTS) if not (path / name).exists()]
    if missing:
        raise ValueError(
            f"base model directory {str(path)!r} lacks {missing}: run `make base-model` or "
            "point WORKSHOP_BASE_MODEL at a diffusers pipeline directory"
        )
    return path


def load_base_pipeline(model: str | Path, device: str | None = None, progress: bool = False):
    """A `StableDiffusionPipeline` from a local directory (offline) or a hub id.

    Args:
        model (`str` or `Path`): a pipeline directory, or a model id such as
            `stabilityai/stable-diffusion-2-1-base` where a hub is reachable.
        device (`str`, *optional*): `"cuda"` or `"cpu"`; defaults to CUDA when available.
            On CUDA the weights are loaded in float16.
        progress (`bool`, defaults to `False`): show diffusers' progress bars.
    """
    import torch
    from diffusers import StableDiffusionPipeline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    if Path(model).exists():
        check_pipeline_dir(model)
        # A local directory must never reach for a hub, in tests and in the local default.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionPipeline.from_pretrained(
        str(model), dtype=dtype, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=not progress)
    return pipe.to(device)


def read_build_info(model: str | Path) -> dict | None:
    """The build report saved beside the committed base model, if there is one."""
    path = Path(model) / BUILD_INFO
    return json.loads(path.read_text()) if path.exists() else None


def weights_bytes(model_dir: str | Path) -> int:
    """The total size in bytes of a pipeline directory's weight files (``*.safetensors``)."""
    return sum(path.stat().st_size for path in Path(model_dir).rglob("*.safetensors"))


def is_shapes_model(model: str | Path) -> bool:
    """Whether `model` is a build of the workshop's own tiny model (it has a `build_info.json`),
    so that prompts of its drawn world and its shape detector apply to it."""
    return read_build_info(model) is not None


def sample_size(pipe) -> int:
    """The picture size in pixels that `pipe` was made for (diffusers' default height):
    64 for the tiny model, 512 or 768 for Stable Diffusion checkpoints."""
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


@dataclass
class LoadedBase:
    """What `check_base_pipeline` found.

    Args:
        check (`CheckResult`): the `"base model load"` result, with the fix when it failed.
        pipe (`StableDiffusionPipeline`, *optional*): the loaded pipeline; `None` on failure.
        info (`dict`, *optional*): the build report of the workshop's tiny model.
    """

    check: CheckResult
    pipe: Any = None
    info: dict | None = None


def check_base_pipeline(model: str | Path, device: str | None = None) -> LoadedBase:
    """`load_base_pipeline` as a check: it never raises.

    Args:
        model (`str` or `Path`): a pipeline directory or hub id (`settings.base_model`).
        device (`str`, *optional*): as for `load_base_pipeline`.
    """
    name = "base model load"
    started = time.perf_counter()
    try:
        pipe = load_base_pipeline(model, device=device)
        info = read_build_info(model)
    except Exception as error:
        if Path(model).is_dir():
            fix = (
                "run `make base-model` to rebuild the workshop's tiny model, or point "
                "WORKSHOP_BASE_MODEL (the notebook's base_model parameter) at a complete "
                "diffusers Stable Diffusion pipeline directory"
            )
        else:
            fix = (
                "check the model id and that this machine reaches the Hugging Face hub (with "
                "HF_TOKEN for a gated model), or download the pipeline and point "
                "WORKSHOP_BASE_MODEL at its directory"
            )
        detail = f"{model}: {type(error).__name__}: {error}"
        return LoadedBase(CheckResult(name, False, detail, fix=fix))
    seconds = time.perf_counter() - started
    dtype = str(pipe.unet.dtype).removeprefix("torch.")
    detail = f"{model} on {pipe.device} ({dtype}, {sample_size(pipe)} px) in {seconds:.1f} s"
    if info:
        detail += (
            f"; built in {info['train_seconds'] / 60:.0f} min on {info['machine']} "
            f"(torch {info['torch']}, seed {info['config']['seed']})"
        )
    return LoadedBase(CheckResult(name, True, detail), pipe, info)
