"""Did fine-tuning personalize the model? A number for it, and the pictures to look at.

The tiny base model draws 64x64 pictures of coloured objects on pale backgrounds, and what
tells one demo user's toy from another's is its colours (a purple body with yellow stripes, a
blue body with a red belly, an orange body with a blue bowtie). So the score compares
**colour signatures**:

* the signature of a picture is the share of its object pixels nearest to each colour of the
  drawing palette (`drawing.COLORS`) plus black. Object pixels are the saturated ones
  (HSV saturation >= `MIN_SATURATION`, value >= `MIN_VALUE`) and the dark ones
  (value < `MIN_VALUE`, counted as black); the pale backgrounds are neither;
* the signature of a set of pictures pools their object pixels (so a picture counts by the
  size of its object, and a failed picture with a few stray coloured pixels barely counts);
* the distance between two sets is the L1 distance between their signatures: 0 when the
  colours are mixed alike, 2 when they share none.

A user's model is personalized when its pictures for the instance prompt are closer to the
user's own photos than the base model's pictures for the same prompt and seeds
(`closer_than_base`), and closer to the user's own photos than to any other user's
(`closer_to_own_than_others`). Set signatures (rather than mean pairwise distances) are used
because position, size and background vary from photo to photo; pooling first keeps what all
of a user's photos share, the toy's colours, and is stable with a handful of pictures.
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from helpers.domain.archives import MAX_MEMBERS, safe_extract
from helpers.domain.records import ModelStatus
from helpers.workshop.basemodel import drawing
from helpers.workshop.gallery import generate

__all__ = [
    "EVAL_GUIDANCE",
    "EVAL_SEEDS",
    "PALETTE",
    "PersonalizationRow",
    "color_signature",
    "describe_signature",
    "format_table",
    "generate",
    "load_user_pipeline",
    "loss_curve",
    "personalization_table",
    "png_bytes",
    "read_summary",
    "set_distance",
    "set_signature",
    "smooth",
    "upload_instance_images",
    "wait_with_progress",
]

#: The palette a pixel is read as: the drawing colours plus black.
PALETTE: dict[str, tuple[int, int, int]] = {**drawing.COLORS, "black": (0, 0, 0)}
_PALETTE_RGB = np.array(list(PALETTE.values()), dtype=np.float32) / 255.0
_BLACK = len(PALETTE) - 1
#: Pixels at least this saturated (HSV) are object pixels; the backgrounds are below 0.15.
MIN_SATURATION = 0.35
#: Pixels darker than this (HSV value) count as black.
MIN_VALUE = 0.25
#: The most `read_summary` reads of a `training_summary.json` (a loss per step fits many
#: times over; an archive from elsewhere must not fill memory).
MAX_SUMMARY_BYTES = 16 * 1024 * 1024
#: The seeds and guidance scale of the pictures the score compares (notebook 02, tests). The
#: tiny models keep a user's colours at low guidance; at 5 and above they oversaturate (an
#: orange toy turns red), so the base model's own reading of the prompt wins (issue note).
EVAL_SEEDS: tuple[int, ...] = tuple(range(8))
EVAL_GUIDANCE = 2.0


def _color_counts(image: Image.Image) -> np.ndarray:
    """How many of `image`'s object pixels are nearest to each `PALETTE` colour."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 3) / 255.0
    value = rgb.max(axis=1)
    saturation = np.where(value > 0, (value - rgb.min(axis=1)) / np.maximum(value, 1e-6), 0.0)
    dark = value < MIN_VALUE
    colored = (saturation >= MIN_SATURATION) & ~dark
    counts = np.zeros(len(PALETTE), dtype=np.float64)
    if colored.any():
        # nearest of the six colours (black is only for dark pixels)
        distances = ((rgb[colored, None, :] - _PALETTE_RGB[None, :_BLACK, :]) ** 2).sum(axis=2)
        counts[:_BLACK] = np.bincount(distances.argmin(axis=1), minlength=_BLACK)
    counts[_BLACK] = dark.sum()
    return counts


def color_signature(image: Image.Image) -> np.ndarray:
    """The share of `image`'s object pixels nearest to each `PALETTE` colour (sums to 1).

    A picture with no object pixels (a blank background) has the all-zero signature.
    """
    counts = _color_counts(image)
    total = counts.sum()
    return counts / total if total else counts


