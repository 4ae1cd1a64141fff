"""The capacity and cost model (`helpers.workshop.capacity`): its approximations against exact
answers, its monotonicity, its price table, and its speed at 10 million users."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from helpers.workshop.capacity import (
    MODES,
    Demand,
    Targets,
    che_hit_ratio,
    closed_loop_throughput,
    erlang_c,
    invocations_per_instance_target,
    lru_replay,
    plan,
    popularity,
    predict_local,
    response_quantiles,
    scale_table,
)
from helpers.workshop.capacity_limits import limits
from helpers.workshop.capacity_prices import (
    AWS_TRAINING_BASIS,
    INSTANCES,
    PRICES,
    price,
    training_cost,
)


def _zipf_sequence(users: int, s: float, length: int, seed: int = 0) -> list[int]:
    weights = np.arange(1, users + 1, dtype=float) ** -s
    rng = np.random.default_rng(seed)
    return rng.choice(users, size=length, p=weights / weights.sum()).tolist()


@pytest.mark.parametrize(("users", "s", "capacity"), [(200, 0.8, 20), (200, 1.2, 5), (50, 1.0, 25)])
def test_che_matches_an_exact_lru_simulation(users, s, capacity):
    sequence = _zipf_sequence(users, s, 200_000)
    simulated = lru_replay(sequence[20_000:], capacity)  # past the cold start, as Che's is
    counts, shares = popularity(users, s)
    predicted = che_hit_ratio(counts, shares, capacity)
    assert predicted == pytest.approx(simulated, rel=0.03)


def test_bucketed_popularity_matches_the_exact_sum():
    exact_counts, exact_shares = popularity(100_000, 0.9, exact_ranks=100_000)
    counts, shares = popularity(100_000, 0.9, exact_ranks=1_000, buckets=500)
    assert len(counts) < 2_000 and counts.sum() == 100_000
    for capacity in (10, 1_000, 20_000):
        exact = che_hit_ratio(exact_counts, exact_shares, capacity)
        assert che_hit_ratio(counts, shares, capacity) == pytest.approx(exact, rel=0.005)


def test_more_cache_more_hits_and_everything_cached_hits_always():
    counts, shares = popularity(1_000, 1.0)
    ratios = [che_hit_ratio(counts, shares, c) for c in (1, 10, 100, 500, 999)]
    assert ratios == sorted(ratios) and ratios[0] > 0
    assert che_hit_ratio(counts, shares, 1_000) == 1.0


def test_more_users_need_more_instances_and_cost_more():
    for mode in MODES:
        plans = [plan(Demand(users=n), mode) for n in (1_000, 30_000, 1_000_000)]
        instances = [p.instances for p in plans]
        assert instances == sorted(instances) and instances[-1] > instances[0]
        assert all(p.utilisation <= 0.7 and p.p95_s <= 15 for p in plans)


def test_the_fewest_instances_are_found():
    demand = Demand(users=200_000)
    for mode in MODES:
        found = plan(demand, mode)
        assert found.binding in ("utilisation", "p95")
        one_fewer = Targets(max_instances=found.instances - 1)
        assert plan(demand, mode, targets=one_fewer).instances is None  # so none fewer meets


def test_per_user_models_cost_more_than_the_shared_base_at_scale():
    table = {(p.users, p.mode): p for p in scale_table()}
    big = 10_000_000
    assert table[big, "per-user"].dollars_per_month > table[big, "shared-base"].dollars_per_month
    assert table[1_000, "shared-base"].instances == 1


def test_ten_million_users_in_well_under_a_second_and_names_the_binding_limit():
    started = time.perf_counter()
    plans = [plan(Demand(users=10_000_000), mode) for mode in MODES]
    found = limits(Demand(users=10_000_000), plans)
    assert time.perf_counter() - started < 1.0  # about 0.2 s on an idle core
    assert found["binds_first"] == found["limits"][0]["limit"]
    ratios = [row["demand_over_quota"] for row in found["limits"]]
    assert ratios == sorted(ratios, reverse=True) and ratios[0] > 1
    names = " ".join(row["limit"] for row in found["limits"])
    for kind in ("endpoint instances", "S3 GET", "DynamoDB", "training instances"):
        assert kind in names


def test_closed_loop_throughput_known_cases():
    # one client: one request per service + think time
    assert closed_loop_throughput(1, 0.5, 1.5, 4) == pytest.approx(0.5)
    # no think time: every server busy once clients >= servers
    assert closed_loop_throughput(4, 2.0, 0.0, 2) == pytest.approx(1.0)
    # two clients, one server, S = Z = 1: the chain's P = (1/5, 2/5, 2/5), busy 4/5
    assert closed_loop_throughput(2, 1.0, 1.0, 1) == pytest.approx(0.8)
    # many clients never exceed the servers' rate
    assert closed_loop_throughput(100, 1.0, 0.01, 3) == pytest.approx(3.0, rel=1e-3)


def test_erlang_c_and_quantiles_against_known_values():
    # M/M/1: P(wait) = rho; M/M/2 at a = 1: 1/3
    assert erlang_c(1, 0.6) == pytest.approx(0.6)
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)
    assert 0 < erlang_c(5_000, 4_900.0) < 1
    # M/D/1-like: deterministic service (hit ratio 1), light load: p50 = the service time
    light = response_quantiles(0.01, 1, 1.0, 2.0, 10.0)
    assert light.p50_s == pytest.approx(2.0, abs=0.01)
    # p95 of a 30% miss mix is the miss time at least
    mixed = response_quantiles(0.01, 4, 0.7, 2.0, 10.0)
    assert mixed.p95_s >= 10.0 and mixed.p50_s == pytest.approx(2.0, abs=0.01)
    assert math.isinf(response_quantiles(1.0, 1, 1.0, 2.0, 2.0).p95_s)


def test_local_prediction_of_one_client_is_service_plus_think():
    predicted = predict_local(40, 1.2, 4, 1, warm_s=0.1, load_s=5.0, think_s=0.01, cores=2)
    counts, shares = popularity(40, 1.2)
    hit = che_hit_ratio(counts, shares, 4)
    assert predicted.hit_ratio == pytest.approx(hit, abs=1e-4)
    assert predicted.requests_per_second == pytest.approx(
        1 / (0.1 + (1 - hit) * 5.0 + 0.01), abs=1e-3
    )
    assert predict_local(40, 1.2, 8, 4, 0.1, 5.0, 0.0, cores=2).servers == 2


def test_every_price_names_region_source_and_date_and_the_training_check_holds():
    regions = {p.region for p in PRICES}
    assert {"us-east-1", "us-west-2", "eu-west-1"} <= regions
    for entry in PRICES:
        assert entry.instance_type.startswith("ml.g5.")
        assert entry.source.startswith("https://") and entry.recorded and entry.status
        assert 0.5 < entry.inference_per_hour < 10
    # AWS's guidance: 1500 s on ml.g5.xlarge is about $0.59
    seconds = AWS_TRAINING_BASIS["seconds"]
    assert seconds * price("ml.g5.xlarge").training_per_hour / 3600 == pytest.approx(0.59, abs=0.01)
    assert training_cost(steps=1000)[0].dollars_per_user == pytest.approx(0.59, abs=0.01)
    assert INSTANCES["ml.g5.xlarge"].models_per_instance >= 1


def test_training_estimate_scales_with_model_size():
    _small, scaled = training_cost(
        steps=1000, local_seconds_per_step=0.05, local_unet_params=3_000_000,
        local_latent_positions=256, gpu_speedup=100,
    )  # fmt: skip
    assert "estimate" in scaled.basis
    ratio = (865_910_724 * 4096) / (3_000_000 * 256)
    assert scaled.seconds_per_step == pytest.approx(0.05 * ratio / 100, rel=1e-3)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: Demand(users=0), "users"),
        (lambda: Demand(users=10, active_fraction=1.5), "active_fraction"),
        (lambda: Demand(users=10, peak_to_mean=0.5), "peak_to_mean"),
        (lambda: Demand(users=10, max_per_user_per_day=0.1), "max_per_user_per_day"),
        (lambda: Targets(utilisation=1.0), "utilisation"),
        (lambda: plan(Demand(users=10), "per-instance"), "mode"),
        (lambda: price("ml.g5.xlarge", "mars-1"), "region"),
        (lambda: closed_loop_throughput(0, 1.0, 0.0, 1), "clients"),
    ],
)
def test_bad_inputs_name_the_field(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_autoscaling_target_from_the_service_time():
    # 2.0 s per image: 30 a minute at saturation, 21 at 70%
    assert invocations_per_instance_target(1.0, utilisation=0.7) == pytest.approx(21.0)
    assert invocations_per_instance_target(1.0, utilisation=0.999) == pytest.approx(30, rel=1e-2)
    # per-user misses cost a load: fewer invocations keep an instance as busy
    assert invocations_per_instance_target(0.5, "per-user") < invocations_per_instance_target(
        0.5, "shared-base"
    )


def test_lru_replay_starts_from_the_given_cache():
    assert lru_replay(["a", "b", "a", "c", "b"], 2) == pytest.approx(1 / 5)
    assert lru_replay(["a", "b", "a"], 2, initial=["b", "a"]) == 1.0
    # only the `capacity` most recent of `initial` stay
    assert lru_replay(["x"], 1, initial=["x", "y"]) == 0.0
