"""Which training recipe personalizes every demo user? Train each recipe for each user, score.

Each (recipe, user) pair runs `model_code/train_dreambooth_lora.py` as its own process, the
way a local job does; then the base model and every fine-tuned model draw the instance prompt
and the class prompt for the same seeds. `helpers.workshop.identity` scores them (is it the
user's toy, per part, and how far the class prompt drifted), and
`helpers.workshop.personalization` adds the colour signatures. Writes one JSON with, per
recipe, the hyperparameters, training seconds and every user's rows.

    python benchmarks/recipe_sweep.py --out outputs/benchmarks/recipe_sweep.json --parallel 2 \
        --recipes default,seed1,plain-mse --grids outputs/benchmarks/recipe-grids

Runs on CUDA when there is one (the training script picks it), else on the CPU with one
OpenMP thread per process, so `--parallel` should not exceed the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "model_code" / "train_dreambooth_lora.py"

_PRIOR_TEXT_ENCODER = {
    "train_text_encoder": True,
    "with_prior_preservation": True,
    "class_prompt": "a photo of a toy",
    "num_class_images": 50,
}
#: name -> hyperparameters over the script's defaults.
RECIPES: dict[str, dict] = {
    "default": {},
    "seed1": {"seed": 1},
    "steps500": {"max_train_steps": 500},
    "plain-mse": {"snr_gamma": 0},
    "sampled-latents": {"sample_latents": True},
    "lr3e-3": {"learning_rate": 3e-3},
    "text-encoder": {"train_text_encoder": True},
    "steps200": {"max_train_steps": 200},
    "rank8": {"rank": 8},
    "prior-text-encoder": _PRIOR_TEXT_ENCODER,
    "prior-text-encoder-500": {**_PRIOR_TEXT_ENCODER, "max_train_steps": 500},
    "prior-text-encoder-lr2e-3": {**_PRIOR_TEXT_ENCODER, "learning_rate": 2e-3},
    "prior-text-encoder-weight0.5": {**_PRIOR_TEXT_ENCODER, "prior_loss_weight": 0.5},
    "text-encoder-cross-attention": {"train_text_encoder": True, "lora_layers": "cross_attention"},
    "cross-attention": {"lora_layers": "cross_attention"},
    "prior": {
        "with_prior_preservation": True,
        "class_prompt": "a photo of a toy",
        "num_class_images": 50,
    },
}


def train(base_model: str, photos: Path, output: Path, hyperparameters: dict) -> float | str:
    """Run the training script once; return its wall seconds, or the log tail if it failed."""
    args = [
        sys.executable,
        str(SCRIPT),
        f"--pretrained_model_name_or_path={base_model}",
        f"--instance_data_dir={photos}",
        f"--output_dir={output}",
        "--num_validation_images=0",
    ]
    args += [f"--{name}={value}" for name, value in hyperparameters.items()]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    started = time.perf_counter()
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        return f"exit {done.returncode}: {done.stdout[-1000:]}{done.stderr[-1000:]}"
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write.")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="Comma-separated names.")
    parser.add_argument("--users", default="demo-ada,demo-bo")
    parser.add_argument("--seeds", default="0,1,2,3,4,5,6,7")
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--base-model", default=None)
    parser.add_argument("--grids", default=None, help="Folder for one picture grid per recipe.")
    args = parser.parse_args()

    import torch

    from helpers.settings import DEFAULT_BASE_MODEL
    from helpers.workshop.basemodel.loading import load_base_pipeline
    from helpers.workshop.demo_subjects import (
        get_demo_subject,
        subject_images,
        write_subject_images,
    )
    from helpers.workshop.gallery import image_grid
    from helpers.workshop.identity import identity_row, subject_parts
    from helpers.workshop.personalization import generate, load_user_pipeline, personalization_table

    base_model = args.base_model or str(DEFAULT_BASE_MODEL)
    users = [user for user in args.users.split(",") if user]
    seeds = [int(seed) for seed in args.seeds.split(",")]
    recipes = {name: RECIPES[name] for name in args.recipes.split(",")}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="recipe-sweep-"))

    photos = {user: subject_images(get_demo_subject(user)) for user in users}
    for user in users:
        write_subject_images(get_demo_subject(user), work / "photos" / user)

    runs = [(name, user) for name in recipes for user in users]
    with ThreadPoolExecutor(args.parallel) as pool:
        seconds = dict(
            zip(
                runs,
                pool.map(
                    lambda run: train(
                        base_model,
                        work / "photos" / run[1],
                        work / run[0] / run[1],
                        recipes[run[0]],
                    ),
                    runs,
                ),
                strict=True,
            )
        )

    base_pipe = load_base_pipeline(base_model, device=device)
    prompt = get_demo_subject(users[0]).instance_prompt
    class_prompt = get_demo_subject(users[0]).class_prompt
    base_images = generate(base_pipe, prompt, seeds, guidance=args.guidance)
    base_class = generate(base_pipe, class_prompt, seeds, guidance=args.guidance)
    results = []
    for name, hyperparameters in recipes.items():
        failed = {
            user: seconds[(name, user)] for user in users if isinstance(seconds[(name, user)], str)
        }
        if failed:
            results.append({"recipe": name, "hyperparameters": hyperparameters, "failed": failed})
            print(f"{name:24s} FAILED {failed}", flush=True)
            continue
        tuned, identity = {}, []
        for user in users:
            pipe = load_user_pipeline(base_model, work / name / user, device=device)
            tuned[user] = generate(pipe, prompt, seeds, guidance=args.guidance)
            tuned_class = generate(pipe, class_prompt, seeds, guidance=args.guidance)
            parts = subject_parts(get_demo_subject(user))
            identity.append(
                identity_row(user, parts, base_images, tuned[user], base_class, tuned_class)
            )
        rows = personalization_table(photos, dict.fromkeys(users, base_images), tuned)
        if args.grids:
            Path(args.grids).mkdir(parents=True, exist_ok=True)
            pictures = [image for user in users for image in photos[user][: len(seeds)]]
            pictures += base_images + [image for user in users for image in tuned[user]]
            pictures += base_class
            image_grid(pictures, columns=len(seeds)).savefig(Path(args.grids) / f"{name}.png")
        results.append(
            {
                "recipe": name,
                "hyperparameters": hyperparameters,
                "all_meet_identity_targets": all(row.meets_targets for row in identity),
                "identity": [row.as_dict() for row in identity],
                "all_personalized": all(row.personalized for row in rows),
                "worst_margin_vs_base": min(row.base_to_own - row.tuned_to_own for row in rows),
                "worst_margin_vs_others": min(
                    row.tuned_to_others - row.tuned_to_own for row in rows
                ),
                "train_seconds": {user: round(seconds[(name, user)], 2) for user in users},
                "rows": [row.as_dict() for row in rows],
            }
        )
        print(
            f"{name:20s} targets={results[-1]['all_meet_identity_targets']!s:5s} "
            + " ".join(
                f"{r.user_id}: tuned {r.tuned:.2f} base {r.base:.2f} drift {r.class_drift:.2f} "
                f"(colour {r.color:.2f} accent {r.accent:.2f} pattern {r.pattern:.2f})"
                for r in identity
            ),
            flush=True,
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": {
                    "device": device,
                    "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
                    "cpu_count": os.cpu_count(),
                    "platform": platform.platform(),
                    "torch": torch.__version__,
                },
                "seeds": seeds,
                "guidance": args.guidance,
                "prompt": prompt,
                "results": results,
            },
            indent=2,
        )
    )
    print("wrote", out)


if __name__ == "__main__":
    main()
