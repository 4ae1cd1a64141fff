"""A real LoRA for tests: a few steps of the training script on a tiny base pipeline."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def train_lora(base_dir: Path, work_dir: Path, subject: str, *options: str) -> Path:
    """Train two steps on `subject`'s demo photos; return the weights file.

    `options` are more of the script's arguments (e.g. "--train_text_encoder").
    """
    from helpers.settings import PROJECT_ROOT
    from helpers.workshop.demo_subjects import get_demo_subject, write_subject_images

    write_subject_images(get_demo_subject(subject), work_dir / "photos", count=3)
    subprocess.run(
        [
            sys.executable,
            str(PROJECT_ROOT / "model_code" / "train_dreambooth_lora.py"),
            f"--pretrained_model_name_or_path={base_dir}",
            f"--instance_data_dir={work_dir / 'photos'}",
            f"--output_dir={work_dir / 'model'}",
            "--max_train_steps=2",
            "--num_validation_images=0",
            "--learning_rate=0.05",
            *options,
        ],
        check=True,
        capture_output=True,
    )
    return work_dir / "model" / "pytorch_lora_weights.safetensors"
