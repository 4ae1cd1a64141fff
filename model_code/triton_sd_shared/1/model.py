"""Triton Python-backend model: every user's DreamBooth-LoRA on one resident base pipeline.

The per-user model (`triton_sd`) is a whole pipeline per user, each in its own Triton process.
This model loads the base pipeline once; each request names the user's adapter (their LoRA,
`<user_id>--<model_id>`), which is

1. taken from an LRU cache bounded by count and by bytes, or on a miss fetched from the
   adapter store (`<adapter_source>/<name>.safetensors`: a directory, or an `s3://` prefix
   read with boto3 and the endpoint's role) and checked once. The cache keeps each file's
   bytes, tensors being zero-copy views into them, so a cached user costs their file's size;
2. put into the pipeline's one LoRA slot, unless it is the adapter there already. The slot is
   made by diffusers (`enable_lora_hotswap(target_rank=hotswap_rank)`, then
   `load_lora_weights`); later adapters are hot-swapped into it in place by copying their
   weights into the slot's parameters (about 1 ms on the tiny model; diffusers'
   `load_lora_weights(..., hotswap=True)`, the fallback, spends about 20 ms walking the UNet
   on every call). Where a hot-swap cannot apply (text-encoder LoRA, a rank above the slot's,
   layers the slot lacks) the slot is unloaded and loaded again.

So a user's cold start is an adapter fetch and swap, not a pipeline load, and no per-user
process or pipeline exists. Adapter names carry the model id and model ids are never reused,
so an adapter's bytes never change under its name and the cache never serves a stale one.

Inputs, defaults, bounds and the `images` output are the per-user model's (see
`triton_sd/1/model.py`, shipped beside this file as `triton_sd_model.py`, whose `parse_inputs`
and `generate` this model uses), plus:

| name | type | allowed |
|---|---|---|
| adapter | BYTES | `<user_id>--<model_id>`, a-z 0-9 `-` `_`; required |

and one more output, sent only when a request asks for it: `adapter_cache` (BYTES, "hit" or
"miss"). An unknown or unusable adapter fails that request with an error naming it; the model
carries on.

Adapters are applied at scale 1: where the file's LoRA metadata has `lora_alpha != r` (or an
alpha pattern, or rsLoRA), the scale is folded into the up (B) weights, so that the picture is
the one the per-user model draws from the file with its metadata.

Batches that mix users (packaged with `max_batch_size` > 1, which turns on Triton's dynamic
batcher): `execute` gets up to that many requests at once, and `BatchedGenerator` denoises
those that share steps, size and guidance (`batch_key`) together, one UNet pass per step for
all of them, each sample applying its own user's adapter, held with others at once as named
PEFT adapters (`AdapterPool`), through batched matmuls (`GroupedAdapters`, the default) or
peft's mixed-batch forward (`MixedAdapters`). Each request is answered through its response
sender as soon as its batch is done; a cold user's adapter is fetched while the warm users'
batch denoises. The pool owns the pipeline's LoRA layers, so a batching model has no hot-swap
slot. Either way each request is one sample: inputs of shape [1, 1], `images` [1, n].
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import struct
import threading
import time
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from pathlib import Path

import numpy as np


def _load_per_user_model():
    """`triton_sd/1/model.py`: shipped beside this file, or found in the source tree."""
    here = Path(__file__).resolve().parent
    for path in (here / "triton_sd_model.py", here.parents[1] / "triton_sd" / "1" / "model.py"):
        if path.is_file():
            spec = importlib.util.spec_from_file_location("triton_sd_model", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    raise ImportError(f"triton_sd_model.py is missing beside {__file__}")


sd = _load_per_user_model()
pb_utils = sd.pb_utils
InputError = sd.InputError
parse_inputs = sd.parse_inputs

ADAPTER_RE = re.compile(r"^[a-z0-9_-]{1,64}--[a-z0-9_-]{1,64}$")
ADAPTER_SUFFIX = ".safetensors"
#: The name of the pipeline's one LoRA slot.
SLOT = "user"
#: (up, down) markers of LoRA weight names: diffusers, peft, and diffusers' text-encoder form.
_MARKERS = ((".lora.up.", ".lora.down."), (".lora_B.", ".lora_A."))
_MARKERS += ((".lora_linear_layer.up.", ".lora_linear_layer.down."),)


class AdapterNotFound(InputError):
    """No adapter of that name in the adapter store."""


class AdapterError(InputError):
    """The adapter's file is not a LoRA this model can apply (the message says why)."""


def parse_adapter(array: np.ndarray | None) -> str:
    """The adapter name of a request's `adapter` input; `InputError` naming what is wrong."""
    if array is None:
        raise InputError("adapter is required: the user's model name '<user_id>--<model_id>'")
    array = np.asarray(array)
    if array.size != 1:
        raise InputError(f"adapter must hold exactly one value, got shape {list(array.shape)}")
    value = array.reshape(-1)[0]
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if not isinstance(value, str) or not ADAPTER_RE.match(value):
        raise InputError(
            "adapter must look like '<user_id>--<model_id>' (a-z, 0-9, '-', '_'), "
            f"got {str(value)[:80]!r}"
        )
    return value


# --------------------------------------------------------------------------- adapter store


