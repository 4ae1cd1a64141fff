"""The DreamBooth-LoRA entry script: a few steps on the random-init tiny pipeline into tmp dirs,
then checks on what it saved (diffusers `examples/dreambooth/test_dreambooth_lora.py` style)."""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

SCRIPT = Path(__file__).resolve().parents[1] / "model_code" / "train_dreambooth_lora.py"
LOSS_LINE = re.compile(r"step=(\d+) loss=([0-9.]+)")
# Few steps, one cheap validation image: each run takes a second or two on a CPU.
FAST = ["--num_validation_images", "1", "--num_inference_steps", "2", "--seed", "0"]
SM_VARIABLES = (
    "SM_MODEL_DIR",
    "SM_CHANNEL_INSTANCE",
    "SM_CHANNEL_TRAINING",
    "SM_CHANNEL_BASE_MODEL",
    "SM_CHANNEL_CLASS",
    "SM_OUTPUT_DATA_DIR",
    "SM_OUTPUT_DIR",
)


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_dreambooth_lora", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    # `import hyperparameters` finds the file beside the script, as `python <script>` does.
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: tiny models gain nothing from more, and on a busy machine two
    spinning OpenMP threads per process made each step some 30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_sagemaker_environment(monkeypatch):
    for name in SM_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory):
    """Four 64x64 pictures of one purple circle with a yellow dot, at varied places."""
    path = tmp_path_factory.mktemp("instance")
    for i, (x, y, r) in enumerate([(32, 32, 18), (24, 28, 14), (40, 36, 16), (30, 40, 20)]):
        image = Image.new("RGB", (64, 64), (230, 230 - 10 * i, 220))
        pen = ImageDraw.Draw(image)
        pen.ellipse((x - r, y - r, x + r, y + r), fill=(140, 60, 185))
        pen.ellipse((x - 4, y - 4, x + 4, y + 4), fill=(235, 205, 30))
        image.save(path / f"photo-{i}.png")
    return path


def cli(**flags) -> list[str]:
    """`--name value` pairs, as SageMaker passes hyperparameters."""
    return [item for name, value in flags.items() for item in (f"--{name}", str(value))]


def train_args(base: Path, instance: Path, out: Path, **flags) -> list[str]:
    """The script's arguments: base pipeline, instance photos and output folder, then `flags`."""
    return cli(
        pretrained_model_name_or_path=base, instance_data_dir=instance, output_dir=out, **flags
    )


PLACEHOLDER_PATHS = cli(pretrained_model_name_or_path="base", instance_data_dir="photos")


