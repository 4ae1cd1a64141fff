"""Training speed: a local job with the default settings against a plain diffusers + peft loop.

Two measurements in one run, on one machine, one after the other:

* **job**: one demo user's photos through `LocalTrainingJobs` with the default hyperparameters
  (what notebook 02 runs): seconds per optimizer step (from the script's own
  `training_summary.json`) and the whole job's wall time (submit to `model.tar.gz` in the store,
  so process start, model loading and packaging are in it);
* **plain**: the same number of steps, batch size, rank, learning rate and thread count through
  a loop written as the diffusers DreamBooth-LoRA example writes it (peft LoRA on the UNet's
  attention projections, the VAE and text encoder run on every step).

The ratio `plain / job` per step says what the entry script's choices (cached latents and
prompt embeddings, ...) buy; above 1 the job is faster. Writes JSON:

    python benchmarks/train_speed.py --out outputs/benchmarks/train_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def plain_diffusers_loop(base_model: str, photos: list, steps: int, hyperparameters: dict) -> float:
    """Seconds per step of the diffusers example's loop (after 5 warm-up steps)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    from helpers.workshop.basemodel.loading import load_base_pipeline

    torch.manual_seed(0)
    pipe = load_base_pipeline(base_model)
    vae, unet, text_encoder, tokenizer = pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    for module in (vae, unet, text_encoder):
        module.requires_grad_(False)
    rank = hyperparameters["rank"]
    unet.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=rank,
            init_lora_weights="gaussian",
            target_modules=["to_k", "to_q", "to_v", "to_out.0"],
        )
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=hyperparameters["learning_rate"])
    pixels = torch.tensor(np.stack([np.asarray(p, dtype=np.float32) / 127.5 - 1 for p in photos]))
    pixels = pixels.permute(0, 3, 1, 2)
    batch_size = hyperparameters["train_batch_size"]
    unet.train()
    started = None
    for step in range(steps + 5):
        if step == 5:
            started = time.perf_counter()
        index = torch.randint(len(pixels), (batch_size,))
        model_input = vae.encode(pixels[index]).latent_dist.sample()
        model_input = model_input * vae.config.scaling_factor
        noise = torch.randn_like(model_input)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,))
        noisy = noise_scheduler.add_noise(model_input, noise, timesteps)
        ids = tokenizer(
            [hyperparameters["instance_prompt"]] * batch_size,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        encoder_hidden_states = text_encoder(ids)[0]
        prediction = unet(noisy, timesteps, encoder_hidden_states).sample
        loss = F.mse_loss(prediction.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, hyperparameters["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write.")
    parser.add_argument("--user", default="demo-ada")
    args = parser.parse_args()

    import torch

    from helpers import load_settings
    from helpers.backend import open_backend
    from helpers.ports.jobs import JobStatus, TrainingJobRequest
    from helpers.workshop.demo_subjects import get_demo_subject, subject_images
    from helpers.workshop.personalization import read_summary, upload_instance_images

    work = Path(tempfile.mkdtemp(prefix="train-speed-"))
    settings = load_settings(backend="local", work_dir=str(work))
    backend = open_backend(settings)
    provisioned = backend.provision()
    photos = subject_images(get_demo_subject(args.user))
    instance_uri = settings.uri(f"users/{args.user}/instance/")
    upload_instance_images(provisioned.store, instance_uri, photos)
    jobs = backend.jobs
    request = TrainingJobRequest(
        job_name=f"{args.user}-speed",
        user_id=args.user,
        model_id="speed",
        instance_data_uri=instance_uri,
        base_model=settings.base_model,
        output_path=settings.uri("jobs/"),
        hyperparameters={"num_validation_images": 0},
    )
    started = time.perf_counter()
    jobs.submit(request)
    done = jobs.wait(request.job_name, args.user, poll=0.2)
    job_wall = time.perf_counter() - started
    if done.status != JobStatus.COMPLETED:
        raise SystemExit(f"job {done.status.value}: {done.failure_reason}")
    tar = work / "model.tar.gz"
    provisioned.store.get_file(done.output_uri, tar)
    summary = read_summary(tar)
    hyperparameters = summary["hyperparameters"]
    steps = summary["steps"]
    job_step = summary["train_seconds"] / steps
    jobs.close()

    torch.set_num_threads(jobs.threads_per_job)  # the job's thread count, for a fair match
    plain_step = plain_diffusers_loop(settings.base_model, photos, steps, hyperparameters)

    result = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "threads": jobs.threads_per_job,
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "steps": steps,
        "hyperparameters": {
            key: hyperparameters[key]
            for key in (
                "train_batch_size",
                "rank",
                "learning_rate",
                "train_text_encoder",
                "lora_layers",
                "cache_latents",
                "resolution",
            )
            if key in hyperparameters
        },
        "job_seconds_per_step": round(job_step, 4),
        "job_wall_seconds": round(job_wall, 2),
        "job_train_seconds": summary["train_seconds"],
        "plain_seconds_per_step": round(plain_step, 4),
        "plain_over_job_per_step": round(plain_step / job_step, 3),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