class DirectorySource:
    """Adapters as files `<directory>/<name>.safetensors` (the local artifact store)."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def fetch(self, name: str) -> bytes:
        try:
            return (self.directory / f"{name}{ADAPTER_SUFFIX}").read_bytes()
        except FileNotFoundError:
            raise _unknown(name) from None

    def __str__(self) -> str:
        return str(self.directory)


class S3Source:
    """Adapters as objects `s3://<bucket>/<prefix><name>.safetensors`, read with boto3."""

    def __init__(self, uri: str, region: str | None = None) -> None:
        import boto3

        self.bucket, _, prefix = uri[len("s3://") :].partition("/")
        self.prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
        self.client = boto3.client("s3", region_name=region or None)

    def fetch(self, name: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            answer = self.client.get_object(
                Bucket=self.bucket, Key=f"{self.prefix}{name}{ADAPTER_SUFFIX}"
            )
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                raise _unknown(name) from None
            raise
        return answer["Body"].read()

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def _unknown(name: str) -> AdapterNotFound:
    return AdapterNotFound(
        f"unknown adapter {name!r}: no such model is registered on this endpoint"
    )


def open_adapter_source(source: str, region: str = "", model: str = "this model"):
    """The adapter store named by the config parameter `adapter_source`."""
    if source.startswith("s3://") and len(source) > len("s3://"):
        return S3Source(source, region or None)
    if source and Path(source).is_dir():
        return DirectorySource(source)
    raise ValueError(
        f"model {model}: adapter_source must be an existing directory or an s3:// prefix, "
        f"got {source!r}"
    )


# --------------------------------------------------------------------------- adapters


#: safetensors dtype names -> torch dtype names
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
#: Tensor layouts (names, dtypes, shapes, offsets) seen so far: adapters trained with the same
#: recipe share one, so a cached adapter costs its file's bytes and little more.
_LAYOUTS: dict[tuple, tuple] = {}


class Adapter:
    """One user's LoRA, as its file's bytes plus where each tensor is in them.

    Kept as the file's bytes (`data`), not as tensors: a tensor object costs about as much as
    the few kilobytes of a small LoRA layer, which would double the memory of each cached
    adapter. `tensor(key)` is a zero-copy view into the bytes, at scale 1.

    Args:
        name (`str`): `<user_id>--<model_id>`.
        data (`bytes`): the safetensors file.
        layout (`tuple`): `(key, dtype, shape, start, end)` per tensor, offsets from `base`.
        base (`int`): where the tensors' bytes start in `data`.
        scales (`dict[str, float]`): factors of the up weights whose layer's scale is not 1.
        rank (`int`): the largest LoRA rank among its layers.
        text_encoder (`bool`): whether it has text-encoder layers (those cannot be hot-swapped).
    """

    # a plain class: dataclasses need the module in sys.modules, which Triton's stub may not do
    __slots__ = ("base", "data", "layout", "name", "rank", "scales", "text_encoder")

    def __init__(self, name, data, layout, base, scales, rank, text_encoder) -> None:
        self.name = name
        self.data = data
        self.layout = layout
        self.base = base
        self.scales = scales
        self.rank = rank
        self.text_encoder = text_encoder

    @property
    def nbytes(self) -> int:
        return len(self.data)

    @property
    def keys(self) -> frozenset[str]:
        return _layout_keys(self.layout)

    def tensor(self, key: str):
        """Tensor `key` at scale 1: a read-only view into `data` (or a scaled copy)."""
        import warnings

        import torch

        _, dtype, shape, start, end = self._entries()[key]
        dtype = getattr(torch, _DTYPES[dtype])
        with warnings.catch_warnings():  # bytes are read-only; nothing writes to the view
            warnings.simplefilter("ignore", UserWarning)
            count = (end - start) // torch.empty((), dtype=dtype).element_size()
            view = torch.frombuffer(self.data, dtype=dtype, count=count, offset=self.base + start)
        view = view.view(shape)
        scale = self.scales.get(key)
        return view if scale is None else view * scale

    @property
    def state_dict(self) -> dict:
        """Every tensor at scale 1, as `load_lora_weights` takes them."""
        return {key: self.tensor(key) for key in self._entries()}

    def _entries(self) -> dict:
        return _layout_entries(self.layout)


#: id of an interned layout -> (key -> its entry, the keys)
_LAYOUT_INDEX: dict[int, tuple[dict, frozenset]] = {}


def _layout_index(layout: tuple) -> tuple[dict, frozenset]:
    index = _LAYOUT_INDEX.get(id(layout))
    if index is None:  # interned layouts live as long as the process, so their ids stay theirs
        entries = {entry[0]: entry for entry in layout}
        index = _LAYOUT_INDEX[id(layout)] = (entries, frozenset(entries))
    return index


def _layout_entries(layout: tuple) -> dict:
    return _layout_index(layout)[0]


def _layout_keys(layout: tuple) -> frozenset[str]:
    return _layout_index(layout)[1]


def read_safetensors(data: bytes) -> tuple[tuple, int, dict[str, str]]:
    """(layout, where the tensors start, `__metadata__`) of a safetensors file's bytes; the
    layout is `(key, dtype, shape, start, end)` per tensor, sorted by key and interned."""
    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8:
        raise ValueError(f"header of {length} bytes in a file of {len(data)}")
    header = json.loads(data[8 : 8 + length])
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + length
    layout = []
    for key, entry in sorted(header.items()):
        start, end = entry["data_offsets"]
        shape = tuple(int(n) for n in entry["shape"])
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"{key} has dtype {entry['dtype']}; LoRA weights are floats")
        itemsize = {"F64": 8, "F32": 4}.get(entry["dtype"], 2)
        if not 0 <= start <= end <= len(data) - base or end - start != math.prod(shape) * itemsize:
            raise ValueError(f"{key}'s offsets {start}-{end} do not fit its shape or the file")
        layout.append((key, entry["dtype"], shape, start, end))
    layout = tuple(layout)
    return _LAYOUTS.setdefault(layout, layout), base, metadata


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's header (empty when it has none)."""
    return read_safetensors(data)[2]


def lora_configs(metadata: dict[str, str]) -> dict[str, dict]:
    """diffusers' LoRA metadata (`lora_adapter_metadata`) per component: {"unet": {...}}."""
    raw = metadata.get("lora_adapter_metadata")
    configs: dict[str, dict] = {}
    for key, value in (json.loads(raw) if raw else {}).items():
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    return configs


def _pattern_value(patterns: dict, module: str, default):
    # peft's get_pattern_key: a pattern matches a module name that ends in it
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def prepare_adapter(name: str, data: bytes) -> Adapter:
    """Check an adapter file's bytes and work out each layer's scale; see `Adapter`.

    Loaded from a state dict, diffusers takes every layer's scale as 1 (alpha = rank); loaded
    from the file, it reads `lora_alpha`, `alpha_pattern` and `use_rslora` from the file's
    metadata. Multiplying each up (B) weight by its layer's scale makes the two agree.

    Raises:
        AdapterError: the bytes are not a safetensors LoRA, or it is a DoRA.
    """
    try:
        layout, base, metadata = read_safetensors(data)
        configs = lora_configs(metadata)
    except Exception as error:
        raise AdapterError(f"adapter {name!r} is not a readable LoRA file: {error}") from None
    entries = _layout_entries(layout)
    if not entries or not all("lora" in key for key in entries):
        raise AdapterError(f"adapter {name!r} is not a LoRA: its weight names lack 'lora'")
    if any(config.get("use_dora") for config in configs.values()):
        raise AdapterError(f"adapter {name!r} is a DoRA, which the shared base cannot swap")
    ranks, scales = [], {}
    for key in entries:
        for up, down in _MARKERS:
            if up not in key:
                continue
            down_key = key.replace(up, down)
            if down_key not in entries:
                raise AdapterError(f"adapter {name!r} has {key} without {down_key}")
            rank = entries[down_key][2][0]
            ranks.append(rank)
            component, _, rest = key.partition(".")
            config = configs.get(component)
            if config:
                module = rest[: rest.index(up)]
                alpha = _pattern_value(config.get("alpha_pattern"), module, None)
                alpha = config.get("lora_alpha", rank) if alpha is None else alpha
                scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
                if scale != 1:
                    scales[key] = scale
            break
    if not ranks:
        raise AdapterError(f"adapter {name!r} has no LoRA up/down weight pairs")
    return Adapter(
        name=name,
        data=data,
        layout=layout,
        base=base,
        scales=scales or _NO_SCALES,
        rank=max(ranks),
        text_encoder=any(key.startswith(("text_encoder", "lora_te")) for key in entries),
    )


