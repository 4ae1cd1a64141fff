"""Triton Python-backend model: one user's DreamBooth-LoRA on the shared base pipeline.

The model folder (`<name>/config.pbtxt`, `<name>/1/model.py`,
`<name>/1/pytorch_lora_weights.safetensors`) is what a user's `model.tar.gz` on the
multi-model endpoint holds. `initialize` loads the base pipeline named by the config parameter
`base_model` (a diffusers directory, a hub id where one is reachable, or an `s3://` folder,
which it copies to the instance once: `fetch_base_model`) and the user's LoRA from this
version folder; on a GPU it runs on CUDA in float16. It needs torch and diffusers in the
instance's Python (the workshop's serving image has them) or in the serving runtime named by
`runtime`; without them it fails saying so (`use_packages`).

Inputs (all but `prompt` optional, each of shape [1]): prompt, negative_prompt (BYTES),
num_inference_steps, width, height, num_images (INT32), guidance_scale (FP32), seed (INT64).
Their defaults and allowed values are `INPUTS` (and `MULTIPLE_OF`) below, the one definition:
the workshop's API takes its request bounds from this table (`helpers.domain.generation`), so
a request it accepts is one this model accepts.

Output `images`: BYTES of shape [num_images], each a PNG file. Image `i` is drawn from a CPU
generator seeded with `seed + i`, so it matches a one-image request with that seed (within a
few pixel levels: batched arithmetic rounds differently), and the same request gives the same
bytes. A bad input answers that request with an error naming the input, the value and
what is allowed; the other requests of the batch and the model carry on.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path, PurePosixPath

import numpy as np

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton, e.g. to test `parse_inputs`
    pb_utils = None

MAX_PROMPT_CHARS = 500
#: Every input's rule, defined here only: name -> (kind, default, low, high), where kind is
#: "text" (low and high bound its length in characters), "int" or "float" (inclusive bounds).
#: A default of None is decided at load time: guidance_scale is the config's
#: `default_guidance_scale`, width and height the base model's size (`prompt` has none: it is
#: required). The API derives its `GenerateRequest` bounds and defaults from this table.
INPUTS: dict[str, tuple[str, object, float | None, float | None]] = {
    "prompt": ("text", None, 1, MAX_PROMPT_CHARS),
    "negative_prompt": ("text", "", 0, MAX_PROMPT_CHARS),
    "num_inference_steps": ("int", 20, 1, 100),
    "guidance_scale": ("float", None, 0.0, 20.0),
    "seed": ("int", 0, 0, 2**31 - 1),
    "width": ("int", None, 64, 1024),
    "height": ("int", None, 64, 1024),
    "num_images": ("int", 1, 1, 4),
}
#: Inputs that must also be a multiple of this (image sides: the VAE's and UNet's strides).
MULTIPLE_OF: dict[str, int] = {"width": 8, "height": 8}

#: The most work one request may ask for, by the device the model runs on, in the units of
#: `work_units` (a config parameter `max_work`, where one is added, overrides it). The CPU
#: budget is under a minute of the tiny model on a 2-core machine (one torch thread) with
#: other work on it: measured, 4 ms a unit at 128-512 px (0.14 s a guided step at 128 px,
#: 1.9 s at 256 px; 36 s for one 512 px image of one guided step, decoding included), twice
#: that with five test runs beside it; 64 px requests, all allowed, take at most 22 s
#: (100 steps, 4 images, at that load). The CUDA budget admits four 512x512
#: images of 100 guided steps: about a minute of Stable Diffusion 2.1 on an ml.g5's A10G
#: (an estimate from published figures, not measured here).
WORK_BUDGETS: dict[str, int] = {"cpu": 12_000, "cuda": 3_276_800}
#: The image side whose one unguided denoising step is one work unit.
WORK_UNIT_SIDE = 64


def work_units(width: int, height: int, steps: int, images: int, guidance_scale: float) -> int:
    """What a generation costs: steps x images x (2 with guidance) x a step's cost at its size.

    A step of a `WORK_UNIT_SIDE`-square image costs 1; a larger step costs the square of its
    pixel ratio, since self-attention over the latent grid dominates (measured: each doubling of
    the side costs 11-20x). Guidance (`guidance_scale` > 1) runs the UNet twice per step.
    """
    ratio = max(1.0, width * height / WORK_UNIT_SIDE**2)
    guided = 2 if guidance_scale > 1 else 1
    return math.ceil(steps * images * guided * ratio**2)


def work_error(values: dict, budget: int) -> str | None:
    """None when `values` (width, height, num_inference_steps, num_images, guidance_scale)
    fit in `budget`; else why not and what fits (it starts with "work_too_large")."""
    width, height, images = values["width"], values["height"], values["num_images"]
    units = work_units(
        width, height, values["num_inference_steps"], images, values["guidance_scale"]
    )
    if units <= budget:
        return None
    per_step = work_units(width, height, 1, images, values["guidance_scale"])
    steps = budget // per_step
    if steps >= 1:
        fits = f"at {width}x{height} with {images} image(s), at most {steps} steps"
    else:
        side = max_side(budget, values["guidance_scale"])
        fits = f"even one step is too much at {width}x{height}; one image of at most {side}x{side}"
    return (
        f"work_too_large: {width}x{height} x {values['num_inference_steps']} steps x {images} "
        f"image(s) is {units} work units, over this endpoint's budget of {budget}; {fits}"
    )


def max_side(budget: int, guidance_scale: float) -> int:
    """The largest square side (a multiple of 8) of which one image of one step fits `budget`."""
    side = 8
    while work_units(side + 8, side + 8, 1, 1, guidance_scale) <= budget:
        side += 8
    return side


class InputError(ValueError):
    """A request input is missing, malformed or out of range (the message says which)."""


class Cancelled(Exception):
    """The request was cancelled while it ran (its client is gone): the work stops."""


def parse_inputs(
    raw: dict[str, np.ndarray | None], defaults: dict[str, object], max_work: int | None = None
) -> dict:
    """Check every input and fill in defaults; raise `InputError` naming the first bad one.

    Args:
        raw: input name -> the request's numpy array, or None when the request lacks it.
        defaults: values for the inputs whose default is decided at load time
            (`guidance_scale`, `width`, `height`).
        max_work (`int`, *optional*): the request's budget in `work_units`; unchecked if None.
    """
    unknown = sorted(set(raw) - set(INPUTS))
    if unknown:
        raise InputError(f"unknown inputs {unknown}; allowed: {sorted(INPUTS)}")
    values = {}
    for name, (kind, default, low, high) in INPUTS.items():
        array = raw.get(name)
        if array is None:
            if name == "prompt":
                raise InputError(f"prompt is required: {low}-{high} characters of text")
            values[name] = defaults.get(name, default)
            continue
        array = np.asarray(array)
        if array.size != 1:
            raise InputError(f"{name} must hold exactly one value, got shape {list(array.shape)}")
        values[name] = _check(name, kind, array.reshape(-1)[0], low, high)
    for name, step in MULTIPLE_OF.items():
        if values[name] is not None and values[name] % step:
            raise InputError(f"{name} must be a multiple of {step}, got {values[name]}")
    if max_work is not None:
        problem = work_error(values, max_work)
        if problem:
            raise InputError(problem)
    return values


def _check(name: str, kind: str, value, low, high):
    if kind == "text":
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(f"{name} must be UTF-8 text") from None
        if not isinstance(value, str):
            raise InputError(f"{name} must be text, got {type(value).__name__}")
        if not low <= len(value) <= high or (low and not value.strip()):
            raise InputError(f"{name} must be {low}-{high} characters, got {len(value)}")
        return value
    number = float(value)
    if not math.isfinite(number):
        raise InputError(f"{name} must be a finite number, got {value}")
    if kind == "int":
        if number != int(number):
            raise InputError(f"{name} must be a whole number, got {value}")
        number = int(number)
    if not low <= number <= high:
        raise InputError(f"{name} must be between {low} and {high}, got {value}")
    return number


def use_runtime(runtime: str) -> None:
    """Put the serving runtime's packages first on `sys.path` (nothing when `runtime` is "").

    On SageMaker the Triton image lacks torch and diffusers: the `runtime-*` model installs them
    on the instance in `<runtime>/site-packages`, with the base model in `<runtime>/base_model`
    (`model_code/triton_runtime/`). It must have been loaded on this instance first.
    """
    if not runtime:
        return
    if not (Path(runtime) / "runtime.json").is_file():
        raise RuntimeError(
            f"the serving runtime {runtime} is not installed on this instance: invoke its model "
            f"({Path(runtime).name}) once first; SageMakerEndpoint.prepare does"
        )
    packages = str(Path(runtime) / "site-packages")
    if packages not in sys.path:
        sys.path.insert(0, packages)


#: The packages this model imports that SageMaker's Triton image lacks (it has numpy).
SERVING_PACKAGES = ("torch", "diffusers", "transformers", "peft")


def use_packages(runtime: str, model: str = "this model") -> None:
    """`use_runtime`, then check that the serving packages import; else say how to get them.

    Raises:
        RuntimeError: a package is missing (named), with the two ways to serve this model: on
            the workshop's image, or after the serving runtime is loaded on this instance.
    """
    use_runtime(runtime)
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError as error:
        missing = [name for name in SERVING_PACKAGES if not _importable(name)]
        raise RuntimeError(
            f"model {model} cannot load: this instance's Python ({sys.prefix}) lacks "
            f"{', '.join(missing) or error.name} ({error}). Serve it on the workshop's image, "
            'which has them (serving_image="workshop" in the stack, '
            "model_code/serving_image/Dockerfile), or load the serving runtime on this "
            "instance first (SageMakerEndpoint.prepare) and package the model with its runtime"
        ) from None


def _importable(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# --------------------------------------------------------------------------- the base model

#: Where an `s3://` base model is copied on an instance, once (the config parameter
#: `base_cache` overrides it): `<BASE_CACHE>/<hash of its URI>/`.
BASE_CACHE = "/tmp/workshop-base"
#: Written last into a fetched base model: a folder without it is not complete.
BASE_COMPLETE = ".workshop-base.json"


def base_cache_folder(uri: str, cache_root: str | Path = BASE_CACHE) -> Path:
    """Where base model `uri` (an `s3://` folder) is kept on this instance."""
    bucket, prefix = _split_s3_folder(uri)
    digest = hashlib.sha256(f"s3://{bucket}/{prefix}".encode()).hexdigest()[:16]
    return Path(cache_root) / digest


def _split_s3_folder(uri: str) -> tuple[str, str]:
    """(bucket, prefix ending in "/" or empty) of an `s3://bucket/prefix/` URI."""
    if not uri.startswith("s3://"):
        raise ValueError(f"base_model must be an s3:// folder here, got {uri!r}")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"base_model {uri!r} names no bucket")
    return bucket, prefix.strip("/") + "/" if prefix.strip("/") else ""


def fetch_base_model(
    uri: str, cache_root: str | Path = BASE_CACHE, region: str = "", client=None
) -> tuple[Path, bool]:
    """Copy the base pipeline folder `uri` (`s3://bucket/prefix/`) to this instance, once.

    Every object under the prefix is downloaded (boto3, the instance's role) into a staging
    folder, renamed into place when whole and marked complete; under a file lock, so that of
    several models loading at once one fetches and the others wait and find it done. A folder
    left half-fetched by a process that died is fetched again.

    Args:
        uri (`str`): the base model's folder, `s3://bucket/prefix/`.
        cache_root (`str` or `Path`, defaults to `BASE_CACHE`): where fetched bases are kept.
        region (`str`, *optional*): the bucket's region (boto3's default when empty).
        client (*optional*): an S3 client to use instead of a new one.

    Returns:
        `tuple[Path, bool]`: the local folder, and whether this call downloaded it.

    Raises:
        FileNotFoundError: the prefix holds no objects, or no `model_index.json` (names `uri`).
        ValueError: `uri` is not an `s3://` folder, or a key would land outside the folder.
        OSError: the instance's disk cannot hold the base model (with the sizes).
    """
    bucket, prefix = _split_s3_folder(uri)
    target = base_cache_folder(uri, cache_root)
    if (target / BASE_COMPLETE).is_file():
        return target, False
    root = Path(cache_root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / BASE_COMPLETE).is_file():  # another process fetched it meanwhile
            return target, False
        if client is None:
            import boto3

            client = boto3.client("s3", region_name=region or None)
        started = time.perf_counter()
        objects = _list_base_objects(client, bucket, prefix, uri)
        needed = sum(size for _, _, size in objects)
        free = shutil.disk_usage(root).free
        if needed > free:
            raise OSError(
                f"base model {uri} is {needed / 1e9:.2f} GB, more than the {free / 1e9:.2f} GB "
                f"free in {root}: give the instance more disk, or set base_cache elsewhere"
            )
        staging = root / f".{target.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)  # an incomplete earlier attempt
        staging.mkdir()
        for key, relative, _ in objects:
            destination = staging / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, key, str(destination))
        info = {
            "uri": f"s3://{bucket}/{prefix}",
            "files": len(objects),
            "bytes": needed,
            "seconds": round(time.perf_counter() - started, 3),
            "pid": os.getpid(),
        }
        (staging / BASE_COMPLETE).write_text(json.dumps(info))
        staging.rename(target)
    return target, True


def _list_base_objects(client, bucket: str, prefix: str, uri: str) -> list[tuple[str, str, int]]:
    """(key, path relative to the folder, size) of every object under `prefix`."""
    from botocore.exceptions import ClientError

    objects = []
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            for item in page.get("Contents", []):
                key = item["Key"]
                relative = key[len(prefix) :]
                if not relative or relative.endswith("/"):  # a console's "folder" object
                    continue
                parts = PurePosixPath(relative).parts
                if relative.startswith("/") or ".." in parts or BASE_COMPLETE in parts:
                    raise ValueError(
                        f"base model {uri}: the key {key!r} would land outside its folder"
                    )
                objects.append((key, str(PurePosixPath(*parts)), int(item["Size"])))
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        raise FileNotFoundError(f"base model {uri} cannot be listed ({code}): {error}") from None
    if not objects:
        raise FileNotFoundError(
            f"base model {uri} holds no objects: upload the base pipeline folder there "
            "(model_index.json and its components), or name a hub id"
        )
    if not any(relative == "model_index.json" for _, relative, _ in objects):
        raise FileNotFoundError(
            f"base model {uri} has no model_index.json: it must be a diffusers pipeline folder"
        )
    return objects


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def model_parameters(args: dict) -> dict[str, str]:
    """The `parameters` of the model's config as plain strings."""
    config = json.loads(args["model_config"])
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def read_inputs(request, names) -> dict[str, np.ndarray | None]:
    """The request's tensors `names` as numpy arrays (None for each one it lacks)."""
    raw = {}
    for name in names:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        raw[name] = None if tensor is None else tensor.as_numpy()
    return raw


