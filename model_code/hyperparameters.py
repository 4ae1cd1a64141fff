"""The training hyperparameters, defined once: each one's type, bounds and default, and the
combinations of them that cannot train.

Everyone who checks a hyperparameter uses this file:

- `train_dreambooth_lora.py` (beside it) builds its command-line options from `HYPERPARAMETERS`
  and refuses a bad combination with `check`;
- the workshop library (`helpers.domain.hyperparameters` loads this file by path) refuses a
  training request with `check` before a job starts, so a job never starts only to exit on its
  arguments;
- the API (`helpers.api.schemas`) takes its bounds from `HYPERPARAMETERS`, narrowing some on
  purpose (its named product limits, which its tests keep within these).

Standard library only: it ships in the training job's source directory (SageMaker uploads
`model_code/` as `sourcedir.tar.gz`; local jobs run the script from `model_code/`), where the
script runs as `python train_dreambooth_lora.py` and so imports it as `import hyperparameters`.

Example:

    >>> import hyperparameters
    >>> hyperparameters.HYPERPARAMETERS["max_train_steps"].high
    10000
    >>> hyperparameters.check({"max_train_steps": 300, "lr_warmup_steps": 10})
    {'max_train_steps': 300, 'lr_warmup_steps': 10}
    >>> hyperparameters.check({"lr_warmup_steps": 300})
    Traceback (most recent call last):
    ...
    ValueError: hyperparameter lr_warmup_steps must be below max_train_steps (300, ...
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

__all__ = [
    "BOOLEAN",
    "COMBINATIONS",
    "DEFAULTS",
    "GROUPS",
    "HYPERPARAMETERS",
    "INTEGER",
    "MAX_STRING_CHARS",
    "NUMBER",
    "STRING",
    "Hyperparameter",
    "check",
    "parse_bool",
]

INTEGER, NUMBER, BOOLEAN, STRING = "integer", "number", "boolean", "string"
#: The longest text hyperparameter (a prompt); SageMaker allows 2500 characters per value.
MAX_STRING_CHARS = 500
#: The sections of the script's `--help`, in order.
GROUPS = ("prompts", "training", "checkpoints", "validation")
_TRUE = frozenset({"true", "1", "yes", "y", "on"})
_FALSE = frozenset({"false", "0", "no", "n", "off"})


def parse_bool(value: str | bool) -> bool:
    """A boolean from SageMaker's hyperparameter strings ("True"/"False") or the command line.

    Raises:
        ValueError: naming the accepted spellings.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"expected a boolean (True or False), got {value!r}")


@dataclass(frozen=True)
class Hyperparameter:
    """One hyperparameter of the training script.

    Args:
        kind (`str`): `INTEGER`, `NUMBER`, `BOOLEAN` or `STRING`.
        default: the script's value when none is given; None for the optional ones whose
            absence means something (see `help`).
        low, high (*optional*): a number's bounds, both included unless `low_open`.
        multiple_of (`int`, defaults to 1): an integer's step.
        low_open (`bool`, defaults to False): `low` itself is not allowed.
        choices (`tuple[str, ...]`, *optional*): a string's allowed values; without them, any
            text of 1 to `MAX_STRING_CHARS` characters that does not start with '-'.
        group (`str`, defaults to `"training"`): its section of the script's `--help`.
        help (`str`): what it does.
    """

    kind: str
    default: Any
    low: float | None = None
    high: float | None = None
    multiple_of: int = 1
    low_open: bool = False
    choices: tuple[str, ...] | None = None
    group: str = "training"
    help: str = ""

    def allowed(self) -> str:
        """What it accepts, in words: 'an integer from 1 to 10000', 'one of [...]', ..."""
        if self.kind == BOOLEAN:
            return "true or false"
        if self.kind == STRING:
            if self.choices:
                return f"one of {list(self.choices)}"
            return f"1-{MAX_STRING_CHARS} characters, not starting with '-'"
        if self.kind == INTEGER:
            multiple = f", a multiple of {self.multiple_of}" if self.multiple_of > 1 else ""
            return f"an integer from {self.low} to {self.high}{multiple}"
        return f"a number in {'(' if self.low_open else '['}{self.low}, {self.high}]"

    def problem(self, value: Any) -> str | None:
        """Why `value` is not allowed ('must be ..., got ...'), or None when it is."""
        if self.kind == BOOLEAN:
            return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
        if self.kind == STRING:
            return self._text_problem(value)
        if self.kind == INTEGER:
            if not isinstance(value, int) or isinstance(value, bool):
                return f"must be an integer, got {value!r}"
            if not self.low <= value <= self.high or value % self.multiple_of:
                multiple = f", a multiple of {self.multiple_of}" if self.multiple_of > 1 else ""
                return f"must be from {self.low} to {self.high}{multiple}, got {value!r}"
            return None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"must be a finite number, got {value!r}"
        if not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
        low_ok = value > self.low if self.low_open else value >= self.low
        if not low_ok or value > self.high:
            bracket = "(" if self.low_open else "["
            return f"must be in {bracket}{self.low}, {self.high}], got {value!r}"
        return None

    def _text_problem(self, value: Any) -> str | None:
        if not isinstance(value, str) or not value.strip():
            return f"must be a non-empty string, got {value!r}"
        if len(value) > MAX_STRING_CHARS:
            return f"must be at most {MAX_STRING_CHARS} characters, got {len(value)}"
        if value.lstrip().startswith("-"):
            # Hyperparameters reach the script as `--name value`: argparse reads a value that
            # starts with '-' as an option of its own.
            return f"must not start with '-', got {value!r}"
        if self.choices and value not in self.choices:
            return f"must be one of {list(self.choices)}, got {value!r}"
        return None

    def parse(self, text: str) -> Any:
        """The value of a command-line string (SageMaker passes every value as one).

        Raises:
            ValueError: saying what was expected or what is allowed (without the name).
        """
        value: Any = text
        if self.kind == BOOLEAN:
            value = parse_bool(text)
        elif self.kind == INTEGER:
            try:
                value = int(text)
            except ValueError:
                raise ValueError(f"expected an integer, got {text!r}") from None
        elif self.kind == NUMBER:
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"expected a number, got {text!r}") from None
        problem = self.problem(value)
        if problem:
            raise ValueError(problem)
        return value


