"""What several benchmarks share (they run as scripts, so this folder is on their `sys.path`)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The bucket of a benchmark's own local artifact store.
BUCKET = "workshop-bench"


def local_store(prefix: str):
    """A work folder of its own and a local artifact store in it, with `BUCKET` made."""
    from helpers.infra.local.store import LocalArtifactStore

    work = Path(tempfile.mkdtemp(prefix=prefix))
    store = LocalArtifactStore(work / "store")
    store.create_bucket(BUCKET)
    return work, store


def write_report(report: dict, out: str, figure=None) -> Path:
    """Write `report` as JSON to `out`, and `figure` (a matplotlib Figure) beside it as PNG."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    if figure is not None:
        figure.savefig(path.with_suffix(".png"), dpi=110)
    return path


def train_lora(base_model: str, work: Path, steps: int = 20) -> Path:
    """A short DreamBooth-LoRA on demo user Ada's photos (the training script, as a process);
    return its `pytorch_lora_weights.safetensors`."""
    from helpers.workshop.demo_subjects import get_demo_subject, write_subject_images

    write_subject_images(get_demo_subject("demo-ada"), work / "photos")
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "model_code" / "train_dreambooth_lora.py"),
            f"--pretrained_model_name_or_path={base_model}",
            f"--instance_data_dir={work / 'photos'}",
            f"--output_dir={work / 'lora'}",
            f"--max_train_steps={steps}",
            "--num_validation_images=0",
        ],
        check=True,
        capture_output=True,
    )
    return work / "lora" / "pytorch_lora_weights.safetensors"
