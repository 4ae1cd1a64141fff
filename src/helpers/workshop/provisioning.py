"""Provisioning as checks, the way notebook 01 shows it: the artifact bucket, the metadata table
and, where SageMaker runs the work, the execution role.

`Backend.provision` (`helpers.backend`) raises on the first problem (for services and tests);
`check_provisioning` and `check_store_round_trip` report each step as a `CheckResult` with the
fix:

```py
from helpers.workshop.environment import render_checks, require

report = check_provisioning(open_backend(settings))
print(report)
require(report.results)
```
"""

from __future__ import annotations

from dataclasses import dataclass

from helpers.backend import Backend, Place, Provisioned
from helpers.ports.metadata import MetadataStore
from helpers.ports.store import ArtifactStore
from helpers.workshop.environment import CheckResult, render_checks


@dataclass
class ProvisioningReport:
    """What `check_provisioning` found.

    Args:
        results (`list[CheckResult]`): one per resource (artifact store, metadata table, and
            the execution role where SageMaker runs the work).
        provisioned (`Provisioned`, *optional*): what was set up; `None` when a step failed.
    """

    results: list[CheckResult]
    provisioned: Provisioned | None = None

    @property
    def ok(self) -> bool:
        return self.provisioned is not None

    def __str__(self) -> str:
        return render_checks(self.results)


def _failure(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


def _check(name: str, place: Place, create) -> CheckResult:
    try:
        create()
    except Exception as error:
        return CheckResult(name, False, f"{place.where}: {_failure(error)}", fix=place.fix)
    return CheckResult(name, True, place.where)


def _store_check(backend: Backend) -> tuple[CheckResult, ArtifactStore | None]:
    result = _check(
        "artifact store",
        backend.store_place(),
        lambda: backend.store.create_bucket(backend.settings.bucket),
    )
    return result, backend.store if result.ok else None


def _metadata_check(backend: Backend) -> tuple[CheckResult, MetadataStore | None]:
    def create() -> None:
        backend.metadata.create_table()
        backend.quotas.prepare()  # the API's counters: the same table on AWS, with a TTL

    result = _check("metadata table", backend.metadata_place(), create)
    return result, backend.metadata if result.ok else None


def _role_check(backend: Backend) -> tuple[CheckResult, str | None]:
    try:
        role_arn = backend.execution_role()
    except Exception as error:
        detail = str(error) if isinstance(error, ValueError) else _failure(error)
        return (
            CheckResult(
                "execution role",
                False,
                detail,
                fix="set WORKSHOP_ROLE_ARN (the notebook's role_arn parameter) to a role that "
                "SageMaker can assume and this session may read with iam:GetRole, or run in "
                "SageMaker Studio, whose execution role is found by itself",
            ),
            None,
        )
    if role_arn is None:
        return None, None
    return CheckResult("execution role", True, role_arn), role_arn


def check_provisioning(backend: Backend) -> ProvisioningReport:
    """`Backend.provision` as checks: every step is tried, and none raises.

    Args:
        backend (`Backend`): whose bucket and table to set up (`helpers.backend.open_backend`).

    Returns:
        `ProvisioningReport`: a result per step with the fix when it failed, and the
        `Provisioned` stores when every step passed.
    """
    store_result, store = _store_check(backend)
    metadata_result, metadata = _metadata_check(backend)
    results = [store_result, metadata_result]
    role_result, role_arn = _role_check(backend)
    if role_result is not None:
        results.append(role_result)
    if not all(result.ok for result in results):
        return ProvisioningReport(results)
    lines = [f"{result.name:<14} : {result.detail}" for result in results]
    return ProvisioningReport(results, Provisioned(store, metadata, role_arn, lines))


def check_store_round_trip(
    backend: Backend, store: ArtifactStore | None = None, key: str = "workshop/hello.txt"
) -> CheckResult:
    """Write, read back, list and delete one small object under `key`.

    Args:
        backend (`Backend`): the bucket, and the fix when it fails.
        store (`ArtifactStore`, *optional*): the store to try; `backend.store`.
        key (`str`, defaults to `"workshop/hello.txt"`): the object's key; it is deleted again.
    """
    store = store or backend.store
    uri = backend.settings.uri(key)
    data = b"hello from notebook 01"
    fix = backend.round_trip_fix()
    try:
        store.put_bytes(uri, data)
        back = store.get_bytes(uri)
        listed = uri in store.list(uri.rsplit("/", 1)[0] + "/")
        store.delete(uri)
        gone = not store.exists(uri)
    except Exception as error:
        return CheckResult("store round trip", False, f"{uri}: {_failure(error)}", fix=fix)
    problems = {
        "read back other bytes than were written": back != data,
        "the listing does not show it": not listed,
        "it is still there after delete": not gone,
    }
    found = [problem for problem, happened in problems.items() if happened]
    if found:
        return CheckResult("store round trip", False, f"{uri}: {'; '.join(found)}", fix=fix)
    return CheckResult(
        "store round trip",
        True,
        f"{uri}: wrote {len(data)} bytes, read them back, listed and deleted them",
    )