def error_response(message: str):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))


def failure_response(error: Exception):
    """The answer to a request whose generation failed for a reason other than its inputs."""
    message = f"generation failed: {type(error).__name__}: {error}"
    pb_utils.Logger.log_error(message)
    return error_response(message)


def _stop_if_cancelled(request):
    """A diffusers step callback that raises `Cancelled` once Triton marks `request` cancelled.

    Triton 2.51 marks a request cancelled when its gRPC client cancels it; its HTTP front end
    does not notice a client that hangs up (the work then runs to its bound, `WORK_BUDGETS`).
    """
    return stop_when_all_cancelled([getattr(request, "is_cancelled", None)])


def stop_when_all_cancelled(checks: list):
    """A diffusers step callback that raises `Cancelled` once every one of `checks` (a
    request's `is_cancelled`, or None for a request that cannot be cancelled) says so: one
    request's, or those of a batch that serves several."""

    def callback(pipe, step: int, timestep, tensors: dict) -> dict:
        if checks and all(check is not None and check() for check in checks):
            raise Cancelled(f"cancelled by its client after {step + 1} denoising steps")
        return tensors

    return callback


#: pipeline class -> its subclass whose execution device is its device (`on_one_device`)
_ONE_DEVICE_CLASSES: dict[type, type] = {}