def set_signature(images: Sequence[Image.Image]) -> np.ndarray:
    """The colour signature of `images` together: their object pixels pooled, then shared out.

    Pooling (rather than averaging per-picture signatures) lets each picture count by its
    object's size, so a failed picture with a few stray coloured pixels barely moves it.
    """
    if not images:
        raise ValueError("images must not be empty")
    counts = np.sum([_color_counts(image) for image in images], axis=0)
    total = counts.sum()
    return counts / total if total else counts


def set_distance(first: Sequence[Image.Image], second: Sequence[Image.Image]) -> float:
    """L1 distance between the colour signatures of two sets of pictures, in [0, 2]."""
    return float(np.abs(set_signature(first) - set_signature(second)).sum())


def describe_signature(signature: np.ndarray, top: int = 3) -> str:
    """The strongest colours of a signature in words, e.g. `"purple 71%, yellow 25%"`."""
    order = np.argsort(signature)[::-1][:top]
    names = list(PALETTE)
    return ", ".join(f"{names[i]} {signature[i]:.0%}" for i in order if signature[i] > 0.02)


@dataclass(frozen=True)
class PersonalizationRow:
    """One user's score (distances are `set_distance`, lower is closer).

    Args:
        user_id (`str`): whose model.
        tuned_to_own (`float`): fine-tuned pictures vs the user's own photos.
        base_to_own (`float`): base model pictures (same prompt and seeds) vs the user's photos.
        tuned_to_others (`float`): fine-tuned pictures vs the closest other user's photos.
        closest_other (`str`): that other user.
        closer_than_base (`bool`): `tuned_to_own < base_to_own`.
        closer_to_own_than_others (`bool`): `tuned_to_own < tuned_to_others`.
    """

    user_id: str
    tuned_to_own: float
    base_to_own: float
    tuned_to_others: float
    closest_other: str
    closer_than_base: bool
    closer_to_own_than_others: bool

    @property
    def personalized(self) -> bool:
        """Both tests pass."""
        return self.closer_than_base and self.closer_to_own_than_others

    def as_dict(self) -> dict:
        return asdict(self)


def personalization_table(
    instance_images_by_user: Mapping[str, Sequence[Image.Image]],
    base_images_by_user: Mapping[str, Sequence[Image.Image]],
    tuned_images_by_user: Mapping[str, Sequence[Image.Image]],
) -> list[PersonalizationRow]:
    """Score every user of `tuned_images_by_user` (in its order).

    Args:
        instance_images_by_user: each user's own photos (at least two users).
        base_images_by_user: the base model's pictures for each user's instance prompt and seeds.
        tuned_images_by_user: each user's fine-tuned model's pictures, same prompt and seeds.
    """
    if len(instance_images_by_user) < 2:
        raise ValueError("need the photos of at least two users to compare against others")
    missing = sorted(
        set(tuned_images_by_user) - (set(instance_images_by_user) & set(base_images_by_user))
    )
    if missing:
        raise ValueError(f"users {missing} need instance photos and base pictures as well")
    rows = []
    for user, tuned in tuned_images_by_user.items():
        own = instance_images_by_user[user]
        tuned_to_own = set_distance(tuned, own)
        base_to_own = set_distance(base_images_by_user[user], own)
        others = {
            other: set_distance(tuned, photos)
            for other, photos in instance_images_by_user.items()
            if other != user
        }
        closest = min(others, key=others.get)
        rows.append(
            PersonalizationRow(
                user_id=user,
                tuned_to_own=round(tuned_to_own, 4),
                base_to_own=round(base_to_own, 4),
                tuned_to_others=round(others[closest], 4),
                closest_other=closest,
                closer_than_base=tuned_to_own < base_to_own,
                closer_to_own_than_others=tuned_to_own < others[closest],
            )
        )
    return rows


def format_table(rows: Sequence[PersonalizationRow]) -> str:
    """`rows` as a Markdown table (renders in notebooks, reads fine as plain text)."""

    def mark(flag: bool) -> str:
        return "yes" if flag else "**no**"

    lines = [
        "| user | tuned ↔ own | base ↔ own | tuned ↔ closest other | closer than base "
        "| closer to own than others |",
        "|---|---:|---:|---:|:---:|:---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.user_id} | {row.tuned_to_own:.3f} | {row.base_to_own:.3f} "
            f"| {row.tuned_to_others:.3f} ({row.closest_other}) | {mark(row.closer_than_base)} "
            f"| {mark(row.closer_to_own_than_others)} |"
        )
    return "\n".join(lines)


