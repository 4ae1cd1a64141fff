"""Training jobs as local subprocesses, under SageMaker's script-mode contract.

Each job runs `python model_code/train_dreambooth_lora.py --name value ...` in its own process
group, in a job directory laid out like a SageMaker container's `/opt/ml`:

    <work_dir>/jobs/<job_name>/
        input/data/instance/     the user's images, downloaded from the store (SM_CHANNEL_INSTANCE)
        input/data/base_model/   the base model, when it is an s3:// folder
        model/                   SM_MODEL_DIR: packed into model.tar.gz
        output/data/             SM_OUTPUT_DATA_DIR: packed into output.tar.gz (validation images)
        output/failure           written by the script when it fails (SM_OUTPUT_DIR)
        train.log                stdout and stderr
        supervisor.json          the pids (and start times) of the supervising process and the job
        exit_status.json         the job's return code, written by its launcher when it ends

On exit 0 the model directory goes to `<output_path>/<job_name>/output/model.tar.gz` in the store
(SageMaker's layout) and the job is COMPLETED; otherwise it is FAILED, with the failure file, or
else the last lines of the log, as its reason. Inputs stay in the store either way.

A bounded queue, fair across users: at most `max_concurrent` jobs run at once (default
`max(1, cpus // 2)`: one on a 2-core machine); later jobs stay PENDING until a slot frees, and
the next to start is the oldest job of the user with the fewest jobs running, the one who
started a job longest ago first (round-robin), so ten queued jobs of one user do not delay
another user's first job by ten jobs. Each job gets
`OMP_NUM_THREADS = MKL_NUM_THREADS = max(1, cpus // max_concurrent)`, because more threads than
cores in all made training steps about 30 times slower. One daemon thread per instance starts
queued jobs, records progress (the last `step=... loss=...` line) and finishes ended jobs.

No job outlives the process that started it: each starts through
`helpers.infra.local.processes.spawn`, so the kernel ends it when this process dies, even by
SIGKILL, and its launcher records its exit status.

State lives in the metadata store, so a new instance (a restarted kernel) sees every job and
its outcome. On start it adopts PENDING jobs into its own queue (claiming a job is a versioned
write, so two instances never start the same one), and settles every RUNNING job whose
supervising process is gone: one whose exit status says it ended 0 is packaged and COMPLETED
(it finished before its outcome was recorded), one that ended with an error is FAILED as usual,
and one that was killed or left no status is FAILED with the reason "interrupted: the process
running it ended" (the onboarding driver trains such a model again). A leftover process is
killed only if its pid still names the process that was started (its start time matches).
Jobs supervised by a live process, such as another instance in this kernel, are left alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from helpers.domain.records import JobRecord, JobStatus, check_job_name, utc_now
from helpers.domain.uris import S3Uri
from helpers.infra.local.processes import kill_group, read_exit_status, spawn, start_time
from helpers.ports.jobs import (
    ENTRY_POINT,
    PROGRESS_RE,
    JobDescription,
    JobExists,
    TrainingJobRequest,
    TrainingJobs,
    require_job,
)
from helpers.ports.metadata import AlreadyExists, InvalidTransition, MetadataStore, VersionConflict
from helpers.ports.store import ArtifactStore
from helpers.settings import PROJECT_ROOT, Settings

__all__ = ["INTERRUPTED_REASON", "LocalTrainingJobs", "cpu_count", "default_max_concurrent"]

logger = logging.getLogger(__name__)

#: The failure reason of a job whose supervising process ended while it ran.
INTERRUPTED_REASON = "interrupted: the process running it ended"
#: The entry script that every local job runs.
SCRIPT = PROJECT_ROOT / "model_code" / ENTRY_POINT
#: Lines of the log kept as a failure reason when the script wrote no failure file.
TAIL_LINES = 20
#: SageMaker's FailureReason holds at most this many characters.
MAX_REASON = 1024
_SUPERVISOR_FILE = "supervisor.json"
_EXIT_STATUS_FILE = "exit_status.json"
_STOP_GRACE_SECONDS = 10.0

Key = tuple[str, str]  # (user_id, job_name)


def cpu_count() -> int:
    """CPUs this process may use (the affinity mask where the platform has one)."""
    with contextlib.suppress(AttributeError, OSError):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_max_concurrent() -> int:
    """`max(1, cpus // 2)`: every job gets at least two threads; one job on 2 cores."""
    return max(1, cpu_count() // 2)


@dataclass
class _Run:
    process: subprocess.Popen
    log: IO[bytes]
    directory: Path
    progress: tuple[int, float] | None = None
    done: threading.Event = field(default_factory=threading.Event)


class LocalTrainingJobs(TrainingJobs):
    """Training jobs as subprocesses of this machine.

    Args:
        settings (`Settings`): `work_dir` holds the job directories (`<work_dir>/jobs`).
        store (`ArtifactStore`): where inputs are read and `model.tar.gz` is written.
        metadata (`MetadataStore`): where jobs and their state are kept.
        max_concurrent (`int`, *optional*): jobs running at once; `default_max_concurrent()`.
        poll_interval (`float`, defaults to 0.2): seconds between the supervisor's checks.
        script (`Path`, *optional*): the entry script; `model_code/train_dreambooth_lora.py`.
    """

    def __init__(
        self,
        settings: Settings,
        store: ArtifactStore,
        metadata: MetadataStore,
        max_concurrent: int | None = None,
        poll_interval: float = 0.2,
        script: str | os.PathLike | None = None,
    ) -> None:
        if max_concurrent is None:
            max_concurrent = default_max_concurrent()
        if not isinstance(max_concurrent, int) or isinstance(max_concurrent, bool):
            raise ValueError(f"max_concurrent must be an integer >= 1, got {max_concurrent!r}")
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be an integer >= 1, got {max_concurrent!r}")
        if not isinstance(poll_interval, (int, float)) or poll_interval <= 0:
            raise ValueError(f"poll_interval must be positive seconds, got {poll_interval!r}")
        self.settings = settings
        self.store = store
        self.metadata = metadata
        self.max_concurrent = max_concurrent
        self.threads_per_job = max(1, cpu_count() // max_concurrent)
        self.poll_interval = float(poll_interval)
        self.script = Path(script) if script is not None else SCRIPT
        self.jobs_dir = Path(settings.work_dir) / "jobs"
        self._lock = threading.RLock()
        self._pending: list[Key] = []  # in submission order; `_next_pending` picks fairly
        self._last_start: dict[str, int] = {}  # user -> `_starts` when their last job started
        self._starts = 0
        self._running: dict[Key, _Run] = {}
        self._stopping: set[Key] = set()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._recover()
        self._thread = threading.Thread(
            target=self._supervise, name=f"local-jobs-{id(self):x}", daemon=True
        )
        self._thread.start()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.jobs_dir)!r}, max_concurrent={self.max_concurrent})"
        )

    # -- the port -------------------------------------------------------------------------

    def submit(self, request: TrainingJobRequest) -> JobDescription:
        if not isinstance(request, TrainingJobRequest):
            raise ValueError(f"request must be a TrainingJobRequest, got {type(request).__name__}")
        request.check_inputs()
        self._check_exists(request)
        if not self.store.list(request.instance_data_uri):
            raise ValueError(
                f"instance_data_uri {request.instance_data_uri} holds no images: upload and "
                "validate the user's photos first"
            )
        if request.base_model.startswith("s3://"):
            if not self.store.list(request.base_model):
                raise ValueError(f"base_model {request.base_model} holds no files")
        elif not Path(request.base_model).is_dir():
            raise ValueError(
                f"base_model {request.base_model!r} is not a directory: local jobs need a "
                "diffusers pipeline directory or an s3:// folder (hub ids need SageMaker)"
            )
        try:
            self.metadata.put_job(request.to_record())
        except AlreadyExists:
            raise JobExists(_exists_message(request.job_name)) from None
        with self._lock:
            self._pending.append((request.user_id, request.job_name))
        self._wake.set()
        return self.describe(request.job_name, request.user_id)

    def describe(self, job_name: str, user_id: str) -> JobDescription:
        return JobDescription.from_record(require_job(self.metadata, job_name, user_id))

    def logs(self, job_name: str, user_id: str) -> str:
        record = require_job(self.metadata, job_name, user_id)
        path = self.job_dir(job_name) / "train.log"
        if not path.is_file():
            return f"job {job_name} has no log yet (it is {record.status.value})"
        return path.read_text(encoding="utf-8", errors="replace")

    def stop(self, job_name: str, user_id: str) -> JobDescription:
        record = require_job(self.metadata, job_name, user_id)
        key = (user_id, job_name)
        if record.status.is_final:
            return JobDescription.from_record(record)
        with self._lock:
            run = self._running.get(key)
            if run is not None:
                self._stopping.add(key)
            elif key in self._pending:
                self._pending.remove(key)
        if run is not None:
            _terminate(run.process)
            self._finish(key)
            run.done.wait()  # the supervisor may be the one recording it
        else:
            # Queued here, or run by a process that is gone or is another instance's.
            info = self._supervisor_info(job_name)
            kill_group(info.get("pid"), info.get("pid_started"))
            self._update(key, status=JobStatus.STOPPED, ended_at=utc_now())
        return self.describe(job_name, user_id)

    def list(self, user_id: str | None = None) -> list[JobDescription]:
        return [JobDescription.from_record(job) for job in self.metadata.list_jobs(user_id)]

    def forget(self, job_name: str, user_id: str) -> None:
        """Stop the job if it runs, then delete its directory (the photos' copies, the model,
        the log) and its record."""
        owners = {job.user_id for job in self.metadata.list_jobs() if job.job_name == job_name}
        if owners - {user_id}:
            return  # names are unique across users: this folder is someone else's
        record = self.metadata.get_job(user_id, job_name)
        if record is not None and not record.status.is_final:
            self.stop(job_name, user_id)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.job_dir(job_name))
        self.metadata.delete_job(user_id, job_name)

    # -- lifecycle ------------------------------------------------------------------------

    def job_dir(self, job_name: str) -> Path:
        """The job's directory, `<work_dir>/jobs/<job_name>`."""
        return self.jobs_dir / check_job_name(job_name)

    def close(self, stop_jobs: bool = False) -> None:
        """End the supervisor thread; with `stop_jobs`, stop this instance's jobs first.
        Running jobs left behind are marked interrupted by the next instance."""
        if stop_jobs:
            with self._lock:
                keys = [*self._pending, *self._running]
            for user_id, job_name in keys:
                self.stop(job_name, user_id)
        self._closed.set()
        self._wake.set()
        self._thread.join(timeout=5)

    def _check_exists(self, request: TrainingJobRequest) -> None:
        # Names are unique across users, as on SageMaker (one account), and as directories.
        taken = self.job_dir(request.job_name).exists() or any(
            job.job_name == request.job_name for job in self.metadata.list_jobs()
        )
        if taken:
            raise JobExists(_exists_message(request.job_name))

    def _recover(self) -> None:
        """Adopt PENDING jobs; settle RUNNING jobs whose supervisor is gone."""
        for job in sorted(self.metadata.list_jobs(), key=lambda job: job.created_at):
            key = (job.user_id, job.job_name)
            if job.status == JobStatus.PENDING:
                self._pending.append(key)
            elif job.status == JobStatus.RUNNING:
                info = self._supervisor_info(job.job_name)
                if _supervised(info):
                    continue
                kill_group(info.get("pid"), info.get("pid_started"))
                self._settle(key)

    def _settle(self, key: Key) -> None:
        """Record the outcome of a job whose supervisor died: its exit status, if its launcher
        wrote one, else interrupted."""
        directory = self.job_dir(key[1])
        returncode = read_exit_status(directory / _EXIT_STATUS_FILE)
        if returncode is not None and returncode >= 0:
            progress = last_progress(directory / "train.log")
            if progress is not None:
                self._update(key, last_step=progress[0], last_loss=progress[1])
            self._record_exit(key, directory, returncode)
            logger.warning("job %s/%s ended (%s) unsupervised: recorded now", *key, returncode)
            return
        self._update(
            key, status=JobStatus.FAILED, failure_reason=INTERRUPTED_REASON, ended_at=utc_now()
        )
        logger.warning("job %s/%s marked failed: %s", *key, INTERRUPTED_REASON)

    def _supervise(self) -> None:
        while not self._closed.is_set():
            try:
                self._tick()
            except Exception:  # the supervisor must outlive any one job's trouble
                logger.exception("local training jobs supervisor")
            self._wake.wait(self.poll_interval)
            self._wake.clear()

    def _tick(self) -> None:
        with self._lock:
            running = list(self._running.items())
        for key, run in running:
            if run.process.poll() is not None:
                self._finish(key)
            else:
                self._record_progress(key, run)
        while True:
            # Held through the start, so stop() sees a job either queued or running.
            with self._lock:
                if len(self._running) >= self.max_concurrent or not self._pending:
                    return
                self._start(self._next_pending())

    def _next_pending(self) -> Key:
        """Take the next job to start: the oldest of the user with the fewest jobs running,
        then the one whose last job started longest ago (never: first). Under the lock."""
        running = Counter(user_id for user_id, _ in self._running)
        order: dict[str, int] = {}
        for index, (user_id, _) in enumerate(self._pending):
            order.setdefault(user_id, index)
        user_id = min(
            order, key=lambda user: (running[user], self._last_start.get(user, -1), order[user])
        )
        key = self._pending.pop(order[user_id])
        self._starts += 1
        self._last_start[user_id] = self._starts
        return key

    def _start(self, key: Key) -> None:
        user_id, job_name = key
        job = self.metadata.get_job(user_id, job_name)
        if job is None or job.status != JobStatus.PENDING:
            return
        directory = self.job_dir(job_name)
        directory.mkdir(parents=True, exist_ok=True)
        self._write_supervisor_info(directory, pid=None)
        try:
            job = self.metadata.update_job(
                user_id,
                job_name,
                expected_version=job.version,
                status=JobStatus.RUNNING,
                started_at=utc_now(),
            )
        except (VersionConflict, InvalidTransition):
            return  # claimed or stopped elsewhere meanwhile
        try:
            command, env = self._prepare(job, directory)
            log = open(directory / "train.log", "ab")  # noqa: SIM115 - closed in _finish
        except Exception as error:
            logger.exception("job %s/%s could not start", *key)
            self._update(
                key,
                status=JobStatus.FAILED,
                ended_at=utc_now(),
                failure_reason=f"could not start: {type(error).__name__}: {error}"[:MAX_REASON],
            )
            return
        log.write(f"$ {' '.join(command)}\n".encode())
        log.flush()
        process = spawn(
            command,
            exit_status=directory / _EXIT_STATUS_FILE,
            cwd=directory,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so stop() ends its children too
        )
        self._write_supervisor_info(directory, pid=process.pid)
        with self._lock:
            self._running[key] = _Run(process, log, directory)

    def _prepare(self, job: JobRecord, directory: Path) -> tuple[list[str], dict[str, str]]:
        """Download the inputs, make SageMaker's folders, build the command and environment."""
        instance_dir = directory / "input" / "data" / "instance"
        _download(self.store, job.instance_data_uri, instance_dir)
        base_model = job.base_model or self.settings.base_model
        if base_model.startswith("s3://"):
            base_dir = directory / "input" / "data" / "base_model"
            _download(self.store, base_model, base_dir)
            base_model = str(base_dir)
        for sub in ("model", "output/data"):
            (directory / sub).mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            str(self.script),
            "--pretrained_model_name_or_path",
            base_model,
            *hyperparameter_args(job.hyperparameters),
        ]
        threads = str(self.threads_per_job)
        env = {
            **os.environ,
            "SM_MODEL_DIR": str(directory / "model"),
            "SM_CHANNEL_INSTANCE": str(instance_dir),
            "SM_OUTPUT_DATA_DIR": str(directory / "output" / "data"),
            "SM_OUTPUT_DIR": str(directory / "output"),
            "OMP_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads,
            "OPENBLAS_NUM_THREADS": threads,
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }
        return command, env

    def _record_progress(self, key: Key, run: _Run) -> None:
        progress = last_progress(run.directory / "train.log")
        if progress is not None and progress != run.progress:
            run.progress = progress
            self.metadata.update_job(*key, last_step=progress[0], last_loss=progress[1])

    def _finish(self, key: Key) -> None:
        """Record the outcome of an ended process; only the first caller for a job does."""
        with self._lock:
            run = self._running.pop(key, None)
            stopped = key in self._stopping
            self._stopping.discard(key)
        if run is None:
            return
        try:
            self._record_outcome(key, run, stopped)
        finally:
            run.done.set()
            self._wake.set()

    def _record_outcome(self, key: Key, run: _Run, stopped: bool) -> None:
        run.process.wait()
        run.log.close()
        with contextlib.suppress(Exception):
            self._record_progress(key, run)
        if stopped:
            self._update(key, status=JobStatus.STOPPED, ended_at=utc_now())
        else:
            self._record_exit(key, run.directory, run.process.returncode)

    def _record_exit(self, key: Key, directory: Path, returncode: int) -> None:
        """COMPLETED with its model packaged into the store on exit 0, else FAILED."""
        if returncode != 0:
            self._update(
                key,
                status=JobStatus.FAILED,
                ended_at=utc_now(),
                failure_reason=failure_reason(directory, returncode),
            )
            return
        try:
            self._package(key, directory)
        except Exception as error:
            logger.exception("job %s/%s could not be packaged", *key)
            reason = f"packaging the model failed: {type(error).__name__}: {error}"
            self._update(
                key, status=JobStatus.FAILED, ended_at=utc_now(), failure_reason=reason[:MAX_REASON]
            )
        else:
            self._update(key, status=JobStatus.COMPLETED, ended_at=utc_now())

    def _package(self, key: Key, directory: Path) -> None:
        job = self.metadata.get_job(*key)
        model_tar = directory / "model.tar.gz"
        pack(directory / "model", model_tar)
        self.store.put_file(job.output_uri, model_tar)
        data = directory / "output" / "data"
        if data.is_dir() and any(data.iterdir()):
            output_tar = directory / "output.tar.gz"
            pack(data, output_tar)
            self.store.put_file(job.output_uri.rsplit("/", 1)[0] + "/output.tar.gz", output_tar)

    def _update(self, key: Key, **changes: Any) -> None:
        # Already ended (stopped, say): the first outcome stands.
        with contextlib.suppress(InvalidTransition):
            self.metadata.update_job(*key, **changes)

    def _supervisor_info(self, job_name: str) -> dict[str, Any]:
        with contextlib.suppress(OSError, ValueError):
            return json.loads((self.job_dir(job_name) / _SUPERVISOR_FILE).read_text())
        return {}

    @staticmethod
    def _write_supervisor_info(directory: Path, pid: int | None) -> None:
        # Start times too: a pid read back later may name another process by then.
        info = {
            "supervisor_pid": os.getpid(),
            "supervisor_started": start_time(os.getpid()),
            "pid": pid,
            "pid_started": start_time(pid),
        }
        temp = directory / f".{_SUPERVISOR_FILE}.tmp"
        temp.write_text(json.dumps(info))
        os.replace(temp, directory / _SUPERVISOR_FILE)