def on_one_device(pipe):
    """`pipe`, told that it runs where its weights are.

    A diffusers pipeline works out its execution device on every use of `_execution_device`
    (several times a call) by looking for offloading hooks in every module of every component:
    measured on the tiny model, one-step requests took 51.3 ms without this and 45.4 ms with it
    (2 CPU cores, 120 alternating requests). A served pipeline is never offloaded, so its
    execution device is the device it was put on.
    """
    cls = type(pipe)
    if cls not in _ONE_DEVICE_CLASSES:
        device = property(lambda self: self.__dict__["_serving_device"], doc="Its one device.")
        _ONE_DEVICE_CLASSES[cls] = type(cls.__name__, (cls,), {"_execution_device": device})
    pipe.__dict__["_serving_device"] = pipe.device  # itself a walk over modules: once
    pipe.__class__ = _ONE_DEVICE_CLASSES[cls]
    return pipe


class TritonPythonModel:
    """Base pipeline + one user's LoRA; see the module docstring for inputs and outputs."""

    def initialize(self, args: dict) -> None:
        parameters = model_parameters(args)
        self.name = args.get("model_name", "this model")
        pipe = self.load_base(parameters)
        weights = Path(args["model_repository"]) / args["model_version"]
        pipe.load_lora_weights(str(weights), weight_name="pytorch_lora_weights.safetensors")
        self.use(pipe, parameters)

    def load_base(self, parameters: dict[str, str]):
        """The base pipeline named by `base_model` (a directory, a hub id, or an `s3://` folder
        fetched once per instance, `fetch_base_model`), on the CPU; sets the device and
        threads."""
        use_packages(parameters.get("runtime", ""), getattr(self, "name", "this model"))
        import torch
        from diffusers import StableDiffusionPipeline

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            # Every loaded model is its own process: torch's default of one thread per core
            # in each of them oversubscribes the CPU as soon as two models work at once.
            # 0: every core, for a model that has the machine to itself (the shared base)
            threads = int(parameters.get("cpu_threads", "1")) or os.cpu_count() or 1
            torch.set_num_threads(threads)
        dtype = torch.float16 if self.device == "cuda" else torch.float32
        base = parameters["base_model"]
        if base.startswith("s3://"):
            folder, fetched = fetch_base_model(
                base, parameters.get("base_cache") or BASE_CACHE, parameters.get("aws_region", "")
            )
            if pb_utils is not None:
                done = "fetched into" if fetched else "found in"
                pb_utils.Logger.log_info(f"base model {base}: {done} {folder}")
            base = str(folder)
        return StableDiffusionPipeline.from_pretrained(
            base,
            dtype=dtype,
            safety_checker=None,
            requires_safety_checker=False,
        )

    def use(self, pipe, parameters: dict[str, str]) -> None:
        """Serve with `pipe`: move it to the device and derive the input defaults from it."""
        pipe.set_progress_bar_config(disable=True)
        self.pipe = on_one_device(pipe.to(self.device))
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.defaults = {
            "guidance_scale": float(parameters.get("default_guidance_scale", "7.5")),
            "width": size,
            "height": size,
        }
        device = "cuda" if self.device == "cuda" else "cpu"
        self.max_work = int(parameters.get("max_work") or WORK_BUDGETS[device])

    def execute(self, requests: list) -> list:
        return [self.respond(request) for request in requests]

    def respond(self, request):
        """Exactly one response per request: its images, or an error naming what was wrong."""
        try:
            values = parse_inputs(read_inputs(request, INPUTS), self.defaults, self.max_work)
            images = self.generate(values, request)
            output = np.array([png_bytes(image) for image in images], dtype=np.object_)
            return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("images", output)])
        except (InputError, Cancelled) as error:
            return error_response(str(error))
        except Exception as error:  # one failed generation must not take the model down
            return failure_response(error)

    def generate(self, values: dict, request=None) -> list:
        """The images for checked `values`; stops between denoising steps once `request` is
        cancelled (`Cancelled`)."""
        count = values["num_images"]
        generators = [
            self.torch.Generator(device="cpu").manual_seed(values["seed"] + i) for i in range(count)
        ]
        with self.torch.inference_mode():
            result = self.pipe(
                [values["prompt"]] * count,
                negative_prompt=[values["negative_prompt"]] * count
                if values["negative_prompt"]
                else None,
                num_inference_steps=values["num_inference_steps"],
                guidance_scale=values["guidance_scale"],
                width=values["width"],
                height=values["height"],
                generator=generators,
                callback_on_step_end=None if request is None else _stop_if_cancelled(request),
            )
        return result.images

    def finalize(self) -> None:
        del self.pipe
        if self.device == "cuda":
            self.torch.cuda.empty_cache()
