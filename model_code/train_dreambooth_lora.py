"""DreamBooth with LoRA for a Stable-Diffusion-architecture model: the training entry script.

A user's few photos of one subject teach the base model a rare identifier ("a photo of sks
toy"). Only small LoRA matrices on the UNet's attention projections (and, optionally, on the
text encoder's) are trained; the result is `pytorch_lora_weights.safetensors` in the diffusers
format, which `StableDiffusionPipeline.load_lora_weights` reads.

The same file runs unchanged as a local subprocess and as the `sagemaker_program` of a
SageMaker (Hugging Face PyTorch) training job, so it imports only torch, diffusers,
transformers, peft, numpy, PIL, safetensors, the standard library and `hyperparameters.py`
beside it (each hyperparameter's type, bounds and default, and the combinations refused: the
rules the workshop also checks a training request with before a job starts; the job's source
directory is all of `model_code/`, and `python train_dreambooth_lora.py` finds the file on its
own folder's path). It follows SageMaker's script-mode contract with local defaults:

- `--output_dir` defaults to `$SM_MODEL_DIR` (packed into model.tar.gz), else `model`;
- `--instance_data_dir` to `$SM_CHANNEL_INSTANCE` (else `$SM_CHANNEL_TRAINING`);
- `--pretrained_model_name_or_path` to `$SM_CHANNEL_BASE_MODEL` (a model channel);
- `--class_data_dir` to `$SM_CHANNEL_CLASS`, else a temporary directory;
- `--validation_output_dir` to `$SM_OUTPUT_DATA_DIR` (output.tar.gz), else `--output_dir`;
- hyperparameters arrive as `--name value` strings, booleans as "True"/"False": every boolean
  flag accepts `--flag`, `--flag True` and `--flag false`;
- on failure the reason is written to `$SM_OUTPUT_DIR/failure`, where SageMaker reads it.

Mixed precision: `fp16` needs CUDA. Without CUDA it falls back to full precision with a
logged note (the same hyperparameters serve a GPU training job and a CPU laptop), and
`training_summary.json` records the precision actually used. Under `fp16`/`bf16` the frozen
weights are cast to that type and the LoRA parameters stay in float32.

Checkpoints (`--checkpointing_steps`) go to `--checkpoints_dir` (default: `--output_dir`). On
SageMaker pass `--checkpoints_dir /opt/ml/checkpoints` with the estimator's checkpoint_s3_uri,
so they survive a spot interruption and stay out of model.tar.gz.

Example:

    python model_code/train_dreambooth_lora.py \\
        --pretrained_model_name_or_path assets/tiny-sd-shapes \\
        --instance_data_dir photos/ --output_dir out/ --max_train_steps 300
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import diffusers
import hyperparameters  # model_code/hyperparameters.py, beside this file: the rules
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params, compute_snr
from diffusers.utils import convert_state_dict_to_diffusers
from peft import (
    LoraConfig,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTokenizer

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
SUMMARY_NAME = "training_summary.json"
VALIDATION_FOLDER = "validation"
CHECKPOINT_PREFIX = "checkpoint-"
UNET_LORA_TARGETS = {
    # every attention projection, as the diffusers DreamBooth-LoRA example does
    "attention": ["to_k", "to_q", "to_v", "to_out.0"],
    # only the cross-attention ones, where the prompt enters the UNet
    "cross_attention": r".*attn2\.(to_k|to_q|to_v|to_out\.0)",
}
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# Checkpoint files: LoRA states in peft's own key format, so resuming needs no conversion.
_UNET_STATE, _TEXT_ENCODER_STATE, _TRAINING_STATE = (
    "unet_lora.safetensors",
    "text_encoder_lora.safetensors",
    "training_state.pt",
)


def log(message: str) -> None:
    """The training log is stdout, flushed at once so a job's log streams as it runs."""
    print(message, flush=True)


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def _option(group, name: str, rule: hyperparameters.Hyperparameter) -> None:
    """The option `--name` of one hyperparameter: its type, bounds, default and help all come
    from `hyperparameters.HYPERPARAMETERS`. A boolean takes `--name`, `--name True|False`."""

    def parse(text: str):
        try:
            return rule.parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = rule.kind  # argparse names the type in some of its messages
    options = {"nargs": "?", "const": True} if rule.kind == hyperparameters.BOOLEAN else {}
    group.add_argument(
        f"--{name}",
        type=parse,
        default=rule.default,
        choices=rule.choices,
        help=f"{rule.help} Allowed: {rule.allowed()}.",
        **options,
    )


