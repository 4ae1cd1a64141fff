"""The endpoint's model cache against a scripted Triton: its LRU and budget rules under
concurrency, many times over in a second (the real-server tests check each once)."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest

from helpers.domain.archives import write_tar_gz
from helpers.infra.local.mme_router import ModelCache
from helpers.infra.local.store import LocalArtifactStore

PREFIX = "s3://workshop-test/endpoints/test/models/"
MODELS = [f"user{i}--m1" for i in range(4)]


class ScriptedTriton:
    """Triton's repository and inference API with random load and inference times; records
    what it holds."""

    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed)
        self.loaded: set[str] = set()
        self.most_loaded = 0
        self.invoked_unloaded: list[str] = []

    async def handle(self, request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(self.random.uniform(0, 0.01))
        path = request.url.path
        if path.startswith("/v2/repository/models/"):
            name, action = path.split("/")[4:6]
            if action == "load":
                self.loaded.add(name)
                self.most_loaded = max(self.most_loaded, len(self.loaded))
            else:
                self.loaded.discard(name)
            return httpx.Response(200)
        name = path.split("/")[3]  # /v2/models/<name>/infer
        if name not in self.loaded:
            self.invoked_unloaded.append(name)
            return httpx.Response(400, json={"error": f"{name} is not loaded"})
        return httpx.Response(200, content=name.encode())


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> LocalArtifactStore:
    root = tmp_path_factory.mktemp("cache-store")
    store = LocalArtifactStore(root / "store")
    store.create_bucket("workshop-test")
    for name in MODELS:
        write_tar_gz(root / f"{name}.tar.gz", {f"{name}/config.pbtxt": f'name: "{name}"\n'})
        store.put_file(f"{PREFIX}{name}.tar.gz", root / f"{name}.tar.gz")
    return store


def make_cache(store, tmp_path, triton: ScriptedTriton, budget: int) -> ModelCache:
    cache = ModelCache(store, PREFIX, "http://triton", tmp_path / "cache", max_loaded_models=budget)
    cache.triton = httpx.AsyncClient(
        base_url="http://triton", transport=httpx.MockTransport(triton.handle)
    )
    return cache


async def invoke(cache: ModelCache, name: str) -> bytes:
    answer, _ = await cache.invoke(f"{name}.tar.gz", b"{}", "application/json")
    return answer.content


@pytest.mark.parametrize("seed", range(20))
def test_concurrent_first_requests_over_budget_evict_exactly_the_excess(store, tmp_path, seed):
    triton = ScriptedTriton(seed)

    async def scenario():
        cache = make_cache(store, tmp_path, triton, budget=2)
        answers = await asyncio.gather(*(invoke(cache, name) for name in MODELS[:3]))
        await cache.close()
        return cache, answers

    cache, answers = asyncio.run(scenario())
    assert answers == [name.encode() for name in MODELS[:3]]  # each got its own model
    assert len(cache.evictions) == 1  # one model too many: one eviction, no reload churn
    assert triton.most_loaded <= 2 and not triton.invoked_unloaded


@pytest.mark.parametrize("seed", range(10))
def test_a_random_workload_never_exceeds_the_budget_or_runs_on_an_unloaded_model(
    store, tmp_path, seed
):
    triton = ScriptedTriton(seed)
    draws = random.Random(seed)
    workload = [draws.choice(MODELS) for _ in range(40)]

    async def scenario():
        cache = make_cache(store, tmp_path, triton, budget=2)
        answers = await asyncio.gather(*(invoke(cache, name) for name in workload))
        loaded = list(cache.loaded)
        await cache.close()
        return answers, loaded

    answers, loaded = asyncio.run(scenario())
    assert answers == [name.encode() for name in workload]
    assert triton.most_loaded <= 2 and not triton.invoked_unloaded
    assert set(loaded) == triton.loaded


def test_metrics_carry_sagemakers_exact_names_with_times_in_microseconds(store, tmp_path):
    triton = ScriptedTriton(seed=0)

    async def scenario():
        cache = make_cache(store, tmp_path, triton, budget=1)
        for name in (MODELS[0], MODELS[0], MODELS[1]):  # a miss, a hit, a miss and an eviction
            await invoke(cache, name)
        await cache.close()
        return cache

    cache = asyncio.run(scenario())
    series = {}
    for line in cache.metrics.render().decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            series[name] = float(value)
    assert not [name for name in series if "seconds" in name]
    assert series["ModelCacheHit_count"] == 3 and series["ModelCacheHit_sum"] == 1
    assert series["LoadedModelCount"] == 1
    for name, count in [
        ("ModelLoadingWaitTime", 3),
        ("ModelDownloadingTime", 2),
        ("ModelLoadingTime", 2),
        ("ModelUnloadingTime", 1),
    ]:
        assert series[f"{name}_count"] == count, name
    # an unload takes well under a second and far more than a microsecond: in seconds, the
    # sum would be below 1
    assert 1 < series["ModelUnloadingTime_sum"] < 1e6
    help_lines = cache.metrics.render().decode()
    assert "# HELP ModelLoadingTime Time to load an unpacked model. In microseconds" in help_lines
