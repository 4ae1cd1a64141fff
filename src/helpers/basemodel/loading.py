"""Load the base pipeline the settings name: the committed tiny model or a hub model id."""

from __future__ import annotations

import json
import os
from pathlib import Path

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