def run_script(script, argv: list[str]) -> tuple[dict, str]:
    """`main(parse_args(argv))` in this process; the summary and everything it printed."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        summary = script.main(script.parse_args(argv))
    return summary, stdout.getvalue()


@pytest.fixture(scope="module")
def basic_run(script, tiny_pipeline_dir, instance_dir, tmp_path_factory):
    """Three steps with a checkpoint after each (at most two kept)."""
    out = tmp_path_factory.mktemp("basic-run")
    argv = train_args(
        tiny_pipeline_dir,
        instance_dir,
        out,
        max_train_steps=3,
        checkpointing_steps=1,
        checkpoints_total_limit=2,
    )
    argv += FAST
    summary, log = run_script(script, argv)
    return out, summary, log, argv


def unet_output(pipe) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    ids = pipe.tokenizer("a photo of sks toy", padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        states = pipe.text_encoder(ids)[0]
        return pipe.unet(latents, torch.tensor([500]), states).sample


def load_pipeline(path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(path, safety_checker=None)


def load_lora_and_check_it_changes_the_unet(base: Path, out: Path):
    """Load the base pipeline, then the LoRA saved in `out`; assert the UNet's output moved.
    Return the pipeline, the LoRA loaded."""
    pipe = load_pipeline(base)
    before = unet_output(pipe)
    pipe.load_lora_weights(out)
    assert not torch.allclose(before, unet_output(pipe))
    return pipe


def test_saves_lora_weights_that_change_the_unet(basic_run, tiny_pipeline_dir):
    out, _, _, _ = basic_run
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "staging files left behind"
    pipe = load_lora_and_check_it_changes_the_unet(tiny_pipeline_dir, out)
    assert "text_encoder" not in str(getattr(pipe.text_encoder, "peft_config", {}))


def test_writes_summary_and_validation_images(basic_run, tiny_pipeline_dir):
    out, summary, _, _ = basic_run
    saved = json.loads((out / "training_summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert saved["steps"] == 3 and len(saved["loss_history"]) == 3
    assert math.isfinite(saved["final_loss"])
    assert saved["final_loss"] == pytest.approx(sum(saved["loss_history"]) / 3)
    assert saved["base_model"] == str(tiny_pipeline_dir)
    assert saved["instance_prompt"] == "a photo of sks toy"
    assert saved["hyperparameters"]["rank"] == 4
    assert saved["hyperparameters"]["validation_prompt"] == "a photo of sks toy"
    assert saved["device"] == "cpu" and saved["versions"]["torch"] == torch.__version__
    assert saved["validation_images"] == ["validation/0.png"]
    with Image.open(out / "validation" / "0.png") as image:
        assert image.size == (64, 64)


def test_logs_parseable_step_lines(basic_run):
    _, summary, log, _ = basic_run
    assert log.count("***** Running training *****") == 1
    steps = [(int(s), float(v)) for s, v in LOSS_LINE.findall(log)]
    assert [s for s, _ in steps] == [1, 2, 3]
    assert [v for _, v in steps] == pytest.approx(summary["loss_history"], abs=1e-6)
    step_lines = [line for line in log.splitlines() if line.startswith("step=")]
    assert all(
        re.fullmatch(r"step=\d+ loss=[0-9.]+ lr=[0-9.]+ seconds=[0-9.]+", line)
        for line in step_lines
    )


def test_sagemaker_metric_definitions_read_the_logged_steps_and_losses(basic_run):
    """SageMaker applies each `MetricDefinitions` regex to every log line and keeps its first
    group: on the script's real log they must give each step's number and loss, nothing else."""
    from helpers.infra.aws import jobs as sagemaker_jobs
    from helpers.ports.jobs import PROGRESS_RE

    _, summary, log, _ = basic_run
    metrics = {definition["Name"]: [] for definition in sagemaker_jobs.METRIC_DEFINITIONS}
    for line in log.splitlines():
        for definition in sagemaker_jobs.METRIC_DEFINITIONS:
            match = re.search(definition["Regex"], line)
            if match:
                metrics[definition["Name"]].append(float(match.group(1)))
    assert metrics["train:step"] == [1, 2, 3]
    assert metrics["train:loss"] == pytest.approx(summary["loss_history"], abs=1e-6)
    assert all(loss > 0 for loss in metrics["train:loss"])
    # The local jobs' progress pattern reads the same lines the same way.
    progress = [(int(s), float(v)) for s, v in PROGRESS_RE.findall(log)]
    assert progress == list(zip([1, 2, 3], metrics["train:loss"], strict=True))


def test_gradient_accumulation_counts_optimizer_updates_as_steps(
    script, tiny_pipeline_dir, instance_dir, tmp_path, monkeypatch
):
    """With --gradient_accumulation_steps 3, each of the --max_train_steps steps is one
    optimizer update over three batches; the log shows one line per update, its loss the
    mean of the three batches' losses."""
    batch_losses, updates = [], []
    batch_loss = script.batch_loss

    def counted_batch_loss(*args, **kwargs):
        loss = batch_loss(*args, **kwargs)
        batch_losses.append(loss.item())
        return loss

    step = torch.optim.AdamW.step

    def counted_step(self, *args, **kwargs):
        updates.append(len(batch_losses))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(script, "batch_loss", counted_batch_loss)
    monkeypatch.setattr(torch.optim.AdamW, "step", counted_step)
    out = tmp_path / "out"
    argv = train_args(
        tiny_pipeline_dir,
        instance_dir,
        out,
        max_train_steps=2,
        gradient_accumulation_steps=3,
        num_validation_images=0,
    )
    summary, log = run_script(script, argv)

    assert updates == [3, 6]  # an update after every third batch
    assert len(batch_losses) == 6
    assert [int(s) for s, _ in LOSS_LINE.findall(log)] == [1, 2]
    assert summary["steps"] == 2
    expected = [sum(batch_losses[i : i + 3]) / 3 for i in (0, 3)]
    assert summary["loss_history"] == pytest.approx(expected, abs=1e-6)
    assert "Batch size = 1 x 3 accumulation steps" in log
    load_lora_and_check_it_changes_the_unet(tiny_pipeline_dir, out)


