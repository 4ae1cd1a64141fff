"""Build the workshop's base model from nothing: draw the data, train the VAE, then the denoiser.

Deterministic: the same seed, torch version and thread count give the same weights. The result
is a diffusers pipeline directory that ``StableDiffusionPipeline.from_pretrained`` loads offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from tqdm.auto import tqdm

from helpers.workshop.basemodel.architecture import (
    assemble,
    make_noise_scheduler,
    make_text_encoder,
    make_unet,
    make_vae,
)
from helpers.workshop.basemodel.drawing import (
    HELD_OUT_TOYS,
    caption,
    caption_vocabulary,
    make_dataset,
)
from helpers.workshop.basemodel.loading import BUILD_INFO, weights_bytes
from helpers.workshop.basemodel.parts import evaluate_parts
from helpers.workshop.basemodel.prompt_following import evaluate_pipeline
from helpers.workshop.basemodel.tokenizer import build_tokenizer


@dataclass(frozen=True)
class BuildConfig:
    """Hyperparameters of the base model build (the defaults made the committed weights).

    Args:
        seed (`int`, defaults to 0): seeds the drawings, initialisation and batches.
        dataset_size (`int`, defaults to 16000): drawn pictures, half toys with parts and
            half plain shapes (balanced over colours and shapes).
        vae_steps, vae_batch_size, vae_lr: the autoencoder phase.
        unet_steps, unet_batch_size, unet_lr, text_lr: the denoiser phase (UNet and text
            encoder trained together).
        ema_decay (`float`, defaults to 0.999): EMA of the denoiser weights, which are saved.
        snr_gamma (`float`, defaults to 5.0): Min-SNR loss weighting, for faster convergence.
        threads (`int`, defaults to 2): torch CPU threads; fixed because the reduction order,
            and so the last bits of the weights, depend on it.
        eval_per_prompt (`int`, defaults to 4): pictures per prompt in the final evaluation
            (0 skips it).
    """

    seed: int = 0
    dataset_size: int = 16000
    vae_steps: int = 1500
    vae_batch_size: int = 16
    vae_lr: float = 2e-3
    unet_steps: int = 10000
    unet_batch_size: int = 32
    unet_lr: float = 1e-3
    text_lr: float = 5e-4
    ema_decay: float = 0.999
    snr_gamma: float = 5.0
    threads: int = 2
    eval_per_prompt: int = 4

    def __post_init__(self) -> None:
        for name in ("dataset_size", "vae_batch_size", "unet_batch_size", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("vae_steps", "unet_steps", "eval_per_prompt"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC pictures -> float NCHW in [-1, 1], as the VAE expects."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def train_vae(vae, pixels: torch.Tensor, config: BuildConfig, generator: torch.Generator):
    """Train the VAE as an autoencoder (L1 + MSE reconstruction, a light KL term)."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    lr_schedule = get_scheduler(
        "cosine", optimizer, num_warmup_steps=50, num_training_steps=max(config.vae_steps, 1)
    )
    vae.train()
    bar = tqdm(range(config.vae_steps), desc="VAE", unit="step")
    for _ in bar:
        idx = torch.randint(len(pixels), (config.vae_batch_size,), generator=generator)
        batch = pixels[idx]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        loss = F.l1_loss(recon, batch) + F.mse_loss(recon, batch)
        loss = loss + 1e-6 * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    return vae


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Latent means of every picture (cached once: the VAE is frozen from here on)."""
    chunks = [
        vae.encode(pixels[i : i + batch_size]).latent_dist.mean
        for i in range(0, len(pixels), batch_size)
    ]
    return torch.cat(chunks)


@torch.no_grad()
def reconstruction_psnr(vae, pixels: torch.Tensor) -> float:
    """Peak signal-to-noise ratio (dB) of VAE round trips of `pixels` (in [-1, 1])."""
    recon = vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)
    mse = F.mse_loss(recon, pixels).item()
    return 10 * float(np.log10(4.0 / max(mse, 1e-12)))


def train_denoiser(
    unet,
    text_encoder,
    tokenizer,
    latents: torch.Tensor,
    scenes,
    config: BuildConfig,
    generator: torch.Generator,
    rng: np.random.Generator,
):
    """Train the UNet and the text encoder together on (latent, caption) pairs.

    Epsilon prediction with Stable Diffusion's schedule and Min-SNR weighting; the EMA weights
    are copied into the models at the end.
    """
    noise_scheduler = make_noise_scheduler()
    params = [
        {"params": list(unet.parameters()), "lr": config.unet_lr},
        {"params": list(text_encoder.parameters()), "lr": config.text_lr},
    ]
    optimizer = torch.optim.AdamW(params, weight_decay=1e-2)
    lr_schedule = get_scheduler(
        "cosine", optimizer, num_warmup_steps=100, num_training_steps=max(config.unet_steps, 1)
    )
    trained = list(unet.parameters()) + list(text_encoder.parameters())
    ema = EMAModel(trained, decay=config.ema_decay)
    unet.train()
    text_encoder.train()
    bar = tqdm(range(config.unet_steps), desc="UNet + text encoder", unit="step")
    for _ in bar:
        idx = torch.randint(len(latents), (config.unet_batch_size,), generator=generator)
        texts = [caption(scenes[i], rng) for i in idx.tolist()]
        ids = tokenizer(
            texts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        clean = latents[idx]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=generator
        )
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        hidden = text_encoder(ids)[0]
        pred = unet(noisy, timesteps, hidden).sample
        snr = compute_snr(noise_scheduler, timesteps)
        weights = torch.clamp(snr, max=config.snr_gamma) / snr
        loss = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * weights).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(trained)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    ema.copy_to(trained)
    unet.eval()
    text_encoder.eval()
    return unet, text_encoder


def _weights_digest(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*.safetensors"))
    }


def build_base_model(output_dir: str | Path, config: BuildConfig | None = None) -> dict:
    """Build the tiny base pipeline into `output_dir` and return its build report.

    The directory appears whole or not at all: the pipeline is written to a temporary sibling
    and renamed into place, replacing any previous build.

    Args:
        output_dir (`str` or `Path`): where the diffusers pipeline directory goes.
        config (`BuildConfig`, *optional*): hyperparameters; the defaults made the committed
            weights.
    """
    config = config or BuildConfig()
    output_dir = Path(output_dir).resolve()
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(config.seed)
        generator = torch.Generator().manual_seed(config.seed)
        rng = np.random.default_rng(config.seed)
        images, scenes = make_dataset(config.dataset_size, seed=config.seed)
        pixels = _to_tensor(images)
        tokenizer = build_tokenizer(caption_vocabulary())
        vae = train_vae(make_vae(), pixels, config, generator)
        report = {"vae_reconstruction_psnr_db": round(reconstruction_psnr(vae, pixels[:256]), 2)}
        tqdm.write(f"VAE reconstruction PSNR: {report['vae_reconstruction_psnr_db']} dB")
        latents = encode_latents(vae, pixels)
        scaling_factor = float(1.0 / latents.std())
        vae.register_to_config(scaling_factor=scaling_factor)
        unet, text_encoder = train_denoiser(
            make_unet(),
            make_text_encoder(tokenizer),
            tokenizer,
            latents * scaling_factor,
            scenes,
            config,
            generator,
            rng,
        )
        pipe = assemble(vae, text_encoder, tokenizer, unet)
        train_seconds = time.perf_counter() - started
        report |= {
            "config": asdict(config),
            "train_seconds": round(train_seconds, 1),
            "vae_scaling_factor": scaling_factor,
            "torch": torch.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
            "device": "cpu",
            "held_out_toys": sorted(HELD_OUT_TOYS),
        }
        if config.eval_per_prompt:
            report |= _scores(pipe, config.eval_per_prompt)
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(False)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        report["weights_sha256"] = _weights_digest(staging)
        report["weights_bytes"] = weights_bytes(staging)
        (staging / BUILD_INFO).write_text(json.dumps(report, indent=2) + "\n")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return report


def _scores(pipe, per_prompt: int) -> dict:
    """Prompt following over the colour-shape prompts, and over toys' parts."""
    return {
        "prompt_following": asdict(evaluate_pipeline(pipe, per_prompt=per_prompt)),
        "parts": asdict(evaluate_parts(pipe, per_prompt=per_prompt)),
    }


def rescore_base_model(model_dir: str | Path, per_prompt: int = 4) -> dict:
    """Re-measure a built model's prompt following (shapes and parts) in its build report.

    For when the measurement changes, not the weights: it rewrites `build_info.json` only
    (and records the weights' total size, `weights_bytes`, when an older report lacks it).
    """
    from helpers.workshop.basemodel.loading import load_base_pipeline, read_build_info

    model_dir = Path(model_dir)
    report = read_build_info(model_dir) or {}
    report |= _scores(load_base_pipeline(model_dir, device="cpu"), per_prompt)
    report["weights_bytes"] = weights_bytes(model_dir)
    tmp = model_dir / f".{BUILD_INFO}.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(model_dir / BUILD_INFO)
    return report
