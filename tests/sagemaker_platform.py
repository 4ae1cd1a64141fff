"""What the SageMaker platform does with the execution role, done for real with boto3 against
moto, so that each of its calls can run under `iam_enforced.enforced(<the role's statements>)`.

- `run_training_job(config, work_dir, region)`: one training job from its exact
  `CreateTrainingJob` arguments, as SageMaker's training platform and the image's training
  toolkit run it: each channel's S3 prefix downloaded (ListObjectsV2, GetObject) into
  `<work_dir>/input/data/<channel>` (the container's `/opt/ml` is `work_dir` here), the source
  tarball named by `sagemaker_submit_directory` unpacked into `<work_dir>/code`, the entry
  script (`sagemaker_program`) run with the other hyperparameters JSON-decoded as
  `--name value` and the `SM_*` environment, its output shipped to CloudWatch Logs
  (`/aws/sagemaker/TrainingJobs`, stream `<job>/algo-1-<time>`) and the `MetricDefinitions`
  it matches to CloudWatch metrics, and on exit 0 `SM_MODEL_DIR` packed to
  `<S3OutputPath>/<job>/output/model.tar.gz` (and `SM_OUTPUT_DATA_DIR`, when it holds
  anything, to `output.tar.gz` beside it). The training runs this machine's Python, not the
  training image: no image is pulled.
- `install_training_platform()`: moto's SageMaker backend patched (in this process: for
  `mock_aws` and for a `ThreadedMotoServer` alike) so that `CreateTrainingJob` really runs the
  job in a thread with `run_training_job`, `DescribeTrainingJob` says InProgress until it ends,
  then Completed, Failed or Stopped, and `StopTrainingJob` (which moto lacks) stops it.
- `fetch_model(model_data_url, target_model, destination, region)`: what a multi-model
  endpoint does on a model's first request: one GetObject of `<ModelDataUrl><TargetModel>`.

The parts of the local backend that follow the same folder contract are reused from
`helpers.infra.local.jobs` (downloading a prefix, the `--name value` arguments, packing a
folder, the failure reason, stopping a process group), not written again.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from boto3.exceptions import Boto3Error
from botocore.exceptions import BotoCoreError, ClientError
from moto.core.utils import utcnow

from helpers.domain.archives import safe_extract
from helpers.domain.uris import S3Uri
from helpers.infra.aws.jobs import LOG_GROUP
from helpers.infra.aws.store import S3ArtifactStore
from helpers.infra.local.jobs import (
    MAX_REASON,
    _download,
    _terminate,
    cpu_count,
    default_max_concurrent,
    failure_reason,
    hyperparameter_args,
    pack,
)
from helpers.infra.local.processes import spawn

logger = logging.getLogger(__name__)

#: The namespace SageMaker puts training jobs' `MetricDefinitions` metrics in.
METRICS_NAMESPACE = "/aws/sagemaker/TrainingJobs"
#: The one host of a single-instance job.
HOST = "algo-1"
#: Seconds between two shipments of new log lines and metrics while a job runs.
SHIP_INTERVAL_S = 0.5

Status = Callable[[str], None]


# ------------------------------------------------------------------------------- a training job


@dataclass(frozen=True)
class TrainingOutcome:
    """How a training job ended.

    Attributes:
        status (`str`): `"Completed"`, `"Failed"` or `"Stopped"`, as `TrainingJobStatus`.
        failure_reason (`str`, *optional*): why it failed (SageMaker's `FailureReason`).
        model_artifacts (`str`, *optional*): the `s3://` URI of `model.tar.gz`, once uploaded.
        metrics (`dict[str, float]`): each metric definition's last value (`FinalMetricDataList`).
        log (`str`): the job's output, as shipped to CloudWatch Logs.
    """

    status: str
    failure_reason: str | None = None
    model_artifacts: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    log: str = ""


class _PlatformError(Exception):
    """A step of the platform (not the script) failed; the message is the FailureReason."""


def decode_hyperparameters(hyperparameters: Mapping[str, str]) -> dict[str, Any]:
    """Each value JSON-decoded, or kept as it is where it is no JSON (the training toolkit's
    rule for the strings `CreateTrainingJob` carries)."""
    decoded = {}
    for name, value in hyperparameters.items():
        try:
            decoded[name] = json.loads(value)
        except (TypeError, ValueError):
            decoded[name] = value
    return decoded


def run_training_job(
    config: Mapping[str, Any],
    work_dir: str | os.PathLike,
    region: str,
    stop: threading.Event | None = None,
    on_status: Status | None = None,
) -> TrainingOutcome:
    """Run the training job `config` (`CreateTrainingJob`'s arguments) as SageMaker would.

    Every AWS call is a boto3 call of this process (for `enforced` to check), made with the
    credentials and endpoint of the environment. An AWS error, the script's non-zero exit or a
    missing input ends the job Failed, with the reason; `stop` being set (or the stopping
    condition's `MaxRuntimeInSeconds` passing) ends it Stopped.

    Args:
        config (`Mapping`): the `CreateTrainingJob` request
            (`SageMakerTrainingJobs.training_job_config`).
        work_dir (`str` or `os.PathLike`): the job's `/opt/ml`; must not exist yet or be empty.
        region (`str`): the job's region.
        stop (`threading.Event`, *optional*): set it to stop the job (`StopTrainingJob`).
        on_status (`Callable[[str], None]`, *optional*): told each `SecondaryStatus`
            (Downloading, Training, Uploading).

    Raises:
        ValueError: `work_dir` holds files already.
    """
    root = Path(work_dir)
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise ValueError(f"work_dir {root} must be empty: it is the job's /opt/ml")
    stop = stop or threading.Event()
    tell = on_status or (lambda status: None)
    name = config["TrainingJobName"]
    logs = _LogShipper(name, region, config["AlgorithmSpecification"].get("MetricDefinitions", []))
    try:
        store = S3ArtifactStore(region)
        tell("Downloading")
        command, env = _prepare(config, root, store)
        if stop.is_set():
            return TrainingOutcome("Stopped", log=logs.text)
        tell("Training")
        returncode, stopped = _train(config, root, command, env, logs, stop)
        if stopped:
            return TrainingOutcome("Stopped", metrics=logs.final, log=logs.text)
        if returncode != 0:
            reason = f"AlgorithmError: {failure_reason(root, returncode)}"[:MAX_REASON]
            return TrainingOutcome("Failed", reason, metrics=logs.final, log=logs.text)
        tell("Uploading")
        artifacts = _upload(config, root, store)
        return TrainingOutcome("Completed", None, artifacts, logs.final, logs.text)
    except (_PlatformError, ClientError, BotoCoreError, Boto3Error, ValueError, OSError) as error:
        reason = str(error) if isinstance(error, _PlatformError) else _client_error(error)
        logger.warning("training job %s failed: %s", name, reason)
        return TrainingOutcome("Failed", reason[:MAX_REASON], metrics=logs.final, log=logs.text)


def _client_error(error: Exception) -> str:
    if isinstance(error, ClientError):
        return f"ClientError: {error}"
    return f"ClientError: {type(error).__name__}: {error}"


def _prepare(config: Mapping, root: Path, store: S3ArtifactStore) -> tuple[list[str], dict]:
    """Download the channels and the source, write `input/config`; the command and its env."""
    hyperparameters = decode_hyperparameters(config.get("HyperParameters", {}))
    channels = {}
    for channel in config.get("InputDataConfig", []):
        source = channel["DataSource"]["S3DataSource"]
        if source.get("S3DataType", "S3Prefix") != "S3Prefix":
            raise _PlatformError(f"this platform reads S3Prefix channels only: {channel}")
        folder = root / "input" / "data" / channel["ChannelName"]
        folder.mkdir(parents=True)
        try:
            _download(store, source["S3Uri"], folder)
        except ValueError:
            raise _PlatformError(
                f'ClientError: No S3 objects found under S3 URL "{source["S3Uri"]}" given in '
                f"input data source. Please ensure that the bucket exists in the selected "
                "region, that objects exist under that S3 prefix, and that the role has "
                "permissions to read them"
            ) from None
        channels[channel["ChannelName"]] = folder
    for part in ("model", "output/data", "input/config"):
        (root / part).mkdir(parents=True, exist_ok=True)
    for file, value in (
        ("hyperparameters.json", config.get("HyperParameters", {})),
        ("inputdataconfig.json", {c["ChannelName"]: c for c in config.get("InputDataConfig", [])}),
        ("resourceconfig.json", {"current_host": HOST, "hosts": [HOST]}),
    ):
        (root / "input" / "config" / file).write_text(json.dumps(value))

    program = hyperparameters.get("sagemaker_program")
    submit = hyperparameters.get("sagemaker_submit_directory")
    if not program or not submit:
        raise _PlatformError(
            "script mode needs the hyperparameters sagemaker_program and "
            f"sagemaker_submit_directory, got {sorted(hyperparameters)}"
        )
    code = root / "code"
    store.get_file(submit, root / "sourcedir.tar.gz")
    safe_extract(root / "sourcedir.tar.gz", code)
    (root / "sourcedir.tar.gz").unlink()
    if not (code / program).is_file():
        raise _PlatformError(f"AlgorithmError: no entry point {program} in {submit}")

    user = {k: v for k, v in hyperparameters.items() if not k.startswith("sagemaker_")}
    threads = str(max(1, cpu_count() // default_max_concurrent()))
    env = {
        **os.environ,
        "SM_MODEL_DIR": str(root / "model"),
        "SM_INPUT_DIR": str(root / "input"),
        "SM_INPUT_CONFIG_DIR": str(root / "input" / "config"),
        "SM_OUTPUT_DIR": str(root / "output"),
        "SM_OUTPUT_DATA_DIR": str(root / "output" / "data"),
        "SM_CHANNELS": json.dumps(sorted(channels)),
        "SM_HPS": json.dumps(user),
        "SM_CURRENT_HOST": HOST,
        "SM_HOSTS": json.dumps([HOST]),
        "SM_NUM_GPUS": "0",
        "SM_NUM_CPUS": threads,
        "SM_USER_ENTRY_POINT": program,
        "SM_MODULE_DIR": submit,
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }
    for channel, folder in channels.items():
        env[f"SM_CHANNEL_{channel.upper()}"] = str(folder)
    for name, value in user.items():
        env[f"SM_HP_{name.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    return [sys.executable, str(code / program), *hyperparameter_args(user)], env


#: Each job has an instance of its own on SageMaker; this machine runs as many scripts at once
#: as the local backend does, so that jobs do not fight over its cores (two scripts of two
#: threads each on 2 cores train 16 times slower than one after the other).
_INSTANCES = threading.BoundedSemaphore(default_max_concurrent())


def _train(config, root: Path, command, env, logs: _LogShipper, stop) -> tuple[int, bool]:
    """Run the script to its end (or its stop) once an instance is free; its return code and
    whether it was stopped."""
    while not _INSTANCES.acquire(timeout=0.5):  # SageMaker's "Starting": waiting for capacity
        if stop.is_set():
            return -1, True
    try:
        return _run_script(config, root, command, env, logs, stop)
    finally:
        _INSTANCES.release()


def _run_script(config, root: Path, command, env, logs: _LogShipper, stop) -> tuple[int, bool]:
    deadline = time.monotonic() + config.get("StoppingCondition", {}).get(
        "MaxRuntimeInSeconds", 24 * 3600
    )
    log_path = root / "train.log"
    with open(log_path, "ab") as log:
        # The training toolkit's own line, first in every job's log.
        invoking = " ".join(shlex.quote(part) for part in command)
        log.write(f"Invoking script with the following command:\n\n{invoking}\n\n".encode())
        log.flush()
        process = spawn(
            command,
            cwd=root / "code",
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a stop ends its children too
        )
    try:
        with open(log_path, "rb") as reader:
            while process.poll() is None:
                if stop.is_set() or time.monotonic() > deadline:
                    _terminate(process)
                    logs.ship(reader.read())
                    return process.returncode, True
                logs.ship(reader.read())
                stop.wait(SHIP_INTERVAL_S)
            logs.ship(reader.read(), final=True)
    finally:
        if process.poll() is None:  # shipping failed: the job fails, its process must end
            _terminate(process)
    return process.returncode, False


def _upload(config: Mapping, root: Path, store: S3ArtifactStore) -> str:
    """`model.tar.gz` (and `output.tar.gz` if the script wrote output data) to the output path."""
    output = S3Uri.parse_prefix(config["OutputDataConfig"]["S3OutputPath"])
    folder = f"{str(output).rstrip('/')}/{config['TrainingJobName']}/output"
    pack(root / "model", root / "model.tar.gz")
    store.put_file(f"{folder}/model.tar.gz", root / "model.tar.gz")
    data = root / "output" / "data"
    if any(data.iterdir()):
        pack(data, root / "output.tar.gz")
        store.put_file(f"{folder}/output.tar.gz", root / "output.tar.gz")
    return f"{folder}/model.tar.gz"


class _LogShipper:
    """What SageMaker's log agent does for a job: its output lines to CloudWatch Logs, and the
    values its `MetricDefinitions` match to CloudWatch metrics."""

    def __init__(self, job_name: str, region: str, definitions: list[dict]) -> None:
        self.job_name = job_name
        self.region = region
        self.definitions = [(d["Name"], re.compile(d["Regex"])) for d in definitions]
        self.stream = f"{job_name}/{HOST}-{int(time.time())}"
        self.final: dict[str, float] = {}
        self.lines: list[str] = []
        self._partial = b""
        self._logs = None
        self._cloudwatch = None

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def ship(self, data: bytes, final: bool = False) -> None:
        """Send the complete lines of `data` (all of it when `final`)."""
        data = self._partial + data
        if final:
            chunks, self._partial = data.splitlines(), b""
        else:
            *chunks, self._partial = data.split(b"\n")
        lines = [c.decode("utf-8", errors="replace").rstrip("\r") for c in chunks]
        lines = [line for line in lines if line]
        if not lines:
            return
        self.lines += lines
        self._put_events(lines)
        self._put_metrics(lines)

    def _put_events(self, lines: list[str]) -> None:
        if self._logs is None:
            self._logs = boto3.client("logs", region_name=self.region)
            with contextlib.suppress(self._logs.exceptions.ResourceAlreadyExistsException):
                self._logs.create_log_group(logGroupName=LOG_GROUP)
            self._logs.create_log_stream(logGroupName=LOG_GROUP, logStreamName=self.stream)
        now = int(time.time() * 1000)
        self._logs.put_log_events(
            logGroupName=LOG_GROUP,
            logStreamName=self.stream,
            logEvents=[{"timestamp": now, "message": line} for line in lines],
        )

    def _put_metrics(self, lines: list[str]) -> None:
        data = []
        for line in lines:
            for metric, regex in self.definitions:
                match = regex.search(line)
                if match is None:
                    continue
                with contextlib.suppress(ValueError):
                    value = float(match.group(1))
                    self.final[metric] = value
                    data.append(
                        {
                            "MetricName": metric,
                            "Dimensions": [{"Name": "Host", "Value": f"{self.job_name}/{HOST}"}],
                            "Value": value,
                        }
                    )
        if not data:
            return
        if self._cloudwatch is None:
            self._cloudwatch = boto3.client("cloudwatch", region_name=self.region)
        for start in range(0, len(data), 1000):
            self._cloudwatch.put_metric_data(
                Namespace=METRICS_NAMESPACE, MetricData=data[start : start + 1000]
            )


# ------------------------------------------------------------------------------- the endpoint


def fetch_model(
    model_data_url: str, target_model: str, destination: str | os.PathLike, region: str
) -> Path:
    """What a multi-model endpoint does on `target_model`'s first request: one GetObject of
    `<model_data_url><target_model>` into `destination` (returned).

    Raises:
        botocore.exceptions.ClientError: S3's refusal (`AccessDenied`, `NoSuchKey`).
    """
    prefix = S3Uri.parse_prefix(model_data_url)
    uri = S3Uri.parse(f"{str(prefix).rstrip('/')}/{target_model}")
    answer = boto3.client("s3", region_name=region).get_object(Bucket=uri.bucket, Key=uri.key)
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    with open(destination, "wb") as file:
        for chunk in answer["Body"].iter_chunks(1 << 20):
            file.write(chunk)
    return destination


# ------------------------------------------------------------------------------- moto's SageMaker


@dataclass
class _Running:
    thread: threading.Thread
    stop: threading.Event


class TrainingPlatform:
    """The patch `install_training_platform` made: the jobs it runs, and how to undo it.

    Attributes:
        work_dir (`Path`): each job's `/opt/ml` is `<work_dir>/<job_name>`.
        outcomes (`dict[str, TrainingOutcome]`): the ended jobs' outcomes, by name.
    """

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.outcomes: dict[str, TrainingOutcome] = {}
        self._running: dict[tuple[str, str, str], _Running] = {}
        self._lock = threading.Lock()

    def wait(self, timeout: float | None = None) -> None:
        """Return once every job started so far has ended (`TimeoutError` after `timeout`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            runs = list(self._running.values())
        for run in runs:
            run.thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if run.thread.is_alive():
                raise TimeoutError(f"a training job still runs after {timeout} s")

    def stop_all(self) -> None:
        """Stop every running job and wait for each to end."""
        with self._lock:
            runs = list(self._running.values())
        for run in runs:
            run.stop.set()
        for run in runs:
            run.thread.join()

    # -- moto's side ------------------------------------------------------------------------

    def start(self, backend, job, config: dict[str, Any]) -> None:
        """Run `job` (moto's `FakeTrainingJob`) in a thread; it is InProgress until it ends."""
        now = utcnow()
        job.training_job_status = "InProgress"
        job.secondary_status = "Starting"
        job.training_start_time = now
        job.training_end_time = None
        job.model_artifacts = None
        job.final_metric_data_list = None
        job.failure_reason = None
        job.secondary_status_transitions = [
            {"Status": "Starting", "StartTime": now, "StatusMessage": "Starting the job"}
        ]
        # moto puts its own example in place of the request's metric definitions.
        job.algorithm_specification = copy.deepcopy(config["AlgorithmSpecification"])
        key = (backend.account_id, backend.region_name, job.training_job_name)
        stop = threading.Event()

        def status(secondary: str) -> None:
            job.secondary_status = secondary
            job.secondary_status_transitions.append({"Status": secondary, "StartTime": utcnow()})

        def run() -> None:
            try:
                outcome = run_training_job(
                    config, self.work_dir / job.training_job_name, backend.region_name, stop, status
                )
            except Exception as error:  # the thread must record an outcome whatever happens
                logger.exception("training job %s", job.training_job_name)
                outcome = TrainingOutcome("Failed", f"InternalServerError: {error}"[:MAX_REASON])
            self._finish(key, job, outcome)

        thread = threading.Thread(target=run, name=f"training-{job.training_job_name}", daemon=True)
        with self._lock:
            self._running[key] = _Running(thread, stop)
        thread.start()

    def stop_job(self, backend, name: str) -> None:
        """`StopTrainingJob`: Stopping now, Stopped once the script has ended."""
        from moto.sagemaker.exceptions import ValidationError

        job = backend.training_jobs.get(name)
        if job is None:
            raise ValidationError(
                f"Could not find training job '{backend.account_id}/{backend.region_name}/{name}'"
            )
        with self._lock:
            run = self._running.get((backend.account_id, backend.region_name, name))
        if run is None or job.training_job_status != "InProgress":
            raise ValidationError(
                f"The request was rejected because the training job is in status "
                f"{job.training_job_status}."
            )
        job.training_job_status = "Stopping"
        job.secondary_status = "Stopping"
        run.stop.set()

    def _finish(self, key, job, outcome: TrainingOutcome) -> None:
        now = utcnow()
        job.final_metric_data_list = [
            {"MetricName": name, "Value": value, "Timestamp": now}
            for name, value in outcome.metrics.items()
        ] or None
        if outcome.model_artifacts:
            job.model_artifacts = {"S3ModelArtifacts": outcome.model_artifacts}
        job.failure_reason = outcome.failure_reason
        job.training_end_time = now
        job.training_time_in_seconds = int((now - job.training_start_time).total_seconds())
        job.secondary_status = outcome.status
        job.secondary_status_transitions.append({"Status": outcome.status, "StartTime": now})
        job.training_job_status = outcome.status  # last: a reader sees the rest first
        with self._lock:
            self.outcomes[job.training_job_name] = outcome
            self._running.pop(key, None)


@contextlib.contextmanager
def install_training_platform(work_dir: str | os.PathLike) -> Iterator[TrainingPlatform]:
    """Make moto's SageMaker run training jobs for real (see the module's docstring).

    The patch is on moto's classes, so it serves `mock_aws` and a `ThreadedMotoServer` of this
    process alike; on exit running jobs are stopped and the patch is undone.

    Args:
        work_dir (`str` or `os.PathLike`): where the jobs' folders are made.
    """
    from moto.core.responses import ActionResult
    from moto.sagemaker.exceptions import ResourceInUseException
    from moto.sagemaker.models import SageMakerModelBackend
    from moto.sagemaker.responses import SageMakerResponse

    platform = TrainingPlatform(Path(work_dir))
    original = SageMakerModelBackend.create_training_job

    def create_training_job(backend, training_job_name: str, **arguments):
        if training_job_name in backend.training_jobs:
            raise ResourceInUseException(
                "Training job names must be unique within an AWS account and region, and a "
                f"training job with this name already exists ({training_job_name})"
            )
        config = {
            "TrainingJobName": training_job_name,
            "HyperParameters": arguments.get("hyper_parameters") or {},
            "AlgorithmSpecification": copy.deepcopy(arguments["algorithm_specification"]),
            "RoleArn": arguments["role_arn"],
            "InputDataConfig": arguments.get("input_data_config") or [],
            "OutputDataConfig": arguments["output_data_config"],
            "ResourceConfig": arguments["resource_config"],
            "StoppingCondition": arguments.get("stopping_condition") or {},
        }
        job = original(backend, training_job_name=training_job_name, **arguments)
        platform.start(backend, job, config)
        return job

    def stop_training_job(response) -> ActionResult:
        platform.stop_job(response.sagemaker_backend, response._get_param("TrainingJobName"))
        return ActionResult({})

    previous_stop = SageMakerResponse.__dict__.get("stop_training_job")  # moto 5.2.5 has none
    SageMakerModelBackend.create_training_job = create_training_job
    SageMakerResponse.stop_training_job = stop_training_job
    try:
        yield platform
    finally:
        SageMakerModelBackend.create_training_job = original
        if previous_stop is None:
            del SageMakerResponse.stop_training_job
        else:
            SageMakerResponse.stop_training_job = previous_stop
        platform.stop_all()