def _int(low: int, high: int, default: int | None, help: str, **more: Any) -> Hyperparameter:
    return Hyperparameter(INTEGER, default, low, high, help=help, **more)


def _number(low: float, high: float, default: float, help: str, **more: Any) -> Hyperparameter:
    return Hyperparameter(NUMBER, default, low, high, help=help, **more)


def _bool(default: bool, help: str) -> Hyperparameter:
    return Hyperparameter(BOOLEAN, default, help=help)


def _text(default: str | None, help: str, **more: Any) -> Hyperparameter:
    return Hyperparameter(STRING, default, help=help, **more)


#: Every hyperparameter the script takes (its paths aside), in `--help` order.
HYPERPARAMETERS: Mapping[str, Hyperparameter] = MappingProxyType(
    {
        # prompts
        "instance_prompt": _text(
            "a photo of sks toy",
            "Prompt with the identifier that names the subject.",
            group="prompts",
        ),
        "class_prompt": _text(
            None, "Prompt for the subject's class, e.g. 'a photo of a toy'.", group="prompts"
        ),
        "validation_prompt": _text(
            None, "Prompt for validation images (default: --instance_prompt).", group="prompts"
        ),
        # training
        "with_prior_preservation": _bool(False, "Add the class-prior loss (needs --class_prompt)."),
        "prior_loss_weight": _number(0.0, 100.0, 1.0, "Weight of the class-prior loss."),
        "num_class_images": _int(
            1, 10000, 100, "Class images used (and generated if missing) for the prior."
        ),
        "sample_batch_size": _int(1, 64, 4, "Batch size when generating class images."),
        "resolution": _int(
            8,
            1024,
            64,
            "Training resolution in pixels (shorter side resized, centre crop).",
            multiple_of=8,
        ),
        "random_flip": _bool(False, "Flip training images horizontally at random."),
        "train_batch_size": _int(
            1, 64, 1, "Images per batch (gradient_accumulation_steps batches per step)."
        ),
        "gradient_accumulation_steps": _int(1, 64, 1, "Batches per optimizer step."),
        "max_train_steps": _int(1, 10000, 300, "Optimizer steps."),
        "learning_rate": _number(0.0, 1.0, 1e-3, "Peak learning rate.", low_open=True),
        "lr_scheduler": _text(
            "constant",
            "Learning-rate schedule.",
            choices=("constant", "constant_with_warmup", "linear", "cosine"),
        ),
        "lr_warmup_steps": _int(0, 10000, 0, "Warmup steps (below --max_train_steps)."),
        "adam_weight_decay": _number(0.0, 1.0, 1e-2, "AdamW weight decay."),
        "max_grad_norm": _number(0.0, 1e6, 1.0, "Gradient clipping norm.", low_open=True),
        "rank": _int(1, 128, 4, "LoRA rank (lora_alpha is the same, so the scale is 1)."),
        "lora_layers": _text(
            "attention",
            "UNet projections that get LoRA: every attention layer's, or only the "
            "cross-attention ones (the prompt's way in; the unconditional prediction that "
            "classifier-free guidance subtracts then moves less).",
            choices=("attention", "cross_attention"),
        ),
        "train_text_encoder": _bool(False, "Also train LoRA on the text encoder."),
        "seed": _int(0, 2**32 - 1, 0, "Seed of every random draw."),
        "mixed_precision": _text(
            "no",
            "fp16 needs CUDA (falls back to 'no' with a note without it).",
            choices=("no", "fp16", "bf16"),
        ),
        "gradient_checkpointing": _bool(False, "Trade compute for memory."),
        "cache_latents": _bool(
            True, "Encode the images with the (frozen) VAE once, not every step."
        ),
        "sample_latents": _bool(
            False,
            "Train on samples of the VAE posterior, as the diffusers example does, instead of "
            "its mean. The mean matches a base trained on means (the workshop's tiny model, "
            "whose VAE has a tiny KL weight and so a wide posterior); for SD's VAE the two are "
            "close.",
        ),
        "snr_gamma": _number(
            0.0,
            100.0,
            5.0,
            "Min-SNR loss weighting (Hang et al. 2023) with this gamma, as the workshop's base "
            "model was trained; 0 turns it off (plain MSE, the diffusers example's default).",
        ),
        # checkpoints
        "checkpointing_steps": _int(
            0, 10000, 0, "Save a checkpoint every N steps (0: never).", group="checkpoints"
        ),
        "checkpoints_total_limit": _int(
            1,
            1000,
            None,
            "Keep at most this many checkpoints (oldest removed; default: all).",
            group="checkpoints",
        ),
        # validation
        "num_validation_images": _int(
            0, 64, 4, "Validation images drawn after training.", group="validation"
        ),
        "num_inference_steps": _int(
            1, 500, 20, "Denoising steps of each validation image.", group="validation"
        ),
        "guidance_scale": _number(
            0.0, 50.0, 5.0, "Guidance scale of the validation images.", group="validation"
        ),
    }
)

