"""The tiny Stable-Diffusion-architecture pipeline: its component configurations.

Same classes as Stable Diffusion (UNet2DConditionModel, AutoencoderKL, CLIPTextModel and
CLIPTokenizer, a scheduler), scaled down to 64x64 pictures so it trains and runs on a CPU.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from helpers.workshop.basemodel.drawing import RESOLUTION, caption_vocabulary
from helpers.workshop.basemodel.tokenizer import MAX_LENGTH, build_tokenizer

TEXT_WIDTH = 64
# Stable Diffusion's noise schedule, so diffusers' training scripts apply unchanged.
SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
}


def make_vae() -> AutoencoderKL:
    """A 3-level VAE: 64x64x3 pictures <-> 16x16x4 latents."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=RESOLUTION,
    )


def make_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A 2-layer CLIP text transformer sized to the tokenizer."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=TEXT_WIDTH * 4,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=TEXT_WIDTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def make_unet() -> UNet2DConditionModel:
    """A UNet over 16x16x4 latents with cross-attention to the text at two resolutions."""
    return UNet2DConditionModel(
        sample_size=RESOLUTION // 4,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def make_noise_scheduler() -> DDPMScheduler:
    """The scheduler that adds noise during training."""
    return DDPMScheduler(**SCHEDULE)


def make_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A randomly initialised pipeline (deterministic for a given `seed`).

    It draws noise, not pictures: fast tests use it where only shapes and plumbing matter.
    """
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(caption_vocabulary())
    return assemble(make_vae(), make_text_encoder(tokenizer), tokenizer, make_unet())


def assemble(
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
) -> StableDiffusionPipeline:
    """Put trained or fresh components together with the inference scheduler."""
    scheduler = DPMSolverMultistepScheduler(**SCHEDULE)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