_NO_SCALES: dict[str, float] = {}


class AdapterCache:
    """Prepared adapters by name, least recently used first, bounded by count and bytes.

    Args:
        source: where adapters are fetched from on a miss (`fetch(name) -> bytes`).
        max_count (`int`): the most adapters held.
        max_bytes (`int`): the most bytes of weights held.
    """

    def __init__(self, source, max_count: int, max_bytes: int) -> None:
        if max_count < 1 or max_bytes < 1:
            raise ValueError(f"cache limits must be >= 1, got {max_count} and {max_bytes}")
        self.source = source
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, Adapter] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self.fetch_seconds = 0.0
        # a batch fetches cold adapters in threads while it denoises: the bookkeeping is
        # shared, the fetches themselves run outside the lock
        self.lock = threading.Lock()

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def get(self, name: str) -> tuple[Adapter, bool]:
        """The adapter `name` and whether it was cached; fetched and prepared on a miss."""
        with self.lock:
            adapter = self.entries.get(name)
            if adapter is not None:
                self.entries.move_to_end(name)
                self.hits += 1
                return adapter, True
        started = time.perf_counter()
        adapter = prepare_adapter(name, self.source.fetch(name))
        if adapter.nbytes > self.max_bytes:
            raise AdapterError(
                f"adapter {name!r} holds {adapter.nbytes} bytes of weights, more than the "
                f"adapter cache's {self.max_bytes} (adapter_cache_max_bytes)"
            )
        with self.lock:
            self.fetch_seconds += time.perf_counter() - started
            self.misses += 1
            if name not in self.entries:
                self.entries[name] = adapter
                self.bytes += adapter.nbytes
            while len(self.entries) > self.max_count or self.bytes > self.max_bytes:
                _, evicted = self.entries.popitem(last=False)
                self.bytes -= evicted.nbytes
                self.evictions += 1
        return adapter, False


class AdapterSlot:
    """The pipeline's one LoRA slot: which adapter it holds, and how to put another there.

    Args:
        pipe: a diffusers pipeline with `load_lora_weights` (Stable Diffusion's).
        rank (`int`): the rank the slot is padded to, so that adapters of any rank up to it
            hot-swap in; a larger one makes the slot reload at that rank.
    """

    def __init__(self, pipe, rank: int) -> None:
        if rank < 1:
            raise ValueError(f"hotswap_rank must be >= 1, got {rank}")
        self.pipe = pipe
        self.rank = rank
        self.slot_rank = rank
        self.active: str | None = None
        self.keys: frozenset[str] | None = None  # weight names the slot has layers for
        self.text_encoder = False
        self.shapes: dict[str, tuple] = {}  # UNet weight name -> shape, of every adapter seen
        # weight name -> the slot's parameter, where a swap is a plain copy (see `_copy_in`)
        self.params: dict | None = None
        self.hotswaps = self.loads = 0
        self.swap_seconds = 0.0
        self.last = ""

    def activate(self, adapter: Adapter) -> str:
        """Make `adapter` the one the pipeline applies: "active" (it was), "hotswap" or "load"
        (also kept in `last`)."""
        self.last = self._activate(adapter)
        return self.last

    def _activate(self, adapter: Adapter) -> str:
        if adapter.name == self.active:
            return "active"
        self.active = None  # until the swap is through, the slot holds no one's adapter
        started = time.perf_counter()
        try:
            if self._can_hotswap(adapter):
                try:
                    if self.params is not None:
                        self._copy_in(adapter)
                    else:
                        self.pipe.load_lora_weights(
                            dict(adapter.state_dict), adapter_name=SLOT, hotswap=True
                        )
                except (RuntimeError, ValueError, TypeError) as error:
                    # the slot may be half swapped: load it afresh below
                    _log_warning(f"hot-swap of {adapter.name!r} failed, reloading: {error}")
                else:
                    self.hotswaps += 1
                    self.active = adapter.name
                    return "hotswap"
            self._load(adapter)
            return "load"
        finally:
            self.swap_seconds += time.perf_counter() - started

    def _copy_in(self, adapter: Adapter) -> None:
        """Hot-swap by copying: what peft's `hotswap_adapter_from_state_dict` does (zero the
        slot's layers the adapter lacks, copy the others in, rank-padded), without its
        per-call walk over every module and parameter of the UNet (about 20 ms on the tiny
        model, as much as a 1-step generation). Scales need no update: the slot's and every
        prepared adapter's are 1."""
        _copy_weights(self.params, adapter)

    def _can_hotswap(self, adapter: Adapter) -> bool:
        return (
            self.keys is not None
            and not self.text_encoder
            and not adapter.text_encoder
            and adapter.keys <= self.keys
            and adapter.rank <= self.slot_rank
        )

    def _load(self, adapter: Adapter) -> None:
        self.clear()
        # the largest rank seen so far: adapters of alternating ranks then swap, not reload
        self.slot_rank = max(self.slot_rank, adapter.rank)
        # Pads the UNet's LoRA layers to `slot_rank` at the load below, so later adapters of
        # other ranks swap in place (and scales become tensors that a swap can set).
        self.pipe.enable_lora_hotswap(target_rank=self.slot_rank)
        # A copy: a parameter sharing memory with a cached adapter would be overwritten by the
        # next hot-swap, and the cache would then hand out another user's weights.
        weights = {key: value.clone() for key, value in adapter.state_dict.items()}
        if not adapter.text_encoder:
            # Zero weights for the layers of earlier adapters that this one lacks: they add
            # exactly nothing, and the slot then has every layer seen so far, so an adapter
            # on other layers (e.g. cross-attention only) swaps in later instead of reloading.
            # (At this adapter's rank, so that the slot's layers share one rank, as hot-swaps
            # of adapters without per-layer ranks require.)
            style = _style(weights)
            like = next(iter(weights.values()))
            for key, shape in self.shapes.items():
                if key not in weights and _style((key,)) == style:
                    weights[key] = like.new_zeros(_with_rank(key, shape, adapter.rank))
            self.shapes.update({key: tuple(value.shape) for key, value in weights.items()})
        try:
            self.pipe.load_lora_weights(weights, adapter_name=SLOT)
        except Exception as error:
            self.clear()
            raise AdapterError(
                f"adapter {adapter.name!r} does not fit this base model: {error}"
            ) from None
        self.keys = frozenset(weights)
        self.text_encoder = adapter.text_encoder
        self.params = self._map_parameters()
        self.loads += 1
        self.active = adapter.name

    def _map_parameters(self) -> dict | None:
        """Weight name -> the UNet's slot parameter it goes into, if every weight of the slot
        has one and every slot layer's scale is 1; else None (swaps then go through diffusers'
        `load_lora_weights(..., hotswap=True)`)."""
        if self.text_encoder:
            return None
        params = _unet_lora_parameters(self.pipe.unet, self.keys, SLOT)
        if params is None:
            return None
        for module in self.pipe.unet.modules():
            scaling = getattr(module, "scaling", None)
            if isinstance(scaling, dict) and SLOT in scaling and float(scaling[SLOT]) != 1.0:
                return None
        return params

    def clear(self) -> None:
        """Remove every LoRA layer: the pipeline is the bare base model again."""
        if self.keys is not None or getattr(self.pipe.unet, "peft_config", None):
            self.pipe.unload_lora_weights()
        self.keys = None
        self.params = None
        self.text_encoder = False
        self.active = None


