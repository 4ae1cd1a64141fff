"""Does a user's model draw *their* toy? The identity score.

A demo user's toy is a combination of parts: a body colour, an accent colour (ears and
pattern) and a pattern. The detector (`basemodel.parts.detect_parts`) reads the three parts
of every generated picture; a picture **shows the subject** when all three match. Per user:

* the identity rate of the user's model and of the base model, for the instance prompt and
  the same seeds; chance is 1 in 90 combinations;
* per part, how often the user's model got it right;
* how far the class prompt "a photo of a toy" moved with fine-tuning, for the same seeds:
  the **class drift**, the share of its pictures that show the user's toy after fine-tuning
  and did not before. Fine-tuning on five photos pulls the class noun towards the user's toy
  (DreamBooth's language drift, where every toy becomes the user's); prior preservation is
  there to limit it. Also reported: the share of class pictures that changed toy at all,
  which a LoRA does to many prompts a little (the same seed then lands on another toy)
  without the class becoming the user's toy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from PIL import Image

from helpers.workshop.basemodel.parts import ToyParts, detect_parts
from helpers.workshop.demo_subjects import DemoSubject

#: At least this share of the user's model's pictures shows their toy (6 of 8 seeds).
IDENTITY_TARGET = 6 / 8
#: At most this share of the base model's pictures shows it (1 of 8 seeds).
BASE_LIMIT = 1 / 8
#: At most this share of the class prompt's pictures may become the user's toy (2 of 8 seeds):
#: "a photo of a toy" must still mean toys in general. The base model shows a given toy for
#: about 1 in 90 pictures, so 2 of 8 already is 20 times that; a class noun that collapsed
#: onto the user's toy shows it for most seeds.
DRIFT_LIMIT = 2 / 8


#: The training recipe that meets the targets for every demo user: notebook 02's defaults,
#: chosen by `benchmarks/recipe_sweep.py` (without prior preservation, "a photo of a toy"
#: drifts to Ada's toy in 3 of 8 seeds; with 300 steps, Bo's toy shows in 5 of 8).
RECIPE: dict[str, object] = {
    "max_train_steps": 500,
    "train_text_encoder": True,
    "with_prior_preservation": True,
    "class_prompt": "a photo of a toy",
    "num_class_images": 50,
}


def subject_parts(subject: DemoSubject) -> ToyParts:
    """The parts a picture of `subject`'s toy must show."""
    return ToyParts(subject.color, subject.accent, subject.pattern)


@dataclass(frozen=True)
class IdentityRow:
    """One user's identity score (all rates are shares of the seeds, 0 to 1).

    Args:
        user_id (`str`): whose model.
        subject (`str`): the toy's parts in words.
        tuned (`float`): the user's model's pictures that show the toy.
        base (`float`): the base model's pictures (same prompt and seeds) that show it.
        color, accent, pattern (`float`): the user's model's pictures right on that part.
        class_drift (`float`): class-prompt seeds that became the user's toy with fine-tuning.
        class_changed (`float`): class-prompt seeds whose toy changed at all.
    """

    user_id: str
    subject: str
    tuned: float
    base: float
    color: float
    accent: float
    pattern: float
    class_drift: float
    class_changed: float

    @property
    def meets_targets(self) -> bool:
        """`IDENTITY_TARGET`, `BASE_LIMIT` and `DRIFT_LIMIT` all hold."""
        return (
            self.tuned >= IDENTITY_TARGET
            and self.base <= BASE_LIMIT
            and self.class_drift <= DRIFT_LIMIT
        )

    def as_dict(self) -> dict:
        return asdict(self) | {"meets_targets": self.meets_targets}


def _share(flags: Sequence[bool]) -> float:
    return round(sum(flags) / len(flags), 4) if flags else 0.0


def identity_row(
    user_id: str,
    subject: ToyParts,
    base_images: Sequence[Image.Image],
    tuned_images: Sequence[Image.Image],
    base_class_images: Sequence[Image.Image],
    tuned_class_images: Sequence[Image.Image],
) -> IdentityRow:
    """Score one user's model against the base model.

    Args:
        user_id (`str`): whose model.
        subject (`ToyParts`): the user's toy (`subject_parts`).
        base_images, tuned_images: the instance prompt's pictures, one per seed, from the base
            model and from the user's model (same seeds, same order).
        base_class_images, tuned_class_images: the class prompt's pictures, likewise.
    """
    if len(base_images) != len(tuned_images) or not tuned_images:
        raise ValueError("base_images and tuned_images need one picture per seed each")
    if len(base_class_images) != len(tuned_class_images) or not tuned_class_images:
        raise ValueError("base_class_images and tuned_class_images need one picture per seed")
    tuned = [detect_parts(image) for image in tuned_images]
    base = [detect_parts(image) for image in base_images]
    before = [detect_parts(image) for image in base_class_images]
    after = [detect_parts(image) for image in tuned_class_images]
    return IdentityRow(
        user_id=user_id,
        subject=subject.describe(),
        tuned=_share([parts == subject for parts in tuned]),
        base=_share([parts == subject for parts in base]),
        color=_share([parts.color == subject.color for parts in tuned]),
        accent=_share([parts.accent == subject.accent for parts in tuned]),
        pattern=_share([parts.pattern == subject.pattern for parts in tuned]),
        class_drift=_share([new == subject != old for old, new in zip(before, after, strict=True)]),
        class_changed=_share([old != new for old, new in zip(before, after, strict=True)]),
    )


def format_identity_table(rows: Sequence[IdentityRow], seeds: int) -> str:
    """`rows` as a Markdown table, rates as counts of `seeds` (e.g. "7/8")."""

    def count(rate: float) -> str:
        return f"{round(rate * seeds)}/{seeds}"

    lines = [
        "| user | toy | user's model | base model | body colour | accent | pattern "
        "| class drift | class changed | targets |",
        "|---|---|:---:|:---:|:---:|:---:|:---:|:---:|:---:|:---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.user_id} | {row.subject} | {count(row.tuned)} | {count(row.base)} "
            f"| {count(row.color)} | {count(row.accent)} | {count(row.pattern)} "
            f"| {count(row.class_drift)} | {count(row.class_changed)} "
            f"| {'met' if row.meets_targets else '**not met**'} |"
        )
    return "\n".join(lines)


def part_titles(images: Sequence[Image.Image], labels: Sequence[str]) -> list[str]:
    """A title per picture: its label, and below it the parts the detector reads in it."""
    if len(labels) != len(images):
        raise ValueError(f"labels has {len(labels)} entries for {len(images)} images")
    return [
        f"{label}\n{detect_parts(image).describe()}"
        for label, image in zip(labels, images, strict=True)
    ]