def _env(*names: str) -> str | None:
    """The first of the environment variables `names` that is set and non-empty."""
    return next((os.environ[name] for name in names if os.environ.get(name)), None)


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the hyperparameters; a bad value or combination exits naming the flag.

    Every hyperparameter's type, bounds and default, and the combinations refused, are those of
    `hyperparameters.py` (beside this file), which the workshop also checks requests with.
    """
    parser = argparse.ArgumentParser(
        description="DreamBooth-LoRA fine-tuning of a Stable-Diffusion-architecture model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    paths = parser.add_argument_group("paths (defaults follow SageMaker's SM_* variables)")
    paths.add_argument(
        "--pretrained_model_name_or_path",
        default=_env("SM_CHANNEL_BASE_MODEL"),
        help="Base pipeline: a diffusers directory or a hub model id.",
    )
    paths.add_argument(
        "--instance_data_dir",
        default=_env("SM_CHANNEL_INSTANCE", "SM_CHANNEL_TRAINING"),
        help="Directory of the subject's photos (every file is read).",
    )
    paths.add_argument(
        "--class_data_dir",
        default=_env("SM_CHANNEL_CLASS"),
        help="Class images for prior preservation; missing ones are generated "
        "into it (default: a temporary directory).",
    )
    paths.add_argument(
        "--output_dir",
        default=os.environ.get("SM_MODEL_DIR", "model"),
        help="Where the LoRA weights and training_summary.json are saved.",
    )
    paths.add_argument(
        "--validation_output_dir",
        default=_env("SM_OUTPUT_DATA_DIR"),
        help="Validation images go to <this>/validation/<i>.png, with a copy "
        "in <output_dir>/validation (default: --output_dir).",
    )
    paths.add_argument(
        "--checkpoints_dir",
        default=None,
        help="Where checkpoint-<step> directories go (default: --output_dir).",
    )

    groups = {name: parser.add_argument_group(name) for name in hyperparameters.GROUPS}
    for name, rule in hyperparameters.HYPERPARAMETERS.items():
        _option(groups[rule.group], name, rule)
    groups["checkpoints"].add_argument(
        "--resume_from_checkpoint",
        default=None,
        help="'latest' (starts fresh when there is none) or a checkpoint directory.",
    )

    args = parser.parse_args(input_args)
    _check_args(parser, args)
    return args


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject missing paths and flag combinations that cannot work, naming the flags."""
    if not args.pretrained_model_name_or_path:
        parser.error("--pretrained_model_name_or_path is required (or set SM_CHANNEL_BASE_MODEL)")
    if not args.instance_data_dir:
        parser.error("--instance_data_dir is required (or set SM_CHANNEL_INSTANCE)")
    given = {
        name: getattr(args, name)
        for name in hyperparameters.HYPERPARAMETERS
        if getattr(args, name) is not None
    }
    try:
        hyperparameters.check(given, flags=True)
    except ValueError as error:
        parser.error(str(error))
    if args.validation_prompt is None:
        args.validation_prompt = args.instance_prompt


# --------------------------------------------------------------------------------------------
# Phase 1: models
# --------------------------------------------------------------------------------------------


@dataclass
class Models:
    """The base pipeline's components, loaded one by one (no safety checker, no extras)."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    scheduler_config: dict


@dataclass
class Precision:
    """Where training runs and in which precision."""

    device: torch.device
    mixed_precision: str  # the precision actually used ("no", "fp16" or "bf16")
    weight_dtype: torch.dtype  # of the frozen weights; LoRA parameters stay float32

    def autocast(self):
        """Autocast for forward passes under mixed precision; a no-op otherwise."""
        if self.mixed_precision == "no":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.weight_dtype)


def resolve_precision(mixed_precision: str) -> Precision:
    """CUDA when available; fp16 without CUDA falls back to full precision, with a note."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if mixed_precision == "fp16" and device.type != "cuda":
        log("Note: --mixed_precision fp16 needs CUDA; training in full precision (float32).")
        mixed_precision = "no"
    if mixed_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        log("Note: this GPU does not support bf16; training in full precision (float32).")
        mixed_precision = "no"
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]
    return Precision(device, mixed_precision, dtype)