def _style(keys) -> int | None:
    """Which of `_MARKERS`' naming styles the weight names use (None: none or mixed)."""
    markers = enumerate(_MARKERS)
    styles = {i for i, (up, down) in markers for key in keys if up in key or down in key}
    return styles.pop() if len(styles) == 1 else None


def _with_rank(key: str, shape: tuple, rank: int) -> tuple:
    """`shape` of LoRA weight `key` with its rank dimension set to `rank`."""
    up = any(pair[0] in key for pair in _MARKERS)
    return (shape[0], rank, *shape[2:]) if up else (rank, *shape[1:])


def _log_warning(message: str) -> None:
    if pb_utils is not None:
        pb_utils.Logger.log_warn(message)


def _positive_int(parameters: dict[str, str], key: str, default: int, model: str) -> int:
    value = parameters.get(key, "") or str(default)
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(f"model {model}: {key} must be a whole number >= 1, got {value!r}")
    return number


def _unet_lora_parameters(unet, keys, adapter_name: str) -> dict | None:
    """Weight name (diffusers' `unet.<module>.lora.up.weight` style) -> the UNet's peft
    parameter of adapter `adapter_name` it goes into; None when one has no such parameter."""
    named = dict(unet.named_parameters())
    params = {}
    for key in keys:
        component, _, rest = key.partition(".")
        found = [(up, "B") for up, _ in _MARKERS if up in rest]
        found += [(down, "A") for _, down in _MARKERS if down in rest]
        if component != "unet" or len(found) != 1:
            return None
        marker, kind = found[0]
        param = named.get(f"{rest[: rest.index(marker)]}.lora_{kind}.{adapter_name}.weight")
        if param is None:
            return None
        params[key] = param
    return params


# --------------------------------------------------------------------------- mixed batches

#: The adapter name peft's mixed-batch forward takes for "no adapter": the bare base model.
BASE = "__base__"


def batch_key(values: dict) -> tuple:
    """What requests must share to be denoised in one batch (the grouping rule).

    The step count (one timestep schedule drives the whole batch), width and height (one latent
    tensor) and guidance scale (with guidance > 1 the UNet runs on the doubled batch, and the
    guided combination takes one scale). Prompts, negative prompts, seeds, image counts and
    adapters may differ.
    """
    return (
        values["num_inference_steps"],
        values["width"],
        values["height"],
        values["guidance_scale"],
    )


class _PoolSlot:
    """One of `AdapterPool`'s PEFT adapters: its name on the pipeline and what it holds."""

    __slots__ = ("adapter", "keys", "name", "params", "rank", "text_encoder")

    def __init__(self, name: str) -> None:
        self.name = name
        self.adapter: str | None = None  # the user adapter it holds
        self.keys: frozenset[str] | None = None  # its weight names; None: not on the pipeline
        self.rank = 0
        self.text_encoder = False
        self.params: dict | None = None  # weight name -> parameter, where a copy applies


