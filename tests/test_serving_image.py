"""The workshop's serving image (`model_code/serving_image/Dockerfile`), and what the users'
models need from an instance: their packages, and the base model, which they fetch themselves.

No Docker engine runs here, so the image is checked three ways:
- its Dockerfile: hadolint-clean, built on SageMaker's Triton image, installing exactly the
  serving runtime's pinned requirements into the layout that the tests below mirror;
- that layout on the local Triton: a bare Python environment (no torch, no diffusers) whose
  site-packages holds only numpy (the image's own) and the image's `.pth` file naming a
  folder laid out like the image's `/opt/workshop/site-packages`; a user model packaged with no
  serving runtime loads from it and draws. Without the `.pth` the load fails, and the router's
  answer says what to do;
- the base model as an `s3://` folder: fetched once per instance (moto), by one of several
  models loading at once, and allowed to the stack's SageMaker execution role (IAM harness).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

import boto3
import numpy as np
import pytest
from aws_fakes import fake_aws
from botocore.exceptions import ClientError

from helpers.services.packaging import build_archive, load_model_code
from helpers.services.serving_runtime import REQUIREMENTS

MODEL_CODE_DIR = REQUIREMENTS.parents[1]  # the image's build context
DOCKERFILE = MODEL_CODE_DIR / "serving_image" / "Dockerfile"
#: The image's layout, as the Dockerfile makes it and the Triton test below mirrors it.
IMAGE_SITE_PACKAGES = "/opt/workshop/site-packages"
PTH_NAME = "workshop-serving.pth"
#: The image's own packages that the serving packages must not replace.
IMAGE_OWN = ("numpy",)

REGION = "eu-west-1"
BUCKET = "workshop-base"
BASE_URI = f"s3://{BUCKET}/base-models/tiny-0123456789ab/"

model_py = load_model_code()


# ----------------------------------------------------------------------------- the Dockerfile


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    found, current = [], ""
    for line in path.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            keyword, _, rest = current.strip().partition(" ")
            found.append((keyword.upper(), " ".join(rest.split())))
            current = ""
    return found


def pip_installs(runs: list[str]) -> list[list[str]]:
    """The arguments after `pip install` of each pip install in the RUN lines."""
    installs = []
    for run in runs:
        for command in run.split("&&"):
            words = shlex.split(command)
            if "pip" in words and words[words.index("pip") + 1] == "install":
                installs.append(words[words.index("pip") + 2 :])
    return installs


def test_the_image_extends_sagemakers_triton_image_of_the_stacks_region():
    from helpers.infra.aws.endpoint import triton_image_uri

    steps = instructions()
    assert steps[0] == ("ARG", f"BASE_IMAGE={triton_image_uri('us-east-1')}")
    assert steps[1] == ("FROM", "${BASE_IMAGE}")
    assert [keyword for keyword, _ in steps].count("FROM") == 1


def test_the_image_installs_exactly_the_runtime_pins_into_the_mirrored_layout():
    steps = instructions()
    (copy,) = [args.split() for keyword, args in steps if keyword == "COPY"]
    requirements_in_image = copy[1]
    assert copy[0] == REQUIREMENTS.relative_to(MODEL_CODE_DIR).as_posix()
    runs = [args for keyword, args in steps if keyword == "RUN"]
    (install,) = pip_installs(runs)
    options = dict(zip(install, [*install[1:], ""], strict=True))
    assert options["--target"] == IMAGE_SITE_PACKAGES
    assert options["--requirement"] == requirements_in_image
    assert "--no-cache-dir" in install
    # nothing but the requirements file: every argument is an option or an option's value
    values = {options[o] for o in ("--target", "--requirement", "--constraint")}
    assert all(word.startswith("--") or word in values for word in install), install
    # the constraint holds the image's own numpy, which the stub imports before any model
    assert any("import numpy" in run and options["--constraint"] in run for run in runs)
    pins = [
        line.split("==")[0]
        for line in REQUIREMENTS.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert pins and not set(pins) & set(IMAGE_OWN)
    # the .pth that makes the folder importable by the image's python3, checked in isolation
    assert any(f'echo "{IMAGE_SITE_PACKAGES}" > ' in run and f"/{PTH_NAME}" in run for run in runs)
    assert any("python3 -I -c" in run and "import torch, diffusers" in run for run in runs)


def test_the_dockerfile_is_hadolint_clean():
    hadolint = Path(sysconfig.get_path("scripts")) / "hadolint"
    result = subprocess.run(
        [str(hadolint), str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------- packages


def test_a_model_without_its_packages_names_them_and_both_fixes(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(RuntimeError) as caught:
        model_py.use_packages("", "demo-ada--m1")
    message = str(caught.value)
    assert "model demo-ada--m1 cannot load" in message
    assert "lacks torch, diffusers" in message
    assert 'serving_image="workshop"' in message
    assert "SageMakerEndpoint.prepare" in message


# ----------------------------------------------------------------------------- the layout on Triton


def image_python(root: Path, with_pth: bool) -> Path:
    """A Python environment laid out as the serving image's: a bare venv of this interpreter
    (no torch, no diffusers) whose site-packages holds numpy (the image's own) and, with
    `with_pth`, the image's `.pth` naming `root/opt/workshop/site-packages`, a folder of links to
    this venv's packages (what pip --target puts there). Returns the venv's `bin`."""
    venv = root / "image-python"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    image_site = venv / "lib" / version / "site-packages"
    ours = Path(sysconfig.get_path("purelib"))
    packages = root / IMAGE_SITE_PACKAGES.lstrip("/")
    packages.mkdir(parents=True)
    for entry in ours.iterdir():
        own = entry.name.split("-")[0].split(".")[0] in IMAGE_OWN
        if own:
            (image_site / entry.name).symlink_to(entry)
        elif entry.suffix != ".pth" and entry.name != "__pycache__":
            (packages / entry.name).symlink_to(entry)
    if with_pth:
        (image_site / PTH_NAME).write_text(f"{packages}\n")
    bare = subprocess.run(
        [str(venv / "bin" / "python3"), "-I", "-c", "import numpy, diffusers"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (bare.returncode == 0) == with_pth, bare.stderr  # the layout is what it claims
    return venv / "bin"


@pytest.fixture
def user_model(tmp_path, tiny_pipeline_dir, lora_weights):
    """A store holding one user model packaged as for the workshop's image: no runtime, the
    base model as it is."""
    from helpers.infra.local.store import LocalArtifactStore

    store = LocalArtifactStore(tmp_path / "store")
    store.create_bucket(BUCKET)
    prefix = f"s3://{BUCKET}/endpoints/test/models/"
    archive = build_archive(
        "demo-ada--m1", lora_weights, str(tiny_pipeline_dir), tmp_path / "user.tar.gz", runtime=""
    )
    store.put_file(f"{prefix}demo-ada--m1.tar.gz", archive)
    return store, prefix


def serve(store, prefix: str, work: Path, python_bin: Path):
    from helpers.infra.local.endpoint import LocalEndpoint

    endpoint = LocalEndpoint(store, prefix, work, max_loaded_models=1)
    endpoint.triton.python_bin = python_bin  # the stubs embed the image's python3
    return endpoint


@pytest.mark.slow
def test_on_triton_a_user_model_loads_its_packages_as_the_image_lays_them_out(tmp_path, user_model):
    from helpers.domain.generation import invoke_model

    python_bin = image_python(tmp_path / "image", with_pth=True)
    with serve(*user_model, tmp_path / "endpoint", python_bin) as endpoint:
        images = invoke_model(
            endpoint.runtime_client(),
            endpoint.name,
            "demo-ada--m1.tar.gz",
            "a photo of sks toy",
            num_inference_steps=1,
        )
        stubs = endpoint.triton.model_stub_pids("demo-ada--m1")
        environ = [Path(f"/proc/{pid}/environ").read_bytes() for pid in stubs]
    assert len(images) == 1 and images[0].size == (64, 64)
    # the stub ran with the image's Python first on its PATH, not this venv's
    assert stubs and all(f"PATH={python_bin}{os.pathsep}".encode() in env for env in environ)


@pytest.mark.slow
def test_on_triton_a_user_model_without_its_packages_says_what_to_do(tmp_path, user_model):
    from helpers.domain.generation import invoke_model

    python_bin = image_python(tmp_path / "image", with_pth=False)
    with (
        serve(*user_model, tmp_path / "endpoint", python_bin) as endpoint,
        pytest.raises(ClientError) as caught,
    ):
        invoke_model(
            endpoint.runtime_client(),
            endpoint.name,
            "demo-ada--m1.tar.gz",
            "a photo of sks toy",
            num_inference_steps=1,
        )
    message = str(caught.value)
    assert "model demo-ada--m1 cannot load" in message
    # as the router answers a failed load: Triton's load error, the model's message in it
    assert "Triton could not load demo-ada--m1.tar.gz" in message
    assert "lacks torch, diffusers, transformers, peft" in message
    assert 'serving_image="workshop"' in message and "SageMakerEndpoint.prepare" in message


# ----------------------------------------------------------------------------- the base model


BASE_FILES = {
    "model_index.json": b'{"_class_name": "StableDiffusionPipeline"}',
    "unet/config.json": b"{}",
    "unet/diffusion_pytorch_model.safetensors": os.urandom(300_000),
    "vae/config.json": b"{}",
}


def upload_base(client, uri: str = BASE_URI, files: dict[str, bytes] = BASE_FILES) -> None:
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    for name, data in files.items():
        client.put_object(Bucket=bucket, Key=prefix + name, Body=data)


def folder_files(folder: Path) -> dict[str, bytes]:
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in folder.rglob("*")
        if path.is_file() and path.name != model_py.BASE_COMPLETE
    }


@pytest.fixture
def s3(monkeypatch):
    from moto import mock_aws

    fake_aws(monkeypatch, REGION)
    with mock_aws():
        client = boto3.client("s3", region_name=REGION)
        client.create_bucket(
            Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION}
        )
        yield client


def test_an_s3_base_model_is_fetched_whole_once_per_instance(s3, tmp_path):
    upload_base(s3)
    s3.put_object(Bucket=BUCKET, Key="base-models/tiny-0123456789ab/empty-folder/", Body=b"")
    s3.put_object(Bucket=BUCKET, Key="base-models/tiny-0123456789abX/other", Body=b"not ours")
    cache = tmp_path / "cache"

    folder, fetched = model_py.fetch_base_model(BASE_URI.rstrip("/"), cache, REGION)
    assert fetched and folder == model_py.base_cache_folder(BASE_URI, cache)
    assert folder_files(folder) == BASE_FILES
    info = json.loads((folder / model_py.BASE_COMPLETE).read_text())
    assert info["uri"] == BASE_URI and info["files"] == len(BASE_FILES)
    assert sorted(p.name for p in cache.iterdir()) == sorted([folder.name, f".{folder.name}.lock"])

    # Another model loading on this instance finds it: nothing is read from S3 again.
    s3.delete_objects(
        Bucket=BUCKET,
        Delete={"Objects": [{"Key": "base-models/tiny-0123456789ab/" + n} for n in BASE_FILES]},
    )
    assert model_py.fetch_base_model(BASE_URI, cache, REGION) == (folder, False)


def test_a_half_fetched_base_model_is_fetched_again(s3, tmp_path):
    upload_base(s3)
    cache = tmp_path / "cache"
    folder = model_py.base_cache_folder(BASE_URI, cache)
    (folder / "unet").mkdir(parents=True)  # a process died while it fetched
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
    (cache / f".{folder.name}.partial").mkdir()
    assert model_py.fetch_base_model(BASE_URI, cache, REGION) == (folder, True)
    assert folder_files(folder) == BASE_FILES
    assert not (cache / f".{folder.name}.partial").exists()


@pytest.mark.parametrize(
    ("uri", "files", "error", "message"),
    [
        (BASE_URI, {}, FileNotFoundError, "holds no objects: upload the base pipeline"),
        (BASE_URI, {"unet/config.json": b"{}"}, FileNotFoundError, "has no model_index.json"),
        ("s3://no-such-bucket/base/", {}, FileNotFoundError, r"cannot be listed \(NoSuchBucket\)"),
        (
            BASE_URI,
            {**BASE_FILES, "unet/../../escape.json": b"{}"},
            ValueError,
            "would land outside its folder",
        ),
        ("/models/base", {}, ValueError, "must be an s3:// folder"),
    ],
)
def test_a_base_model_that_cannot_be_fetched_names_its_uri(
    s3, tmp_path, uri, files, error, message
):
    upload_base(s3, BASE_URI, files)
    with pytest.raises(error, match=message) as caught:
        model_py.fetch_base_model(uri, tmp_path / "cache", REGION)
    assert uri in str(caught.value)
    assert not (tmp_path / "cache").exists() or not [
        p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")
    ]


def _fetch_in_a_process(cache: str, barrier, results) -> None:
    barrier.wait(timeout=60)  # both start together
    folder, fetched = model_py.fetch_base_model(BASE_URI, cache, REGION)
    results.put((str(folder), fetched, os.getpid()))


def test_models_loading_at_once_fetch_the_base_model_once(moto_server, tmp_path):
    client = boto3.client("s3", region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    many = {**BASE_FILES, **{f"text_encoder/part-{i}.bin": os.urandom(20_000) for i in range(30)}}
    upload_base(client, BASE_URI, many)
    cache = str(tmp_path / "cache")
    context = multiprocessing.get_context("fork")  # the children inherit AWS_ENDPOINT_URL
    barrier, results = context.Barrier(2), context.Queue()
    processes = [
        context.Process(target=_fetch_in_a_process, args=(cache, barrier, results))
        for _ in range(2)
    ]
    for process in processes:
        process.start()
    answers = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=30)
    assert [process.exitcode for process in processes] == [0, 0]

    assert len({folder for folder, _, _ in answers}) == 1
    fetchers = [pid for _, fetched, pid in answers if fetched]
    assert len(fetchers) == 1  # one fetched; the other waited and found it done
    folder = Path(answers[0][0])
    assert json.loads((folder / model_py.BASE_COMPLETE).read_text())["pid"] == fetchers[0]
    assert folder_files(folder) == many
    assert sorted(p.name for p in Path(cache).iterdir()) == sorted(
        [folder.name, f".{folder.name}.lock"]
    )


@pytest.mark.slow
def test_the_stacks_sagemaker_role_may_fetch_a_base_model_from_base_models(tmp_path, monkeypatch):
    """The endpoint fetches the base as the execution role `cdk synth` makes: allowed under the
    stack's `base-models/` prefix (BASE_MODELS_PREFIX), refused outside the role's prefixes."""
    from moto import mock_aws

    from helpers.workshop.aws_stack import node_problem

    if (problem := node_problem()) is not None:
        pytest.skip(f"the CDK needs Node.js: {problem}")
    import iam_enforced
    from test_iam_sagemaker_role import sagemaker_role_id

    iam_enforced.import_infra()
    from workshop_infra.storage import BASE_MODELS_PREFIX

    template = iam_enforced.synthesize(tmp_path / "cdk.out")
    deployment = iam_enforced.Deployment(template, REGION, BUCKET, "workshop-models")
    role = deployment.role_statements(sagemaker_role_id(template))

    fake_aws(monkeypatch, REGION)
    with mock_aws():
        client = boto3.client("s3", region_name=REGION)
        client.create_bucket(
            Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION}
        )
        base = f"s3://{BUCKET}/{BASE_MODELS_PREFIX}tiny-0123456789ab/"
        outside = f"s3://{BUCKET}/elsewhere/tiny/"
        upload_base(client, base)
        upload_base(client, outside)
        with iam_enforced.enforced(role, REGION) as enforcer:
            folder, fetched = model_py.fetch_base_model(base, tmp_path / "cache", REGION)
        assert not enforcer.denied, [str(r) for r in enforcer.denied]
        assert fetched and folder_files(folder) == BASE_FILES
        actions = {r.action for r in enforcer.allowed}
        assert actions == {"s3:ListBucket", "s3:GetObject"}

        with (
            iam_enforced.enforced(role, REGION) as enforcer,
            pytest.raises(ClientError, match="AccessDenied"),
        ):
            model_py.fetch_base_model(outside, tmp_path / "cache", REGION)
        assert {r.action for r in enforcer.denied} == {"s3:GetObject"}


@pytest.mark.slow
def test_both_serving_models_draw_from_an_s3_base_model_fetched_once(
    s3, tmp_path, tiny_pipeline_dir, lora_weights
):
    """The per-user model and the shared base (which reuses its loading) take an `s3://` base
    as a local one: fetched into the instance's cache once, the same picture as from the
    folder it was uploaded from."""
    from test_adapter_serving import model_args

    for path in sorted(Path(tiny_pipeline_dir).rglob("*")):
        if path.is_file():
            key = "base-models/tiny-0123456789ab/" + path.relative_to(tiny_pipeline_dir).as_posix()
            s3.upload_file(str(path), BUCKET, key)
    cache = tmp_path / "cache"
    version = tmp_path / "demo-ada--m1" / "1"
    version.mkdir(parents=True)
    (version / "pytorch_lora_weights.safetensors").write_bytes(lora_weights.read_bytes())
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    (adapters / "demo-ada--m1.safetensors").write_bytes(lora_weights.read_bytes())
    raw = {"prompt": np.array([b"a photo of sks toy"], dtype=np.object_)}

    def draw(base_model: str) -> np.ndarray:
        model = model_py.TritonPythonModel()
        parameters = {"base_model": base_model, "base_cache": str(cache), "aws_region": REGION}
        model.initialize(model_args(parameters, version.parent, "demo-ada--m1"))
        values = model_py.parse_inputs({**raw, "num_inference_steps": np.array([2])}, {})
        values.update(width=64, height=64, guidance_scale=2.0)
        (image,) = model.generate(values)
        model.finalize()
        return np.asarray(image, dtype=np.int16)

    from_s3 = draw(BASE_URI)
    assert np.array_equal(from_s3, draw(str(tiny_pipeline_dir)))
    fetched = model_py.base_cache_folder(BASE_URI, cache)
    assert (fetched / "model_index.json").is_file()

    shared_module = load_model_code(
        MODEL_CODE_DIR / "triton_sd_shared" / "1" / "model.py", "shared_model_s3_base"
    )
    shared = shared_module.TritonPythonModel()
    parameters = {
        "base_model": BASE_URI,
        "base_cache": str(cache),
        "aws_region": REGION,
        "adapter_source": str(adapters),
    }
    shared.initialize(model_args(parameters, tmp_path / "shared", "shared-base-x"))
    assert shared.pipe.unet.config.sample_size * shared.pipe.vae_scale_factor == 64
    shared.finalize()
    # one copy on the instance, the shared base found it there
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == [fetched.name]
