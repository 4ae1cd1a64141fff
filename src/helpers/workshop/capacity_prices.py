"""Prices and instance profiles for the capacity model (`helpers.workshop.capacity`).

Two tables, each entry with where its figures come from:

* `PRICES`: SageMaker on-demand prices per hour, real-time inference and training, g5 family,
  per region. The figures were written down from the public pricing page on `PRICES_RECORDED`,
  without fetching it (the machine that built them has no web access), so the table is marked
  "to check before use" (`PRICES_STATUS`). One cross-check holds: ml.g5.xlarge at $1.408/h
  makes AWS's 1500 s DreamBooth-LoRA job $0.587, the $0.59 of AWS's personalized-avatar
  guidance (`tests/test_capacity.py` keeps it so).
* `INSTANCES`: what one instance holds and how fast it serves Stable Diffusion 2.1 at 512 px,
  25 steps, fp16. Memory figures follow from the model's size; the times are assumptions
  (labelled in `InstanceProfile.basis`), not measurements: replace them with your own.

`training_cost` estimates what onboarding one user costs, from AWS's measured figure and from
this machine's measurement scaled by model size.
"""

from __future__ import annotations

from dataclasses import dataclass

PRICES_SOURCE = "https://aws.amazon.com/sagemaker/pricing/"
#: The day the figures were written into this table.
PRICES_RECORDED = "2026-12-03"
PRICES_STATUS = (
    "to check before use: written down from the pricing page, not fetched (the build machine "
    "has no web access); on-demand, no Savings Plans"
)

#: (region, instance type) -> (real-time inference $/h, training $/h).
_PRICES: dict[tuple[str, str], tuple[float, float]] = {
    ("us-east-1", "ml.g5.xlarge"): (1.408, 1.408),
    ("us-east-1", "ml.g5.2xlarge"): (1.515, 1.515),
    ("us-east-1", "ml.g5.4xlarge"): (2.03, 2.03),
    ("us-west-2", "ml.g5.xlarge"): (1.408, 1.408),
    ("us-west-2", "ml.g5.2xlarge"): (1.515, 1.515),
    ("us-west-2", "ml.g5.4xlarge"): (2.03, 2.03),
    ("eu-west-1", "ml.g5.xlarge"): (1.576, 1.576),
    ("eu-west-1", "ml.g5.2xlarge"): (1.696, 1.696),
    ("eu-west-1", "ml.g5.4xlarge"): (2.272, 2.272),
}


@dataclass(frozen=True)
class Price:
    """One instance type's on-demand price in one region, with its provenance."""

    region: str
    instance_type: str
    inference_per_hour: float
    training_per_hour: float
    source: str = PRICES_SOURCE
    recorded: str = PRICES_RECORDED
    status: str = PRICES_STATUS


PRICES: tuple[Price, ...] = tuple(
    Price(region, instance_type, inference, training)
    for (region, instance_type), (inference, training) in _PRICES.items()
)


def price(instance_type: str = "ml.g5.xlarge", region: str = "us-east-1") -> Price:
    """The `Price` of `instance_type` in `region`.

    Raises:
        `ValueError`: the pair is not in the table (the message lists what is).
    """
    for entry in PRICES:
        if entry.region == region and entry.instance_type == instance_type:
            return entry
    known = sorted({(p.region, p.instance_type) for p in PRICES})
    raise ValueError(
        f"no price for instance_type={instance_type!r} in region={region!r}; known: {known}"
    )