def lora_dtypes(out: Path) -> set[torch.dtype]:
    from safetensors.torch import load_file

    return {tensor.dtype for tensor in load_file(out / "pytorch_lora_weights.safetensors").values()}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU's bf16 path")
def test_bf16_mixed_precision_trains_on_the_cpu_and_saves_float32_lora(
    script, tiny_pipeline_dir, instance_dir, tmp_path
):
    out = tmp_path / "out"
    argv = train_args(
        tiny_pipeline_dir,
        instance_dir,
        out,
        max_train_steps=2,
        mixed_precision="bf16",
    )
    summary, log = run_script(script, argv + FAST)
    assert summary["mixed_precision"] == "bf16" and summary["device"] == "cpu"
    assert "mixed precision = bf16" in log and "Note:" not in log
    assert all(math.isfinite(loss) for loss in summary["loss_history"])
    assert lora_dtypes(out) == {torch.float32}  # LoRA trains in float32 under bf16
    assert (out / "validation" / "0.png").is_file()
    load_lora_and_check_it_changes_the_unet(tiny_pipeline_dir, out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback without CUDA")
def test_fp16_without_cuda_falls_back_to_full_precision_with_a_note(
    script, tiny_pipeline_dir, instance_dir, tmp_path
):
    out = tmp_path / "out"
    argv = train_args(
        tiny_pipeline_dir,
        instance_dir,
        out,
        max_train_steps=1,
        mixed_precision="fp16",
        num_validation_images=0,
    )
    summary, log = run_script(script, argv)
    assert "Note: --mixed_precision fp16 needs CUDA; training in full precision" in log
    assert "mixed precision = no" in log
    # The summary records what was asked for and what was used.
    assert summary["hyperparameters"]["mixed_precision"] == "fp16"
    assert summary["mixed_precision"] == "no"
    assert summary["steps"] == 1 and math.isfinite(summary["final_loss"])
    assert lora_dtypes(out) == {torch.float32}


def test_the_jobs_layer_knows_the_scripts_defaults(script):
    """`helpers.ports.jobs` checks combinations of hyperparameters with the script's defaults for
    the ones a request leaves out: they must be the script's (validation_prompt, unset, is the
    instance prompt)."""
    from helpers.ports.jobs import SCRIPT_DEFAULTS

    args = vars(script.parse_args(PLACEHOLDER_PATHS))
    expected = {**SCRIPT_DEFAULTS, "validation_prompt": SCRIPT_DEFAULTS["instance_prompt"]}
    assert {name: args[name] for name in SCRIPT_DEFAULTS} == expected


def test_keeps_checkpoints_within_limit_and_resumes_latest(basic_run, script, tmp_path):
    out, summary, _, argv = basic_run
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    argv += cli(output_dir=copy, max_train_steps=4, resume_from_checkpoint="latest")
    resumed, log = run_script(script, argv)
    assert "Resumed from checkpoint" in log
    assert resumed["resumed_from"].endswith("checkpoint-3")
    assert resumed["steps"] == 4
    assert resumed["loss_history"][:3] == summary["loss_history"]
    assert [int(s) for s, _ in LOSS_LINE.findall(log)] == [4]


def test_resume_from_a_missing_checkpoint_is_a_clear_error(script, tmp_path):
    args = script.parse_args([*PLACEHOLDER_PATHS, "--resume_from_checkpoint", "checkpoint-7"])
    with pytest.raises(ValueError, match="--resume_from_checkpoint 'checkpoint-7'"):
        script.find_checkpoint(args, tmp_path)


def test_text_encoder_lora_with_prior_preservation(
    script, tiny_pipeline_dir, instance_dir, tmp_path
):
    out, class_dir = tmp_path / "out", tmp_path / "class"
    argv = train_args(
        tiny_pipeline_dir,
        instance_dir,
        out,
        class_data_dir=class_dir,
        max_train_steps=2,
        class_prompt="a photo of a toy",
        num_class_images=2,
        random_flip="true",
    )
    argv += ["--train_text_encoder", "--gradient_checkpointing", "--with_prior_preservation"]
    summary, _ = run_script(script, argv + FAST)
    assert len(list(class_dir.glob("*.png"))) == 2
    assert summary["num_class_images"] == 2 and summary["steps"] == 2
    assert math.isfinite(summary["final_loss"])

    pipe = load_lora_and_check_it_changes_the_unet(tiny_pipeline_dir, out)
    assert pipe.text_encoder.peft_config, "text encoder LoRA was not loaded"


def test_cross_attention_lora_with_sampled_latents_and_plain_mse(
    script, tiny_pipeline_dir, instance_dir, tmp_path
):
    from safetensors.torch import load_file

    out = tmp_path / "out"
    argv = train_args(
        tiny_pipeline_dir,
        instance_dir,
        out,
        max_train_steps=2,
        lora_layers="cross_attention",
        sample_latents="true",
        snr_gamma=0,
    )
    summary, _ = run_script(script, argv + FAST)
    assert summary["hyperparameters"]["snr_gamma"] == 0.0
    assert summary["hyperparameters"]["sample_latents"] is True
    keys = load_file(out / "pytorch_lora_weights.safetensors").keys()
    assert keys and all(".attn2." in key for key in keys), sorted(keys)[:3]
    load_lora_and_check_it_changes_the_unet(tiny_pipeline_dir, out)


def test_sagemaker_environment_alone(
    script, tiny_pipeline_dir, instance_dir, tmp_path, monkeypatch
):
    model_dir, data_dir = tmp_path / "model", tmp_path / "output-data"
    monkeypatch.setenv("SM_MODEL_DIR", str(model_dir))
    monkeypatch.setenv("SM_CHANNEL_INSTANCE", str(instance_dir))
    monkeypatch.setenv("SM_CHANNEL_BASE_MODEL", str(tiny_pipeline_dir))
    monkeypatch.setenv("SM_OUTPUT_DATA_DIR", str(data_dir))
    # SageMaker passes every hyperparameter as a string, booleans as "True"/"False".
    argv = cli(max_train_steps=1, cache_latents=False, train_text_encoder=False) + FAST
    args = script.parse_args(argv)
    assert args.output_dir == str(model_dir) and args.cache_latents is False
    summary, _ = run_script(script, argv)
    assert summary["steps"] == 1
    assert (model_dir / "pytorch_lora_weights.safetensors").is_file()
    assert (data_dir / "validation" / "0.png").is_file()
    assert (model_dir / "validation" / "0.png").is_file()


def test_training_channel_is_the_instance_fallback(script, monkeypatch):
    monkeypatch.setenv("SM_CHANNEL_TRAINING", "/data/training")
    monkeypatch.setenv("SM_CHANNEL_BASE_MODEL", "/data/base")
    args = script.parse_args([])
    assert args.instance_data_dir == "/data/training"
    assert args.pretrained_model_name_or_path == "/data/base"
    assert args.output_dir == "model" and args.validation_output_dir is None


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ([], False),
        (["--train_text_encoder"], True),
        (["--train_text_encoder", "True"], True),
        (["--train_text_encoder", "false"], False),
        (["--train_text_encoder", "0"], False),
    ],
)
def test_boolean_flags_parse_sagemaker_style(script, flag, expected):
    args = script.parse_args([*PLACEHOLDER_PATHS, *flag])
    assert args.train_text_encoder is expected


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--max_train_steps", "0"], "--max_train_steps"),
        (["--max_train_steps", "10001"], "--max_train_steps"),
        (["--rank", "0"], "--rank"),
        (["--rank", "129"], "--rank"),
        (["--learning_rate", "0"], "--learning_rate"),
        (["--learning_rate", "2"], "--learning_rate"),
        (["--learning_rate", "nan"], "--learning_rate"),
        (["--resolution", "60"], "--resolution"),
        (["--resolution", "2048"], "--resolution"),
        (["--train_batch_size", "65"], "--train_batch_size"),
        (["--train_text_encoder", "maybe"], "--train_text_encoder"),
        (["--mixed_precision", "fp8"], "--mixed_precision"),
        (["--with_prior_preservation"], "--class_prompt"),
        (["--checkpoints_total_limit", "2"], "--checkpointing_steps"),
        (["--lr_warmup_steps", "300"], "--lr_warmup_steps"),
    ],
)
def test_bad_values_exit_naming_the_flag(script, argv, named, capsys):
    with pytest.raises(SystemExit) as raised:
        script.parse_args([*PLACEHOLDER_PATHS, *argv])
    assert raised.value.code == 2
    assert named in capsys.readouterr().err