# -- helpers ------------------------------------------------------------------------------


def hyperparameter_args(hyperparameters: dict[str, Any]) -> list[str]:
    """`--name value` pairs as the script (and SageMaker) take them; booleans as True/False."""
    args = []
    for name, value in sorted(hyperparameters.items()):
        args += [f"--{name}", _as_text(value)]
    return args


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def last_progress(log_path: Path, window: int = 16384) -> tuple[int, float] | None:
    """The (step, loss) of the last `step=... loss=...` line in the log's last `window` bytes."""
    try:
        with open(log_path, "rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(0, file.tell() - window))
            text = file.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    matches = PROGRESS_RE.findall(text)
    if not matches:
        return None
    step, loss = matches[-1]
    return int(step), float(loss)


def failure_reason(directory: Path, returncode: int) -> str:
    """The script's failure file if it wrote one, else the exit status and the log's tail."""
    failure = directory / "output" / "failure"
    with contextlib.suppress(OSError):
        text = failure.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            return text[:MAX_REASON]
    tail = ""
    with contextlib.suppress(OSError):
        lines = (directory / "train.log").read_text(encoding="utf-8", errors="replace")
        tail = "\n".join(lines.strip().splitlines()[-TAIL_LINES:])
    header = f"exit status {returncode}; last log lines:\n"
    budget = MAX_REASON - len(header)
    # Keep the end of the tail: that is where the error is.
    return header + (tail if len(tail) <= budget else "..." + tail[-(budget - 3) :])


def pack(source: Path, target: Path) -> None:
    """`source`'s contents as a gzipped tar at `target`, paths relative to `source` (SageMaker
    packs `/opt/ml/model` the same way)."""
    temp = target.with_name(target.name + ".tmp")
    with tarfile.open(temp, "w:gz") as archive:
        for path in sorted(source.iterdir()):
            archive.add(path, arcname=path.name)
    os.replace(temp, target)


def _download(store: ArtifactStore, prefix_uri: str | None, directory: Path) -> None:
    if not prefix_uri:
        raise ValueError("the job has no instance_data_uri")
    prefix = S3Uri.parse_prefix(prefix_uri)
    uris = store.list(prefix)
    if not uris:
        raise ValueError(f"{prefix_uri} holds no files")
    for uri in uris:
        relative = S3Uri.parse(uri).key[len(prefix.key_prefix) :]
        store.get_file(uri, directory / relative)


def _supervised(info: dict[str, Any]) -> bool:
    """Whether the supervisor named in `supervisor.json` is still that same process."""
    started = start_time(info.get("supervisor_pid"))
    return started is not None and started == info.get("supervisor_started")


def _terminate(process: subprocess.Popen) -> None:
    """SIGTERM to the job's process group, SIGKILL after a grace period."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=_STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # our own child: its pid is not reused yet
        process.wait()


def _exists_message(job_name: str) -> str:
    return f"a training job named {job_name!r} already exists: job names are never reused"