class AdapterPool:
    """Several users' adapters resident on one pipeline at once, as named PEFT adapters.

    `AdapterSlot` holds one adapter and serves one request at a time. The pool holds `size`
    PEFT adapters (`pool0`, `pool1`, ...) on the pipeline's LoRA layers, so that one batch can
    mix users: each sample names its slot and peft's mixed-batch forward applies each sample's
    own (`MixedAdapters`). An adapter already in a slot costs nothing; another goes into the
    least recently used slot the batch does not need: copied into its parameters where it fits
    (about 1 ms on the tiny model, as `AdapterSlot._copy_in`), or else (text-encoder layers, a
    rank above the slot's, layers the slot lacks) the slot's PEFT adapter is deleted and the
    adapter loaded under its name, zero-padded to the pool's rank and to every UNet layer seen
    so far, so that later adapters copy in. A UNet adapter's load also sets up every slot not
    yet set up, with the same layers at zero: the pool's slow loads then happen together, on
    its first adapter, instead of one per slot in the batches that follow.

    Args:
        pipe: a diffusers pipeline with `load_lora_weights` (Stable Diffusion's).
        size (`int`): how many adapters are resident at once: the most distinct adapters in
            one batch.
        rank (`int`): the rank slots are padded to (a larger adapter's slot takes its rank).

    Raises:
        ValueError: `size` or `rank` is below 1.
    """

    def __init__(self, pipe, size: int, rank: int) -> None:
        if size < 1 or rank < 1:
            raise ValueError(f"pool size and rank must be >= 1, got {size} and {rank}")
        self.pipe = pipe
        self.size = size
        self.rank = rank
        self.slots = [_PoolSlot(f"pool{i}") for i in range(size)]
        self.resident: OrderedDict[str, _PoolSlot] = OrderedDict()  # least recently used first
        self.shapes: dict[str, tuple] = {}  # UNet weight name -> shape, of every adapter seen
        self.copies = self.loads = 0
        self.swap_seconds = 0.0
        self.version = 0  # counts changes to the pipeline's set of LoRA layers

    def place(self, adapter: Adapter, keep=frozenset()) -> str:
        """The PEFT adapter name under which `adapter` is on the pipeline, putting it there if
        it is not, in a slot holding none of the adapters named in `keep`.

        Raises:
            AdapterError: the adapter does not fit the base model (its slot is then empty).
            ValueError: every slot holds an adapter of `keep`.
        """
        slot = self.resident.get(adapter.name)
        if slot is not None:
            self.resident.move_to_end(adapter.name)
            return slot.name
        slot = self._free_slot(keep)
        if slot.adapter is not None:
            del self.resident[slot.adapter]
            slot.adapter = None  # until the adapter is in, the slot holds no one's weights
        started = time.perf_counter()
        try:
            if self._can_copy(slot, adapter):
                try:
                    _copy_weights(slot.params, adapter)
                except RuntimeError as error:  # a layer of another shape; the slot stays free
                    raise AdapterError(
                        f"adapter {adapter.name!r} does not fit this base model: {error}"
                    ) from None
                self.copies += 1
            else:
                self._load(slot, adapter)
                self.loads += 1
        finally:
            self.swap_seconds += time.perf_counter() - started
        slot.adapter = adapter.name
        self.resident[adapter.name] = slot
        return slot.name

    def _free_slot(self, keep) -> _PoolSlot:
        for slot in self.slots:
            if slot.adapter is None:
                return slot
        for name, slot in self.resident.items():
            if name not in keep:
                return slot
        raise ValueError(f"all {self.size} pool slots hold adapters of this batch")

    def _can_copy(self, slot: _PoolSlot, adapter: Adapter) -> bool:
        return (
            slot.params is not None
            and not adapter.text_encoder
            and adapter.keys <= slot.keys
            and adapter.rank <= slot.rank
        )

    def _load(self, slot: _PoolSlot, adapter: Adapter) -> None:
        self._remove(slot)
        rank = max(self.rank, adapter.rank)
        # Zero-padded copies: a LoRA's extra zero ranks add exactly nothing, one rank for all
        # layers keeps diffusers' inferred scale at 1, and a copy never aliases a cached adapter.
        weights = {key: _padded(key, value, rank) for key, value in adapter.state_dict.items()}
        if not adapter.text_encoder:
            # zero layers for the UNet layers of earlier adapters that this one lacks (see
            # `AdapterSlot._load`): later adapters on those layers then copy in
            style = _style(weights)
            like = next(iter(weights.values()))
            for key, shape in self.shapes.items():
                if key not in weights and _style((key,)) == style:
                    weights[key] = like.new_zeros(_with_rank(key, shape, rank))
            self.shapes.update({key: tuple(value.shape) for key, value in weights.items()})
        try:
            self._install(slot, weights, rank, adapter.text_encoder)
        except Exception as error:
            raise AdapterError(
                f"adapter {adapter.name!r} does not fit this base model: {error}"
            ) from None
        if not adapter.text_encoder:
            # Set up every slot never set up with the same layers, at zero: loading a PEFT
            # adapter takes about 0.25 s on the tiny model, a copy about 1 ms, so the pool's
            # loads happen at once on its first adapter, not one by one in busy batches.
            for other in self.slots:
                if other.keys is None and other.adapter is None:
                    # tensors of its own: a loaded PEFT adapter may keep them as its parameters
                    zeros = {key: _zeroed(key, value) for key, value in weights.items()}
                    try:
                        self._install(other, zeros, rank, False)
                    except Exception:  # it is loaded when it is needed, as before
                        continue

    def _install(self, slot: _PoolSlot, weights: dict, rank: int, text_encoder: bool) -> None:
        """Load `weights` as the slot's PEFT adapter (its layers at scale 1); on failure the
        slot is left empty and the error raised."""
        try:
            with warnings.catch_warnings():  # "multiple adapters in the model": on purpose
                warnings.simplefilter("ignore", UserWarning)
                self.pipe.load_lora_weights(weights, adapter_name=slot.name)
        except Exception:
            self._remove(slot)
            raise
        finally:
            self.version += 1
        for model in self.models():
            for module in model.modules():
                scaling = getattr(module, "scaling", None)
                if isinstance(scaling, dict) and slot.name in scaling:
                    scaling[slot.name] = 1.0  # prepared adapters are at scale 1
        slot.keys = frozenset(weights)
        slot.rank = rank
        slot.text_encoder = text_encoder
        slot.params = None if text_encoder else self._map_parameters(slot)

    def _remove(self, slot: _PoolSlot) -> None:
        """Take the slot's PEFT adapter off the pipeline, if it is there."""
        with warnings.catch_warnings():  # "adapter ... was active which is now deleted"
            warnings.simplefilter("ignore", UserWarning)
            if any(slot.name in (getattr(m, "peft_config", None) or {}) for m in self.models()):
                self.pipe.delete_adapters(slot.name)
            else:  # a load that failed half way may have left layers without a config
                for model in self.models():
                    _delete_layers(model, slot.name)
        slot.keys = slot.params = None
        slot.rank = 0
        slot.text_encoder = False
        self.version += 1

    def _map_parameters(self, slot: _PoolSlot) -> dict | None:
        """Weight name -> the UNet parameter of this slot it goes into (None: not every one
        has one, so adapters are loaded into this slot, never copied)."""
        return _unet_lora_parameters(self.pipe.unet, slot.keys, slot.name)

    def models(self) -> list:
        """The pipeline's models that may hold LoRA layers (UNet, text encoder)."""
        return [m for m in (self.pipe.unet, getattr(self.pipe, "text_encoder", None)) if m]

    def stats(self) -> dict:
        return {
            "pool_size": self.size,
            "resident": len(self.resident),
            "copies": self.copies,
            "pool_loads": self.loads,
            "swap_seconds": round(self.swap_seconds, 4),
        }


def _copy_weights(params: dict, adapter: Adapter) -> None:
    """Copy `adapter` into LoRA parameters `params` (weight name -> parameter): zero the layers
    it lacks, the others rank-padded."""
    import torch

    keys = adapter.keys
    with torch.no_grad():
        for key, param in params.items():
            if key not in keys:
                param.zero_()
                continue
            value = adapter.tensor(key)
            if value.shape == param.shape:
                param.copy_(value)
            else:
                param.zero_()
                param[tuple(slice(0, n) for n in value.shape)].copy_(value)


def _padded(key: str, value, rank: int):
    """A copy of LoRA weight `value` (named `key`) with its rank dimension zero-padded to
    `rank` (other tensors, e.g. alphas, copied as they are)."""
    if not any(up in key or down in key for up, down in _MARKERS) or value.dim() < 2:
        return value.clone()
    padded = value.new_zeros(_with_rank(key, tuple(value.shape), rank))
    padded[tuple(slice(0, n) for n in value.shape)] = value
    return padded


def _zeroed(key: str, value):
    """LoRA weight `value` (named `key`) as zeros; other tensors (e.g. alphas) as they are."""
    if any(up in key or down in key for up, down in _MARKERS):
        return value.new_zeros(value.shape)
    return value.clone()


def _delete_layers(model, name: str) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and name in getattr(module, "lora_A", {}):
            module.delete_adapter(name)