@pytest.mark.parametrize("missing", ["--pretrained_model_name_or_path", "--instance_data_dir"])
def test_missing_paths_exit_naming_the_flag(script, missing, capsys):
    index = PLACEHOLDER_PATHS.index(missing)
    with pytest.raises(SystemExit):
        script.parse_args(PLACEHOLDER_PATHS[:index] + PLACEHOLDER_PATHS[index + 2 :])
    assert missing in capsys.readouterr().err


def test_empty_instance_dir_is_a_clear_error(script, tiny_pipeline_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SM_OUTPUT_DIR", str(tmp_path / "sm-output"))
    (tmp_path / "empty").mkdir()
    args = script.parse_args(train_args(tiny_pipeline_dir, tmp_path / "empty", tmp_path / "out"))
    with pytest.raises(ValueError, match="no instance images"):
        script.main(args)
    assert "no instance images" in (tmp_path / "sm-output" / "failure").read_text()
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()


def test_imports_only_what_a_training_container_has():
    """Packages of the training image, the standard library, and files of the job's source
    directory (`model_code/`, shipped whole), which import only the standard library."""
    beside = {path.stem for path in SCRIPT.parent.glob("*.py")}
    for name in beside - {SCRIPT.stem}:
        assert imported_packages(SCRIPT.parent / f"{name}.py") <= sys.stdlib_module_names, name
    allowed = {"torch", "diffusers", "transformers", "peft", "numpy", "PIL", "safetensors"}
    assert imported_packages(SCRIPT) <= allowed | sys.stdlib_module_names | beside


def imported_packages(path: Path) -> set[str]:
    """The top-level packages `path` imports (absolute imports only)."""
    tree = ast.parse(path.read_text())
    names = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    names |= {
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level == 0
    }
    return {name.split(".")[0] for name in names}


def test_runs_as_a_script(tiny_pipeline_dir, instance_dir, tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in SM_VARIABLES}
    env["OMP_NUM_THREADS"] = "1"
    argv = train_args(
        tiny_pipeline_dir,
        instance_dir,
        out,
        max_train_steps=2,
        num_validation_images=0,
    )
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [int(s) for s, _ in LOSS_LINE.findall(result.stdout)] == [1, 2]
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((out / "training_summary.json").read_text())["steps"] == 2