def load_models(args: argparse.Namespace, precision: Precision) -> Models:
    """Load the base model's components, frozen, on the device in the frozen weights' dtype."""
    path, dtype = args.pretrained_model_name_or_path, precision.weight_dtype
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder").to(dtype=dtype)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
    # The pipeline stores its inference scheduler; the training noise follows the same
    # schedule (betas, prediction type) through DDPM.
    scheduler_config = DDPMScheduler.load_config(path, subfolder="scheduler")
    noise_scheduler = DDPMScheduler.from_config(scheduler_config)
    for model in (text_encoder, vae, unet):
        model.requires_grad_(False)
        model.to(precision.device)
    vae.eval()
    return Models(tokenizer, text_encoder, vae, unet, noise_scheduler, dict(scheduler_config))


def build_pipeline(models: Models) -> StableDiffusionPipeline:
    """An inference pipeline over the (possibly LoRA-adapted) components in memory."""
    pipe = StableDiffusionPipeline(
        vae=models.vae,
        text_encoder=models.text_encoder,
        tokenizer=models.tokenizer,
        unet=models.unet,
        scheduler=DPMSolverMultistepScheduler.from_config(models.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def add_lora_adapters(args: argparse.Namespace, models: Models) -> list[torch.nn.Parameter]:
    """Add LoRA to the UNet's attention (and the text encoder's); return the trainable params.

    The text encoder gets its adapter through `peft.inject_adapter_in_model`: transformers
    5's `add_adapter` demands a newer peft than the one pinned, and the result saves and
    loads the same way.
    """
    lora = {"r": args.rank, "lora_alpha": args.rank, "init_lora_weights": "gaussian"}
    models.unet.add_adapter(LoraConfig(**lora, target_modules=UNET_LORA_TARGETS[args.lora_layers]))
    trained: list[torch.nn.Module] = [models.unet]
    if args.train_text_encoder:
        config = LoraConfig(**lora, target_modules=TEXT_ENCODER_LORA_TARGETS)
        models.text_encoder = inject_adapter_in_model(config, models.text_encoder)
        trained.append(models.text_encoder)
    # LoRA parameters train in float32 even when the frozen weights are half precision.
    cast_training_params(trained, dtype=torch.float32)
    if args.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            _enable_text_encoder_checkpointing(models.text_encoder)

    parameters = []
    for module in (models.unet, models.text_encoder, models.vae):
        for name, parameter in module.named_parameters():
            if parameter.requires_grad:
                if "lora_" not in name:
                    raise RuntimeError(f"{name} requires grad but is not a LoRA parameter")
                parameters.append(parameter)
    if not parameters:
        raise RuntimeError("no LoRA parameters to train")
    return parameters


def _enable_text_encoder_checkpointing(text_encoder: CLIPTextModel) -> None:
    """Non-reentrant checkpointing, so gradients reach LoRA inside frozen layers.

    transformers 5 renamed `gradient_checkpointing_enable`; older containers have only that.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(text_encoder, "activation_checkpointing_enable"):
        text_encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# --------------------------------------------------------------------------------------------
# Phase 2: data
# --------------------------------------------------------------------------------------------


def load_images(directory: str | Path, what: str, limit: int | None = None) -> list[Image.Image]:
    """Every file in `directory` (sorted, hidden files skipped) as an RGB image."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{what} image directory {str(directory)!r} does not exist")
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
    images = []
    for path in files[:limit]:
        try:
            with Image.open(path) as image:
                images.append(ImageOps.exif_transpose(image).convert("RGB"))
        except (UnidentifiedImageError, OSError) as error:
            message = f"{what} file {str(path)!r} is not a readable image: {error}"
            raise ValueError(message) from None
    if not images:
        raise ValueError(f"no {what} images in {str(directory)!r}")
    return images


def image_to_tensor(image: Image.Image, size: int, flip: bool = False) -> torch.Tensor:
    """Resize the shorter side to `size`, centre-crop, optionally flip; CHW in [-1, 1]."""
    width, height = image.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    image = image.resize(new_size, Image.Resampling.BICUBIC)
    left, top = (new_size[0] - size) // 2, (new_size[1] - size) // 2
    image = image.crop((left, top, left + size, top + size))
    if flip:
        image = ImageOps.mirror(image)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def image_variants(images: list[Image.Image], size: int, random_flip: bool) -> list[torch.Tensor]:
    """Per image, a (V, 3, size, size) stack of its training views: as is (and mirrored)."""
    flips = (False, True) if random_flip else (False,)
    return [torch.stack([image_to_tensor(im, size, flip) for flip in flips]) for im in images]


class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance examples (and class examples for the prior), each drawn as a random view.

    An example is a stack of views of one image: pixels, or the VAE's cached latent
    distribution (mean and std along the channels). Everything it needs is passed in.

    Args:
        instance_examples (`list[torch.Tensor]`): one (V, C, H, W) stack per instance image.
        class_examples (`list[torch.Tensor]`, *optional*): the same for class images.
    """

    def __init__(
        self,
        instance_examples: list[torch.Tensor],
        class_examples: list[torch.Tensor] | None = None,
    ) -> None:
        self.instance_examples = instance_examples
        self.class_examples = class_examples or []
        self.length = max(len(self.instance_examples), len(self.class_examples))

    def __len__(self) -> int:
        return self.length

    @staticmethod
    def _view(views: torch.Tensor) -> torch.Tensor:
        return views[torch.randint(len(views), ()).item()]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        instances, classes = self.instance_examples, self.class_examples
        example = {"instance": self._view(instances[index % len(instances)])}
        if classes:
            example["class"] = self._view(classes[index % len(classes)])
        return example


@torch.no_grad()
def encode_latent_distributions(
    vae: AutoencoderKL, examples: list[torch.Tensor], precision: Precision
) -> list[torch.Tensor]:
    """Cache each view's latent distribution as (mean, std) stacked along the channels."""
    cached = []
    for views in examples:
        pixels = views.to(precision.device, dtype=precision.weight_dtype)
        distribution = vae.encode(pixels).latent_dist
        cached.append(torch.cat([distribution.mean, distribution.std], dim=1).float().cpu())
    return cached


def generate_class_images(
    args: argparse.Namespace, models: Models, precision: Precision, class_dir: Path
) -> None:
    """Fill `class_dir` up to --num_class_images with the base model's own class pictures."""
    class_dir.mkdir(parents=True, exist_ok=True)
    existing = [p for p in class_dir.iterdir() if p.is_file() and not p.name.startswith(".")]
    missing = args.num_class_images - len(existing)
    if missing <= 0:
        return
    log(f"Generating {missing} class images for {args.class_prompt!r} into {class_dir}")
    pipe = build_pipeline(models)
    generator = torch.Generator(device=precision.device).manual_seed(args.seed + 1)
    index = 0
    while missing > 0:
        count = min(missing, args.sample_batch_size)
        with torch.no_grad(), precision.autocast():
            images = pipe(
                args.class_prompt,
                num_images_per_prompt=count,
                num_inference_steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale,
                height=args.resolution,
                width=args.resolution,
                generator=generator,
            ).images
        for image in images:
            while (class_dir / f"class-{index:05d}.png").exists():
                index += 1
            image.save(class_dir / f"class-{index:05d}.png")
        missing -= count


def load_data(args: argparse.Namespace, models: Models, precision: Precision) -> DreamBoothDataset:
    """Instance images (and class images, generated if missing) as a training dataset."""
    instance_images = load_images(args.instance_data_dir, "instance")
    class_images = []
    if args.with_prior_preservation:
        with contextlib.ExitStack() as stack:
            if args.class_data_dir:
                class_dir = Path(args.class_data_dir)
            else:
                class_dir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            generate_class_images(args, models, precision, class_dir)
            class_images = load_images(class_dir, "class", limit=args.num_class_images)
    instance_examples = image_variants(instance_images, args.resolution, args.random_flip)
    class_examples = image_variants(class_images, args.resolution, args.random_flip)
    if args.cache_latents:
        instance_examples = encode_latent_distributions(models.vae, instance_examples, precision)
        class_examples = encode_latent_distributions(models.vae, class_examples, precision)
    return DreamBoothDataset(instance_examples, class_examples)


@torch.no_grad()
def encode_prompt(models: Models, prompt: str, precision: Precision) -> torch.Tensor:
    """The text encoder's last hidden state for `prompt` (1, length, width), frozen."""
    return models.text_encoder(tokenize(models.tokenizer, prompt, precision.device))[0]


def tokenize(tokenizer: CLIPTokenizer, prompt: str, device: torch.device) -> torch.Tensor:
    """Token ids (1, model_max_length), padded and truncated as Stable Diffusion does."""
    return tokenizer(
        prompt,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


# --------------------------------------------------------------------------------------------
# Phase 3: the training loop, with checkpoints
# --------------------------------------------------------------------------------------------


@dataclass
class TrainingState:
    """What a checkpoint restores besides the LoRA weights and the optimizer."""

    global_step: int = 0
    loss_history: list[float] | None = None
    resumed_from: str | None = None

    def __post_init__(self) -> None:
        self.loss_history = self.loss_history or []


def _checkpoint_steps(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of the `checkpoint-<step>` directories in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_checkpoint(
    args: argparse.Namespace,
    checkpoints_dir: Path,
    models: Models,
    optimizer,
    lr_scheduler,
    scaler,
    state: TrainingState,
) -> Path:
    """Save `checkpoint-<step>` (written aside, then renamed), pruning the oldest first."""
    existing = _checkpoint_steps(checkpoints_dir)
    if args.checkpoints_total_limit is not None:
        for _, old in existing[: max(0, len(existing) - args.checkpoints_total_limit + 1)]:
            log(f"Removing old checkpoint {old}")
            shutil.rmtree(old)
    final = checkpoints_dir / f"{CHECKPOINT_PREFIX}{state.global_step}"
    staging = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=checkpoints_dir))
    save_file(get_peft_model_state_dict(models.unet), staging / _UNET_STATE)
    if args.train_text_encoder:
        save_file(get_peft_model_state_dict(models.text_encoder), staging / _TEXT_ENCODER_STATE)
    torch.save(
        {
            "global_step": state.global_step,
            "loss_history": state.loss_history,
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        staging / _TRAINING_STATE,
    )
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    log(f"Saved checkpoint {final}")
    return final


def find_checkpoint(args: argparse.Namespace, checkpoints_dir: Path) -> Path | None:
    """The checkpoint --resume_from_checkpoint names; None for 'latest' when there is none."""
    if args.resume_from_checkpoint == "latest":
        found = _checkpoint_steps(checkpoints_dir)
        if not found:
            log(f"No checkpoint in {checkpoints_dir}; starting a new training run.")
            return None
        return found[-1][1]
    path = Path(args.resume_from_checkpoint)
    if not path.is_dir() and (checkpoints_dir / path).is_dir():
        path = checkpoints_dir / path
    if not (path / _TRAINING_STATE).is_file():
        raise ValueError(
            f"--resume_from_checkpoint {args.resume_from_checkpoint!r} is not a "
            f"checkpoint directory (no {_TRAINING_STATE})"
        )
    return path


def load_checkpoint(
    path: Path, args: argparse.Namespace, models: Models, optimizer, lr_scheduler, scaler
) -> TrainingState:
    """Restore LoRA weights, optimizer, schedule, scaler and RNG from `path`."""
    device = models.unet.device
    for module, name in ((models.unet, _UNET_STATE), (models.text_encoder, _TEXT_ENCODER_STATE)):
        if module is models.text_encoder and not args.train_text_encoder:
            continue
        result = set_peft_model_state_dict(module, load_file(path / name, device=str(device)))
        if result.unexpected_keys:
            raise ValueError(
                f"checkpoint {path} does not match the model: "
                f"unexpected keys {result.unexpected_keys[:3]}"
            )
    saved = torch.load(path / _TRAINING_STATE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    lr_scheduler.load_state_dict(saved["lr_scheduler"])
    scaler.load_state_dict(saved["scaler"])
    torch.set_rng_state(saved["torch_rng"])
    if saved["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    log(f"Resumed from checkpoint {path} at step {saved['global_step']}")
    return TrainingState(saved["global_step"], list(saved["loss_history"]), str(path))


def _forever(loader: torch.utils.data.DataLoader):
    """Batches from `loader`, epoch after epoch."""
    while True:
        yield from loader


def train(
    args: argparse.Namespace,
    models: Models,
    precision: Precision,
    dataset: DreamBoothDataset,
    parameters: list[torch.nn.Parameter],
    checkpoints_dir: Path,
) -> TrainingState:
    """The DreamBooth loss on LoRA parameters for --max_train_steps optimizer steps."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.train_batch_size, shuffle=True, drop_last=False
    )
    optimizer = torch.optim.AdamW(
        parameters, lr=args.learning_rate, weight_decay=args.adam_weight_decay
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=args.max_train_steps,
    )
    scaler = torch.amp.GradScaler(
        precision.device.type, enabled=precision.mixed_precision == "fp16"
    )
    state = TrainingState()
    if args.resume_from_checkpoint:
        checkpoint = find_checkpoint(args, checkpoints_dir)
        if checkpoint is not None:
            state = load_checkpoint(checkpoint, args, models, optimizer, lr_scheduler, scaler)

    # Text conditioning: token ids when the text encoder trains, else fixed embeddings.
    prompts = [args.instance_prompt] + ([args.class_prompt] if dataset.class_examples else [])
    if args.train_text_encoder:
        conditioning = [tokenize(models.tokenizer, p, precision.device) for p in prompts]
    else:
        conditioning = [encode_prompt(models, p, precision) for p in prompts]

    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    log("***** Running training *****")
    log(f"  Base model = {args.pretrained_model_name_or_path}")
    log(f"  Instance prompt = {args.instance_prompt!r}; class prompt = {args.class_prompt!r}")
    log(f"  Num instance images = {len(dataset.instance_examples)}")
    log(f"  Num class images = {len(dataset.class_examples)}")
    log(f"  Num batches each epoch = {len(loader)}")
    log(f"  Num epochs = {math.ceil(args.max_train_steps / steps_per_epoch)}")
    log(
        f"  Batch size = {args.train_batch_size} x {args.gradient_accumulation_steps} "
        "accumulation steps"
    )
    log(f"  Total optimization steps = {args.max_train_steps} (starting at {state.global_step})")
    log(
        f"  Trainable LoRA parameters = {sum(p.numel() for p in parameters):,} "
        f"(rank {args.rank}, text encoder {'on' if args.train_text_encoder else 'off'})"
    )
    log(f"  Learning rate = {args.learning_rate} ({args.lr_scheduler})")
    log(f"  Device = {precision.device}; mixed precision = {precision.mixed_precision}")

    models.unet.train()
    if args.train_text_encoder:
        models.text_encoder.train()
    batches = _forever(loader)
    started = time.perf_counter()
    while state.global_step < args.max_train_steps:
        step_losses = []
        for _ in range(args.gradient_accumulation_steps):
            loss = batch_loss(args, models, precision, next(batches), conditioning)
            if not torch.isfinite(loss):
                raise RuntimeError(
                    f"loss became {loss.item()} at step {state.global_step + 1}; "
                    "lower --learning_rate or use --mixed_precision no"
                )
            scaler.scale(loss / args.gradient_accumulation_steps).backward()
            step_losses.append(loss.item())
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parameters, args.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        state.global_step += 1
        state.loss_history.append(round(sum(step_losses) / len(step_losses), 6))
        log(
            f"step={state.global_step} loss={state.loss_history[-1]:.6f} "
            f"lr={lr_scheduler.get_last_lr()[0]:.6f} "
            f"seconds={time.perf_counter() - started:.1f}"
        )
        if args.checkpointing_steps and state.global_step % args.checkpointing_steps == 0:
            save_checkpoint(args, checkpoints_dir, models, optimizer, lr_scheduler, scaler, state)
    models.unet.eval()
    models.text_encoder.eval()
    return state


def batch_loss(
    args: argparse.Namespace,
    models: Models,
    precision: Precision,
    batch: dict[str, torch.Tensor],
    conditioning: list[torch.Tensor],
) -> torch.Tensor:
    """The denoising loss on one batch: noise the latents at random timesteps, predict.

    With prior preservation the class examples ride in the same batch, after the instances.
    """
    examples = [batch["instance"]] + ([batch["class"]] if "class" in batch else [])
    batch_size = len(batch["instance"])
    scheduler = models.noise_scheduler
    with precision.autocast():
        latents = _sample_latents(args, models, precision, torch.cat(examples))
        latents = latents * models.vae.config.scaling_factor
        if args.train_text_encoder:
            states = [models.text_encoder(ids)[0] for ids in conditioning]
        else:
            states = conditioning
        encoder_hidden_states = torch.cat([s.expand(batch_size, -1, -1) for s in states])
        noise = torch.randn_like(latents)
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (len(latents),), device=latents.device
        )
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = models.unet(noisy, timesteps, encoder_hidden_states).sample
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unknown prediction type {scheduler.config.prediction_type!r}")
    weights = _snr_weights(args, scheduler, timesteps)
    return _dreambooth_loss(args, prediction.float(), target.float(), weights, len(examples))


def _snr_weights(
    args: argparse.Namespace, scheduler: DDPMScheduler, timesteps: torch.Tensor
) -> torch.Tensor | None:
    """Min-SNR-gamma weight per example (None with --snr_gamma 0), as the diffusers examples
    compute it: min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v-prediction."""
    if not args.snr_gamma:
        return None
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=args.snr_gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def _sample_latents(
    args: argparse.Namespace, models: Models, precision: Precision, examples: torch.Tensor
) -> torch.Tensor:
    """Each example's latent (the posterior mean, or a sample with --sample_latents), from the
    cached distribution or by encoding the pixels."""
    examples = examples.to(precision.device)
    if args.cache_latents:
        mean, std = examples.chunk(2, dim=1)
        if args.sample_latents:
            mean = mean + std * torch.randn_like(std)
        return mean.to(precision.weight_dtype)
    with torch.no_grad():
        distribution = models.vae.encode(examples.to(precision.weight_dtype)).latent_dist
        return distribution.sample() if args.sample_latents else distribution.mode()


def _dreambooth_loss(
    args: argparse.Namespace,
    prediction: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None,
    groups: int,
) -> torch.Tensor:
    """MSE on the instance half, plus the weighted prior loss on the class half if present;
    each example's MSE scaled by its Min-SNR weight when there are weights."""
    per_example = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
    if weights is not None:
        per_example = per_example * weights.float()
    if groups == 1:
        return per_example.mean()
    instance, prior = per_example.chunk(2)
    return instance.mean() + args.prior_loss_weight * prior.mean()


# --------------------------------------------------------------------------------------------
# Phase 4: save; phase 5: validate
# --------------------------------------------------------------------------------------------


def save_lora_weights(args: argparse.Namespace, models: Models, output_dir: Path) -> Path:
    """Write `pytorch_lora_weights.safetensors` in the diffusers format, atomically."""
    unet_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(models.unet))
    text_layers, text_metadata = None, None
    if args.train_text_encoder:
        state = get_peft_model_state_dict(models.text_encoder)
        text_layers = convert_state_dict_to_diffusers(state)
        text_metadata = models.text_encoder.peft_config["default"].to_dict()
    final = output_dir / WEIGHTS_NAME
    staging = Path(tempfile.mkdtemp(prefix=".lora-", dir=output_dir))
    try:
        StableDiffusionPipeline.save_lora_weights(
            staging,
            unet_lora_layers=unet_layers,
            text_encoder_lora_layers=text_layers,
            unet_lora_adapter_metadata=models.unet.peft_config["default"].to_dict(),
            text_encoder_lora_adapter_metadata=text_metadata,
            weight_name=WEIGHTS_NAME,
            safe_serialization=True,
        )
        os.replace(staging / WEIGHTS_NAME, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"Saved LoRA weights to {final} ({final.stat().st_size / 1e6:.2f} MB)")
    return final


def run_validation(
    args: argparse.Namespace, models: Models, precision: Precision, output_dir: Path
) -> list[Path]:
    """Draw --num_validation_images for --validation_prompt with the fine-tuned model."""
    if not args.num_validation_images:
        return []
    log(f"Running validation: {args.num_validation_images} images of {args.validation_prompt!r}")
    pipe = build_pipeline(models)
    generator = torch.Generator(device=precision.device).manual_seed(args.seed)
    with torch.no_grad(), precision.autocast():
        images = pipe(
            args.validation_prompt,
            num_images_per_prompt=args.num_validation_images,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            height=args.resolution,
            width=args.resolution,
            generator=generator,
        ).images
    folders = [output_dir / VALIDATION_FOLDER]
    if args.validation_output_dir:
        extra = Path(args.validation_output_dir) / VALIDATION_FOLDER
        if extra.resolve() != folders[0].resolve():
            folders.insert(0, extra)
    saved = []
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(images):
            image.save(folder / f"{index}.png")
            saved.append(folder / f"{index}.png")
    log(f"Saved validation images to {', '.join(str(f) for f in folders)}")
    return saved


def write_summary(path: Path, summary: dict) -> None:
    """Write `summary` as JSON, atomically."""
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(summary, indent=2))
    os.replace(staging, path)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> dict:
    """Run the phases: models, data, class images, training, save, validation, summary.

    Returns the training summary (also saved as `training_summary.json` in --output_dir).
    """
    try:
        return _run(args)
    except Exception as error:
        _write_failure_reason(error)
        raise


def _run(args: argparse.Namespace) -> dict:
    begun = time.perf_counter()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoints_dir = Path(args.checkpoints_dir) if args.checkpoints_dir else output_dir
    checkpoints_dir.mkdir(parents=True, exist_ok=True)

    # Phase 1: models.
    precision = resolve_precision(args.mixed_precision)
    models = load_models(args, precision)

    # Phase 2: data, with class images from the base model before any LoRA is added.
    dataset = load_data(args, models, precision)

    # Phase 3: LoRA and the training loop.
    parameters = add_lora_adapters(args, models)
    train_begun = time.perf_counter()
    state = train(args, models, precision, dataset, parameters, checkpoints_dir)
    train_seconds = time.perf_counter() - train_begun

    # Phase 4: save. Phase 5: validate.
    save_lora_weights(args, models, output_dir)
    validation_images = run_validation(args, models, precision, output_dir)

    recent = state.loss_history[-10:]
    summary = {
        "base_model": args.pretrained_model_name_or_path,
        "instance_prompt": args.instance_prompt,
        "class_prompt": args.class_prompt,
        "hyperparameters": vars(args),
        "steps": state.global_step,
        "final_loss": round(sum(recent) / len(recent), 6) if recent else None,
        "loss_history": state.loss_history,
        "resumed_from": state.resumed_from,
        "num_instance_images": len(dataset.instance_examples),
        "num_class_images": len(dataset.class_examples),
        "trainable_parameters": sum(p.numel() for p in parameters),
        "train_seconds": round(train_seconds, 3),
        "seconds": round(time.perf_counter() - begun, 3),
        "device": str(precision.device),
        "mixed_precision": precision.mixed_precision,
        "weights": WEIGHTS_NAME,
        "validation_images": [
            str(p.relative_to(output_dir))
            for p in validation_images
            if p.is_relative_to(output_dir)
        ],
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "peft": _version("peft"),
        },
    }
    write_summary(output_dir / SUMMARY_NAME, summary)
    log(
        f"Training done: {state.global_step} steps, final loss {summary['final_loss']:.6f}, "
        f"{summary['seconds']:.1f} s"
    )
    return summary


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _write_failure_reason(error: Exception) -> None:
    """SageMaker shows `$SM_OUTPUT_DIR/failure` as the job's FailureReason."""
    output_dir = os.environ.get("SM_OUTPUT_DIR")
    if output_dir:
        with contextlib.suppress(OSError):
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            Path(output_dir, "failure").write_text(f"{type(error).__name__}: {error}"[:1024])


if __name__ == "__main__":
    main(parse_args())