#: The script's value of each hyperparameter that a request leaves out.
DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {name: rule.default for name, rule in HYPERPARAMETERS.items()}
)


# --------------------------------------------------------------------------------------------
# Combinations: each takes the values (every hyperparameter, a missing one at its default), the
# names that were given, and how to name a hyperparameter; it answers why the combination
# cannot train, or None.
# --------------------------------------------------------------------------------------------

Namer = Callable[[str], str]
Given = Collection[str]


def _warmup_ends_before_training(
    values: Mapping[str, Any], given: Given, name: Namer
) -> str | None:
    warmup, steps = values["lr_warmup_steps"], values["max_train_steps"]
    if not warmup or warmup < steps:
        return None
    default = "" if "max_train_steps" in given else ", the script's default"
    return (
        f"{name('lr_warmup_steps')} must be below {name('max_train_steps')} ({steps}{default}), "
        f"got {warmup!r}: the warmup must end before training does; lower "
        f"{name('lr_warmup_steps')} or raise {name('max_train_steps')}"
    )


def _prior_needs_class_prompt(values: Mapping[str, Any], given: Given, name: Namer) -> str | None:
    if not values["with_prior_preservation"] or values["class_prompt"]:
        return None
    return (
        f"{name('with_prior_preservation')} needs {name('class_prompt')} (the prompt of the "
        "subject's class, e.g. 'a photo of a toy', whose images keep the prior), got no "
        f"{name('class_prompt')}: set {name('class_prompt')}, or "
        f"{name('with_prior_preservation')} to false"
    )


def _limit_needs_checkpoints(values: Mapping[str, Any], given: Given, name: Namer) -> str | None:
    every = values["checkpointing_steps"]
    if values["checkpoints_total_limit"] is None or every:
        return None
    high = HYPERPARAMETERS["checkpointing_steps"].high
    return (
        f"{name('checkpoints_total_limit')} needs {name('checkpointing_steps')} from 1 to "
        f"{high} (checkpoints are saved every {name('checkpointing_steps')} steps), got "
        f"{name('checkpointing_steps')} {every!r}: set {name('checkpointing_steps')}, or "
        f"leave {name('checkpoints_total_limit')} out"
    )


#: The combinations the script refuses: warmup must end before training does, prior
#: preservation needs a class prompt, a checkpoint limit needs checkpoints.
COMBINATIONS: tuple[Callable[[Mapping[str, Any], Given, Namer], str | None], ...] = (
    _warmup_ends_before_training,
    _prior_needs_class_prompt,
    _limit_needs_checkpoints,
)


def check(hyperparameters: Mapping[str, Any], *, flags: bool = False) -> dict[str, Any]:
    """Return a copy of `hyperparameters` if every name is known, every value allowed and
    the combination one the script can train with (a name left out counts at its default).

    Args:
        hyperparameters (`Mapping[str, Any]`): name -> value, typed (not command-line text).
        flags (`bool`, defaults to False): name them as the script's options (`--rank`)
            rather than as hyperparameters (`hyperparameter rank`).

    Raises:
        ValueError: naming the unknown keys, or the hyperparameter, its value and what is
            allowed, or the hyperparameters of a combination, why it cannot work and what would.
    """
    if not isinstance(hyperparameters, Mapping):
        raise ValueError(f"hyperparameters must be a dict, got {type(hyperparameters).__name__}")
    unknown = sorted(set(hyperparameters) - set(HYPERPARAMETERS))
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {unknown}; known: {sorted(HYPERPARAMETERS)}")
    name: Namer = (lambda n: f"--{n}") if flags else (lambda n: n)
    prefix = "" if flags else "hyperparameter "
    for key, value in hyperparameters.items():
        problem = HYPERPARAMETERS[key].problem(value)
        if problem:
            raise ValueError(f"{prefix}{name(key)} {problem}")
    values = {**DEFAULTS, **hyperparameters}
    for rule in COMBINATIONS:
        problem = rule(values, hyperparameters.keys(), name)
        if problem:
            raise ValueError(f"{prefix}{problem}")
    return dict(hyperparameters)