def load_user_pipeline(base_model: str | Path, lora: str | Path, device: str = "cpu"):
    """The base pipeline with a user's LoRA weights loaded.

    Args:
        base_model: the base pipeline directory.
        lora: a folder holding `pytorch_lora_weights.safetensors`, that file itself, or a
            job's `model.tar.gz` (unpacked safely, see `archives.safe_extract`).
    """
    from helpers.workshop.basemodel.loading import load_base_pipeline

    lora = Path(lora)
    pipe = load_base_pipeline(str(base_model), device=device)
    if lora.is_file() and lora.name.endswith((".tar.gz", ".tgz", ".tar")):
        with tempfile.TemporaryDirectory(prefix="user-lora-") as tmp:
            folder = safe_extract(lora, tmp)
            pipe.load_lora_weights(str(_weights_folder(folder)))
    elif lora.is_file():
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    else:
        pipe.load_lora_weights(str(_weights_folder(lora)))
    return pipe


def _weights_folder(folder: Path) -> Path:
    """The folder holding `pytorch_lora_weights.safetensors` (itself or one level down)."""
    name = "pytorch_lora_weights.safetensors"
    if (folder / name).is_file():
        return folder
    found = sorted(folder.glob(f"*/{name}"))
    if not found:
        raise FileNotFoundError(f"no {name} in {folder}")
    return found[0].parent


def read_summary(source: str | Path | bytes, max_bytes: int = MAX_SUMMARY_BYTES) -> dict:
    """A `training_summary.json` from a path, a folder, a `model.tar.gz` or raw bytes.

    Args:
        source (`str`, `Path` or `bytes`): where the summary is.
        max_bytes (`int`, defaults to `MAX_SUMMARY_BYTES`): the largest summary read. In an
            archive, the members are scanned up to `archives.MAX_MEMBERS`, like `safe_extract`.

    Raises:
        ValueError: the summary is larger than `max_bytes`, or the archive has too many members.
        FileNotFoundError: there is no summary.
    """
    if isinstance(source, bytes):
        return json.loads(_bounded(source, len(source), max_bytes, "the summary"))
    path = Path(source)
    if path.is_dir():
        path = path / "training_summary.json"
    elif path.name.endswith((".tar.gz", ".tgz", ".tar")):
        return json.loads(_summary_member(path, max_bytes))
    with path.open("rb") as file:
        return json.loads(_bounded(file, path.stat().st_size, max_bytes, str(path)))


def _summary_member(path: Path, max_bytes: int) -> bytes:
    """The bytes of the archive's `training_summary.json`, read only if small enough."""
    with tarfile.open(path, "r:*") as archive:
        for count, member in enumerate(archive, start=1):  # streamed: no full member list
            if count > MAX_MEMBERS:
                raise ValueError(f"refusing {path}: more than {MAX_MEMBERS} members")
            if member.isfile() and Path(member.name).name == "training_summary.json":
                where = f"{member.name!r} in {path}"
                return _bounded(archive.extractfile(member), member.size, max_bytes, where)
    raise FileNotFoundError(f"no training_summary.json in {path}")


def _bounded(data, size: int, max_bytes: int, where: str) -> bytes:
    """`data` (bytes or a binary file of `size` bytes), refused past `max_bytes`."""
    if size > max_bytes:
        raise ValueError(f"refusing {where}: {size} bytes, at most {max_bytes} for a summary")
    content = data if isinstance(data, bytes) else data.read(max_bytes + 1)
    if len(content) > max_bytes:  # a file that grew since its size was read
        raise ValueError(f"refusing {where}: more than {max_bytes} bytes for a summary")
    return content


def smooth(values: Sequence[float], window: int = 15) -> np.ndarray:
    """Moving average of `values` (a shorter window at the start), same length."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return values
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    index = np.arange(1, values.size + 1)
    start = np.maximum(0, index - window)
    return (cumulative[index] - cumulative[start]) / (index - start)


def _loss_history(summary: Mapping) -> tuple[list[float], list[float]]:
    history = summary.get("loss_history") or []
    steps, losses = [], []
    for index, entry in enumerate(history):
        if isinstance(entry, Mapping):
            steps.append(float(entry.get("step", index + 1)))
            losses.append(float(entry["loss"]))
        elif isinstance(entry, (list, tuple)):
            steps.append(float(entry[0]))
            losses.append(float(entry[1]))
        else:
            steps.append(float(index + 1))
            losses.append(float(entry))
    return steps, losses


def loss_curve(summaries_by_user: Mapping[str, Mapping], window: int = 15):
    """A matplotlib figure of each user's training loss: raw (faint) and smoothed."""
    import matplotlib.pyplot as plt

    if not summaries_by_user:
        raise ValueError("summaries_by_user must not be empty")
    figure, axis = plt.subplots(figsize=(7, 3.5))
    for user, summary in summaries_by_user.items():
        steps, losses = _loss_history(summary)
        if not losses:
            continue
        (line,) = axis.plot(steps, smooth(losses, window), label=user)
        axis.plot(steps, losses, color=line.get_color(), alpha=0.2, linewidth=0.8)
    axis.set_xlabel("step")
    axis.set_ylabel(f"loss (moving average of {window})")
    axis.set_title("DreamBooth-LoRA training loss")
    axis.legend()
    figure.tight_layout()
    return figure