def lora_layers(models) -> list:
    """The PEFT LoRA layers of `models` (None among them skipped)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [
        module
        for model in models
        if model is not None
        for module in model.modules()
        if isinstance(module, BaseTunerLayer)
    ]


class MixedAdapters:
    """Within it, every LoRA layer of `models` applies sample `i`'s adapter `names[i]` only
    (`BASE`: none), through peft's mixed-batch forward (`adapter_names`).

    diffusers' pipelines do not pass `adapter_names` on, so a forward pre-hook on each LoRA
    layer adds it. A layer that sees twice the samples is in the guided UNet pass, whose batch
    is `[unguided..., guided...]`: each half takes `names`.

    Args:
        models: the modules whose LoRA layers take the names (the UNet, the text encoder).
        names (`list[str]`): one PEFT adapter name per sample.
        layers (`list`, *optional*): those LoRA layers, found once (`lora_layers`): walking
            every module of the UNet and text encoder for them takes about 10 ms a batch.
    """

    def __init__(self, models, names: list[str], layers: list | None = None) -> None:
        self.layers = lora_layers(models) if layers is None else layers
        self.names = list(names)
        self.handles: list = []

    def _hook(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("x", kwargs.get("input"))
        count, size = len(x), len(self.names)
        if count % size or count // size > 2:
            raise ValueError(f"a LoRA layer got a batch of {count} for {size} samples")
        return args, {**kwargs, "adapter_names": self.names * (count // size)}

    def __enter__(self) -> MixedAdapters:
        for module in self.layers:
            self.handles.append(module.register_forward_pre_hook(self._hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


class GroupedAdapters(MixedAdapters):
    """As `MixedAdapters`, but each linear LoRA layer computes every sample's LoRA in two
    batched matmuls (`torch.bmm` with each sample's A and B, gathered once per batch from a
    stack of the batch's adapters), instead of peft's loop over the batch's adapters (a gather,
    two matmuls and a scatter each, and about 0.1 ms of Python per call). Within it, those
    layers' `forward` is replaced by one that does so (put back on exit). Other LoRA layers
    (convolutions; layers whose slots differ in rank or scale) keep peft's mixed-batch forward.
    """

    def __enter__(self) -> GroupedAdapters:
        from peft.tuners.lora.layer import Linear

        self.replaced = []
        used = [name for name in dict.fromkeys(self.names) if name != BASE]
        for module in self.layers:
            forward = self._grouped(module, used) if isinstance(module, Linear) else None
            if forward is None:
                hook = module.register_forward_pre_hook(self._hook, with_kwargs=True)
                self.handles.append(hook)
            else:
                module.forward = forward  # an instance attribute: called instead
                self.replaced.append(module)
        return self

    def __exit__(self, *exc) -> None:
        for module in self.replaced:
            del module.forward
        self.replaced.clear()
        super().__exit__(*exc)

    def _grouped(self, module, used: list[str]):
        """This layer's forward for the batch, or None (peft's mixed forward then)."""
        import torch
        import torch.nn.functional as F

        base = module.base_layer
        present = [name for name in used if name in module.lora_A]
        if not present:  # no sample's adapter has this layer
            return base
        down = [module.lora_A[name].weight for name in present]
        up = [module.lora_B[name].weight for name in present]
        if len({tuple(w.shape) for w in down}) > 1 or any(
            float(module.scaling[name]) != 1.0 for name in present
        ):
            return None
        size = len(self.names)
        if len(present) == 1 and all(name == present[0] for name in self.names):

            def single(x, *args, **kwargs):  # one adapter for all: peft's own arithmetic
                result = base(x, *args, **kwargs)
                lora = F.linear(F.linear(x.to(down[0].dtype), down[0]), up[0])
                return result + lora.to(result.dtype)

            return single
        # a last row of zeros for the samples whose adapter has no layer here
        down = torch.stack([*down, torch.zeros_like(down[0])])
        up = torch.stack([*up, torch.zeros_like(up[0])])
        index = torch.tensor(
            [present.index(n) if n in present else len(present) for n in self.names]
        )
        per_sample = {1: (down[index].transpose(1, 2), up[index].transpose(1, 2))}

        def grouped(x, *args, **kwargs):
            result = base(x, *args, **kwargs)
            repeat = len(x) // size
            if len(x) % size or repeat > 2:
                raise ValueError(f"a LoRA layer got a batch of {len(x)} for {size} samples")
            if repeat not in per_sample:
                per_sample[repeat] = tuple(w.repeat(repeat, 1, 1) for w in per_sample[1])
            down_t, up_t = per_sample[repeat]
            flat = x.reshape(len(x), -1, x.shape[-1]).to(down_t.dtype)
            lora = torch.bmm(torch.bmm(flat, down_t), up_t)
            return result + lora.reshape(result.shape).to(result.dtype)

        return grouped


#: How a batch's LoRAs are applied: `BatchedGenerator`'s `lora` argument.
LORA_PATHS = {"peft": MixedAdapters, "grouped": GroupedAdapters}


class BatchedGenerator:
    """Many users' requests in one denoising loop on one pipeline: one text-encoder pass (per
    prompt kind), one UNet pass per step, one VAE decode, for samples that each apply their
    own user's adapter (`AdapterPool`, `MixedAdapters`).

    Each request's images are drawn from generators seeded `seed + i`, as `generate` draws
    them alone, so each sample starts from exactly the latents it gets alone; the picture
    then equals the one served alone up to rounding of the batched arithmetic.

    Cold users do not stall warm ones: a cold user's adapter is fetched in a thread while the
    warm users' batch denoises (torch lets go of the GIL while it computes). Adapters fetched
    within `fetch_grace` seconds (a local disk's) join the batch; the others' requests follow
    in a batch of their own once their adapter is in. (SwiftDiffusion overlaps LoRA loading
    with the first denoising steps of the same request; here a request's own steps wait for
    its adapter, so that its picture is the one it gets alone, and the overlap is with other
    users' work.)

    Args:
        pipe: the base pipeline (no other LoRA on it: the pool owns its LoRA layers).
        adapters (`AdapterCache`): where adapters are prepared and kept.
        pool_size (`int`): adapters resident at once (the most distinct ones in a batch).
        rank (`int`): the rank pool slots are padded to.
        lora (`str`, defaults to "peft"): how the samples' LoRAs are applied: "peft" (its
            mixed-batch forward, `MixedAdapters`) or "grouped" (batched matmuls,
            `GroupedAdapters`).
        fetch_grace (`float`, defaults to 0.01): seconds a batch waits for cold adapters
            before it starts without them.

    Raises:
        ValueError: `lora` is neither, or the pool's size or rank is below 1.
    """

    def __init__(
        self,
        pipe,
        adapters: AdapterCache,
        pool_size: int,
        rank: int,
        lora: str = "peft",
        fetch_grace: float = 0.01,
    ) -> None:
        import torch

        if lora not in LORA_PATHS:
            raise ValueError(f"lora must be one of {sorted(LORA_PATHS)}, got {lora!r}")
        self.mixer = LORA_PATHS[lora]
        self.torch = torch
        self.pipe = pipe
        self.adapters = adapters
        self.pool = AdapterPool(pipe, pool_size, rank)
        self.fetch_grace = fetch_grace
        # (pool version, its LoRA layers, those of them in the text encoder)
        self.layers: tuple[int, list, list] = (-1, [], [])
        self.fetcher = ThreadPoolExecutor(max_workers=4, thread_name_prefix="adapter-fetch")
        self.batches = self.samples = self.deferred = self.encoded = 0

    def generate(self, items: list[tuple[str | None, dict]]) -> list:
        """Images for each `(adapter name or None, checked values)`, in order: per item, its
        list of images, or the exception that failed it alone (see `serve`)."""
        results: list = [None] * len(items)

        def deliver(index: int, result, hit) -> None:
            results[index] = result

        self.serve(items, deliver)
        return results

    def serve(self, items: list[tuple[str | None, dict]], deliver, cancelled=None) -> None:
        """Serve each `(adapter name or None, checked values)`: call `deliver(index, result,
        hit)` once per item as soon as its batch is done, `result` being its list of images or
        the exception that failed it alone (an adapter that is unknown or does not fit fails
        only its own requests), `hit` whether its adapter was cached (None: no adapter).

        Items are batched by `batch_key`; a group with more distinct adapters than the pool
        holds is denoised in several batches.

        Args:
            cancelled (`list`, *optional*): per item, a callable that says whether its client
                has gone (or None). A batch stops between steps once all of its requests are
                cancelled; a cancelled request in a batch that goes on gets `Cancelled`.
        """
        cancelled = cancelled or [None] * len(items)
        cold = {name for name, _ in items if name is not None and name not in self.adapters}
        fetches = {name: self.fetcher.submit(self.adapters.get, name) for name in sorted(cold)}
        # with warm users to serve, cold ones get the grace; with none, there is no one to
        # hold back, so the batch waits for every fetch
        warm = len(cold) < len({name for name, _ in items})
        wait_for(fetches.values(), timeout=self.fetch_grace if warm else None)
        waiting = {name for name, fetch in fetches.items() if not fetch.done()}
        ready = [i for i, (name, _) in enumerate(items) if name not in waiting]
        later = [i for i, (name, _) in enumerate(items) if name in waiting]
        self.deferred += len(later)
        for indices in (ready, later):
            prepared: dict[int, tuple] = {}
            groups: dict[tuple, list[int]] = {}
            for index in indices:
                name, values = items[index]
                try:
                    if name is None:
                        prepared[index] = (None, None)
                    elif name in fetches:
                        prepared[index] = (fetches[name].result()[0], False)
                    else:
                        prepared[index] = self.adapters.get(name)
                except Exception as error:  # only this request fails
                    deliver(index, error, None)
                    continue
                groups.setdefault(batch_key(values), []).append(index)
            for group in groups.values():
                for chunk in self._chunks(group, prepared):
                    self._run(chunk, items, prepared, cancelled, deliver)

    def _chunks(self, indices: list[int], prepared: dict) -> list[list[int]]:
        """`indices` split so that no part needs more distinct adapters than the pool holds."""
        chunks, chunk, names = [], [], set()
        for index in indices:
            adapter = prepared[index][0]
            name = None if adapter is None else adapter.name
            if name is not None and name not in names and len(names) == self.pool.size:
                chunks.append(chunk)
                chunk, names = [], set()
            chunk.append(index)
            if name is not None:
                names.add(name)
        return [*chunks, chunk] if chunk else chunks

    def _run(self, chunk: list[int], items: list, prepared: dict, cancelled, deliver) -> None:
        adapters = {i: prepared[i][0] for i in chunk}
        # in request order, so that which slot each adapter takes does not vary between runs
        keep = list(dict.fromkeys(a.name for a in adapters.values() if a is not None))
        slots: dict[str, str] = {}
        failed: set[int] = set()
        for name in keep:
            adapter = next(a for a in adapters.values() if a is not None and a.name == name)
            try:
                slots[name] = self.pool.place(adapter, keep)
            except Exception as error:  # this adapter's requests fail; the others go on
                for i in chunk:
                    if adapters[i] is not None and adapters[i].name == name:
                        failed.add(i)
                        deliver(i, error, prepared[i][1])
        chunk = [i for i in chunk if i not in failed]
        if not chunk:
            return
        texts, names, generators, counts = [], [], [], []
        for i in chunk:
            values, adapter = items[i][1], adapters[i]
            count = values["num_images"]
            counts.append(count)
            name = BASE if adapter is None else slots[adapter.name]
            # what its text embeddings depend on: its prompts, and its adapter if that has
            # text-encoder layers
            encoder = name if adapter is not None and adapter.text_encoder else BASE
            texts += [(values["prompt"], values["negative_prompt"], encoder)] * count
            names += [name] * count
            generators += [
                self.torch.Generator(device="cpu").manual_seed(values["seed"] + n)
                for n in range(count)
            ]
        checks = [cancelled[i] for i in chunk]
        steps, width, height, guidance = batch_key(items[chunk[0]][1])
        try:
            models = self.pool.models()
            if self.layers[0] != self.pool.version:  # the pool added or removed layers
                encoder = getattr(self.pipe, "text_encoder", None)
                self.layers = (self.pool.version, lora_layers(models), lora_layers([encoder]))
            with self.torch.inference_mode():
                embeddings = self._encode(texts, guidance > 1)
            with self.torch.inference_mode(), self.mixer(models, names, self.layers[1]):
                images = self.pipe(
                    prompt_embeds=embeddings[0],
                    negative_prompt_embeds=embeddings[1],
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    width=width,
                    height=height,
                    generator=generators,
                    callback_on_step_end=sd.stop_when_all_cancelled(checks),
                ).images
        except Exception as error:  # the batch failed as a whole: so do its requests
            for i in chunk:
                deliver(i, error, prepared[i][1])
            return
        self.batches += 1
        self.samples += len(images)
        start = 0
        for i, count in zip(chunk, counts, strict=True):
            gone = cancelled[i] is not None and cancelled[i]()
            result = images[start : start + count]
            deliver(i, sd.Cancelled("cancelled by its client") if gone else result, prepared[i][1])
            start += count

    def _encode(self, texts: list[tuple[str, str, str]], guided: bool) -> tuple:
        """(prompt embeddings, negative prompt embeddings or None when not `guided`) per
        sample, from its `(prompt, negative prompt, text-encoder adapter)`: the text encoder
        runs once per distinct one (a batch of one user's requests, or of many users' with
        the same prompt, shares one; the negative prompt is mostly the same empty one)."""
        distinct = list(dict.fromkeys(texts))
        self.encoded += len(distinct)
        with self.mixer([], [name for _, _, name in distinct], self.layers[2]):
            embeddings = self.pipe.encode_prompt(
                [prompt for prompt, _, _ in distinct],
                self.pipe._execution_device,
                1,
                guided,
                # an empty negative prompt is what the pipeline uses for None
                negative_prompt=[negative for _, negative, _ in distinct],
            )
        position = {text: index for index, text in enumerate(distinct)}
        index = self.torch.tensor([position[text] for text in texts])
        return tuple(None if e is None else e[index] for e in embeddings)

    def close(self) -> None:
        self.fetcher.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------- the model


class TritonPythonModel(sd.TritonPythonModel):
    """The base pipeline once, every user's adapter on demand; see the module docstring."""

    def initialize(self, args: dict) -> None:
        parameters = sd.model_parameters(args)
        model = self.name = args.get("model_name", "shared-base")
        # before the first import of a package; says how to get them where they are missing
        sd.use_packages(parameters.get("runtime", ""), model)
        from diffusers.utils import logging as diffusers_logging

        source = open_adapter_source(
            parameters.get("adapter_source", ""), parameters.get("aws_region", ""), model
        )
        max_count = _positive_int(parameters, "adapter_cache_max_count", 1024, model)
        max_bytes = _positive_int(parameters, "adapter_cache_max_bytes", 1 << 30, model)
        rank = _positive_int(parameters, "hotswap_rank", 16, model)
        max_batch = int(json.loads(args["model_config"]).get("max_batch_size", 0))
        # every swap would log that the adapter has no text-encoder layers
        diffusers_logging.set_verbosity_error()
        self.use(self.load_base(parameters), parameters)
        self.adapters = AdapterCache(source, max_count, max_bytes)
        self.slot = self.batcher = None
        if max_batch > 1:  # Triton hands over batches: serve each as one
            lora = parameters.get("lora_batching") or "grouped"
            grace = float(parameters.get("fetch_grace_ms") or "10") / 1000
            self.batcher = BatchedGenerator(self.pipe, self.adapters, max_batch, rank, lora, grace)
        else:
            self.slot = AdapterSlot(self.pipe, rank)

    def execute(self, requests: list) -> list | None:
        if self.batcher is None:
            return [self.respond(request) for request in requests]
        self.execute_batch(requests)
        return None  # each request was answered through its response sender

    def execute_batch(self, requests: list) -> None:
        """Serve `requests` as batches (`BatchedGenerator.serve`), answering each through its
        response sender as soon as its batch is done, so that warm users need not wait for a
        cold user's batch; exactly one answer per request, whatever fails."""
        senders = [request.get_response_sender() for request in requests]
        answered: set[int] = set()

        def answer(index: int, response) -> None:
            if index in answered:
                return
            answered.add(index)
            try:
                senders[index].send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except Exception as error:  # e.g. its client is gone; the others still get theirs
                pb_utils.Logger.log_warn(f"an answer could not be sent: {error}")

        items, positions, checks = [], [], []
        for index, request in enumerate(requests):
            try:
                items.append(self.parse(request))
            except InputError as error:
                answer(index, sd.error_response(str(error)))
                continue
            positions.append(index)
            checks.append(getattr(request, "is_cancelled", None))

        def deliver(item: int, result, hit) -> None:
            index = positions[item]
            answer(index, self.response(requests[index], result, hit))

        try:
            self.batcher.serve(items, deliver, checks)
        finally:  # a failure outside any batch: every request still gets its one answer
            for index in range(len(requests)):
                answer(index, sd.error_response("generation failed: the batch was abandoned"))

    def response(self, request, result, hit):
        """The answer for one request: its images (`result`, a list) or the error `result`."""
        if isinstance(result, InputError | sd.Cancelled):
            return sd.error_response(str(result))
        if isinstance(result, Exception):
            return sd.failure_response(result)
        output = np.array([sd.png_bytes(image) for image in result], dtype=np.object_)
        # one sample of a batch: [1, images]
        tensors = [pb_utils.Tensor("images", output.reshape(1, -1))]
        if "adapter_cache" in request.requested_output_names():
            cache = np.array([[b"hit" if hit else b"miss"]], dtype=np.object_)
            tensors.append(pb_utils.Tensor("adapter_cache", cache))
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def parse(self, request) -> tuple[str, dict]:
        """The request's adapter name and checked values; `InputError` naming what is wrong."""
        raw = sd.read_inputs(request, [*sd.INPUTS, "adapter"])
        name = parse_adapter(raw.pop("adapter"))
        return name, parse_inputs(raw, self.defaults, self.max_work)

    def respond(self, request):
        """One request served alone (hot-swap slot): its answer, whatever fails."""
        try:
            name, values = self.parse(request)
            images, hit = self.generate_for(name, values, request)
            return self.response(request, images, hit)
        except (InputError, sd.Cancelled) as error:
            return sd.error_response(str(error))
        except Exception as error:  # one failed generation must not take the model down
            return sd.failure_response(error)

    def generate_for(self, adapter_name: str, values: dict, request=None) -> tuple[list, bool]:
        """Images for checked `values` with adapter `adapter_name`, and whether it was cached
        (stopped once `request` is cancelled)."""
        adapter, hit = self.adapters.get(adapter_name)
        self.slot.activate(adapter)
        return self.generate(values, request), hit

    def stats(self) -> dict:
        """The adapter cache's counters, and the slot's or the batches' pool's."""
        cache, slot, batcher = self.adapters, self.slot, self.batcher
        counters = {
            "cached_adapters": len(cache.entries),
            "cached_bytes": cache.bytes,
            "hits": cache.hits,
            "misses": cache.misses,
            "evictions": cache.evictions,
            "fetch_seconds": round(cache.fetch_seconds, 4),
        }
        if batcher is not None:
            counters.update(batcher.pool.stats())
            counters.update(
                batches=batcher.batches,
                samples=batcher.samples,
                deferred=batcher.deferred,
                prompts_encoded=batcher.encoded,
            )
            return counters
        return {
            **counters,
            "hotswaps": slot.hotswaps,
            "slot_loads": slot.loads,
            "swap_seconds": round(slot.swap_seconds, 4),
            "swaps_by_copy": slot.params is not None,
            "active": slot.active,
        }

    def finalize(self) -> None:
        if pb_utils is not None:
            pb_utils.Logger.log_info(f"adapter serving: {json.dumps(self.stats())}")
        if self.batcher is not None:
            self.batcher.close()
        self.adapters.entries.clear()
        super().finalize()