@dataclass(frozen=True)
class InstanceProfile:
    """How one instance type serves the model.

    Attributes:
        instance_type (`str`): the SageMaker instance type.
        gpu_memory_gb (`float`): GPU memory (an A10G has 24 GB).
        working_memory_gb (`float`): kept free for CUDA's context and one image's activations.
        model_gb (`float`): one loaded pipeline (base + LoRA): SD 2.1 in fp16 is about 2.6 GB
            (UNet 1.7, text encoder 0.7, VAE 0.2).
        adapter_mb (`float`): one user's LoRA (rank 4-16 on the UNet's attention: 3-12 MB).
        inference_s (`float`): one image, 25 steps at 512 px, fp16.
        load_s (`float`): a per-user model's cache miss: build the pipeline and move its weights
            to the GPU (the base's files are on the instance already).
        swap_s (`float`): a shared-base adapter miss: fetch the LoRA from S3 and hot-swap it.
        concurrency (`int`): requests one instance runs at once (a GPU draws one image at a
            time; batching different users' prompts is not done here).
        basis (`str`): where the figures come from.
    """

    instance_type: str
    gpu_memory_gb: float = 24.0
    working_memory_gb: float = 3.0
    model_gb: float = 2.6
    adapter_mb: float = 10.0
    inference_s: float = 2.0
    load_s: float = 8.0
    swap_s: float = 0.2
    concurrency: int = 1
    basis: str = (
        "assumptions, not measured: SD 2.1 base at 512 px, 25 steps, fp16 on one A10G about "
        "2.0 s per image; a per-user model's load 8 s; an adapter fetch + swap 0.2 s"
    )

    @property
    def models_per_instance(self) -> int:
        """Per-user pipelines that fit in GPU memory beside the working memory."""
        return max(int((self.gpu_memory_gb - self.working_memory_gb) // self.model_gb), 1)

    @property
    def adapters_per_instance(self) -> int:
        """Adapters that fit in GPU memory beside one base pipeline and the working memory."""
        free_gb = self.gpu_memory_gb - self.working_memory_gb - self.model_gb
        return max(int(free_gb * 1024 // self.adapter_mb), 1)


#: The g5 family's one-GPU sizes differ in CPUs and host memory, not in the GPU, so they serve
#: this model alike; the larger ones cost more for host memory this model does not use.
INSTANCES: dict[str, InstanceProfile] = {
    name: InstanceProfile(name) for name in ("ml.g5.xlarge", "ml.g5.2xlarge", "ml.g5.4xlarge")
}


#: AWS's personalized-avatar guidance: 1000 DreamBooth-LoRA steps of SD 2.1 at 512 px took
#: 1500 s on one ml.g5.xlarge, about $0.59.
AWS_TRAINING_BASIS = {
    "seconds": 1500.0,
    "steps": 1000,
    "instance_type": "ml.g5.xlarge",
    "dollars": 0.59,
    # the figure as issue 13 cites it; the post it comes from:
    "source": "https://aws.amazon.com/blogs/machine-learning/build-a-personalized-avatar-with-"
    "generative-ai-using-amazon-sagemaker/ (figure not re-checked from this machine)",
}
SD21_UNET_PARAMS = 865_910_724
SD21_LATENT_POSITIONS = 64 * 64


@dataclass(frozen=True)
class TrainingEstimate:
    """Training cost per onboarded user: an estimate, with its basis."""

    basis: str
    seconds_per_step: float
    steps: int
    seconds_per_user: float
    dollars_per_user: float


def training_cost(
    steps: int = 1000,
    local_seconds_per_step: float | None = None,
    local_unet_params: int | None = None,
    local_latent_positions: int | None = None,
    gpu_speedup: float = 150.0,
    cost: Price | None = None,
) -> list[TrainingEstimate]:
    """Estimates of one onboarding job's cost on ml.g5.xlarge.

    Always AWS's measured figure (1.5 s per step), scaled to `steps`. With a local measurement,
    also that measurement scaled by model size: seconds per step x (SD 2.1 UNet parameters x
    its 64x64 latent positions) / (the local UNet's parameters x its latent positions), divided
    by `gpu_speedup`, the A10G's speed over this machine's CPU on this work: an assumption
    (the FLOP ratio of the chips is about 1000x at peak; much of it is not reached on one
    image), so that row says more about the assumption than about the job.

    Args:
        steps (`int`, defaults to 1000): training steps per user.
        local_seconds_per_step (`float`, optional): measured here (`training_summary.json`).
        local_unet_params, local_latent_positions (`int`, optional): the measured model's size.
        gpu_speedup (`float`, defaults to 150): the assumed A10G / this CPU ratio.
        cost (`Price`, defaults to ml.g5.xlarge in us-east-1): the training price.
    """
    cost = cost or price("ml.g5.xlarge")
    per_hour = cost.training_per_hour
    aws_step = AWS_TRAINING_BASIS["seconds"] / AWS_TRAINING_BASIS["steps"]
    rows = [
        TrainingEstimate(
            "AWS's measured figure (1500 s / 1000 steps, SD 2.1, 512 px, ml.g5.xlarge), "
            "scaled to the steps",
            aws_step,
            steps,
            aws_step * steps,
            round(aws_step * steps * per_hour / 3600, 3),
        )
    ]
    if local_seconds_per_step and local_unet_params and local_latent_positions:
        size = (SD21_UNET_PARAMS * SD21_LATENT_POSITIONS) / (
            local_unet_params * local_latent_positions
        )
        step = local_seconds_per_step * size / gpu_speedup
        implied = local_seconds_per_step * size / aws_step
        rows.append(
            TrainingEstimate(
                f"this machine's {local_seconds_per_step:.3f} s/step x {size:,.0f} (model size) "
                f"/ {gpu_speedup:g} (assumed A10G speed-up; AWS's figure implies "
                f"{implied:,.0f}): an estimate",
                round(step, 3),
                steps,
                round(step * steps, 1),
                round(step * steps * per_hour / 3600, 3),
            )
        )
    return rows


def training_markdown(estimates: list[TrainingEstimate]) -> str:
    """`training_cost`'s rows as a markdown table."""
    lines = ["| basis | s / step | steps | s / user | $ / user |", "|---|---:|---:|---:|---:|"]
    for e in estimates:
        lines.append(
            f"| {e.basis} | {e.seconds_per_step:.3g} | {e.steps} | {e.seconds_per_user:,.0f} | "
            f"{e.dollars_per_user:.2f} |"
        )
    return "\n".join(lines)