def png_bytes(image: Image.Image) -> bytes:
    """`image` encoded as PNG, as a user's upload would arrive."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def upload_instance_images(store, prefix_uri: str, images: Sequence[Image.Image]) -> list[str]:
    """Validate a user's photos, normalize them and store them under the folder `prefix_uri`.

    Raises `instance_images.InstanceImageError` (listing every problem) and stores nothing when
    any photo is refused. Returns the stored URIs.
    """
    from helpers.services.instance_images import normalize, validate_images

    uploads = [(f"upload-{index}.png", png_bytes(image)) for index, image in enumerate(images)]
    prefix = prefix_uri if prefix_uri.endswith("/") else prefix_uri + "/"
    stored = []
    for name, data in normalize(validate_images(uploads)):
        store.put_bytes(prefix + name, data)
        stored.append(prefix + name)
    return stored


def wait_with_progress(
    jobs,
    job_names_by_user: Mapping[str, str],
    timeout: float | None = None,
    poll: float = 1.0,
    failed=None,
) -> dict:
    """Wait for several training jobs at once, one `tqdm` bar per job (step, loss, status).

    Each job is followed by `jobs.wait(..., on_progress=...)` in its own thread, from the
    moment it is submitted. Returns each user's final `JobDescription`, or None for a user
    whose job will never be submitted: `failed(user)` (optional) says so (their model failed
    first).
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    bars = {
        user: tqdm(total=None, desc=f"{user} ({job})", unit="step", position=index)
        for index, (user, job) in enumerate(job_names_by_user.items())
    }

    def follow(user: str):
        bar = bars[user]

        def update(description) -> None:
            if description.max_steps and bar.total != description.max_steps:
                bar.total = description.max_steps
            if description.last_step is not None and description.last_step > bar.n:
                bar.update(description.last_step - bar.n)
            postfix = {"status": description.status.value}
            if description.last_loss is not None:
                postfix["loss"] = f"{description.last_loss:.4f}"
            bar.set_postfix(postfix, refresh=True)

        job_name = job_names_by_user[user]
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:  # a driver may submit the job a moment after it was named
            try:
                jobs.describe(job_name, user)
                break
            except KeyError:  # NotFound: not submitted yet
                if failed is not None and failed(user):
                    bar.set_postfix({"status": "FAILED before its job started"}, refresh=True)
                    return None
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"job {job_name} was never submitted") from None
                time.sleep(poll)
        left = None if deadline is None else max(deadline - time.monotonic(), poll)
        return jobs.wait(job_name, user, timeout=left, poll=poll, on_progress=update)

    try:
        with ThreadPoolExecutor(max_workers=max(1, len(bars))) as pool:
            futures = {user: pool.submit(follow, user) for user in bars}
            return {user: future.result() for user, future in futures.items()}
    finally:
        for bar in bars.values():
            bar.close()


def onboard_with_progress(
    onboarding, jobs, metadata, models: Sequence, timeout: float | None = None
) -> dict:
    """Drive `models` (REQUESTED `ModelRecord`s, one per user) through onboarding, as the API
    does: start each, follow its training job with a bar (`wait_with_progress`), then wait for
    its packaging. Returns each user's `(JobDescription, ModelRecord)`, the model AVAILABLE or
    FAILED with its reason (and the description None when it failed before its job started)."""
    for model in models:
        onboarding.start(model)
    ids = {model.user_id: model.model_id for model in models}

    def failed(user: str) -> bool:
        record = metadata.get_model(user, ids[user])
        return record is not None and record.status == ModelStatus.FAILED

    finished = wait_with_progress(
        jobs,
        {model.user_id: model.training_job_name for model in models},
        timeout=timeout,
        failed=failed,
    )
    onboarding.wait(timeout)
    return {
        model.user_id: (finished[model.user_id], metadata.get_model(model.user_id, model.model_id))
        for model in models
    }
