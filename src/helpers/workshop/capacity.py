"""A capacity and cost model of the endpoint, for both serving modes, from 1 thousand users up.

The model, in five steps (each function's docstring says its formula and assumption):

1. **Demand** (`Demand`): N users send N x active fraction x requests per active user images a
   day; the busiest hour runs at `peak_to_mean` times the day's mean rate. Which users ask is
   skewed: rank i's share is proportional to i^-s (Zipf), capped at `max_per_user_per_day`
   images (a person does not draw all day), the excess spread over the others.
2. **Cache-hit ratio** (`che_hit_ratio`): an LRU cache of C items under independent requests
   (Che's approximation). Per-user models: C = pipelines per instance x instances (an MME sends
   a model's requests to instances that hold it; the model counts the fleet as one cache, an
   upper bound, as a popular model may be loaded on several). Shared base: every instance sees
   every user, so C = adapters that fit on one instance, whatever the fleet's size.
3. **Service time**: hit x inference + miss x (load + inference) per user model, or
   hit x inference + miss x (swap + inference) for the shared base.
4. **Latency and instances** (`response_quantiles`, `plan`): the busiest hour's arrivals queue
   for instances x concurrency servers (M/G/c: Erlang C's waiting probability, its mean wait
   scaled by (1 + cv^2) / 2 as Allen and Cunneen do); the fewest instances that keep
   utilisation <= a target and p95 <= an SLO, never fewer than `min_instances`.
5. **Dollars**: instances x price per hour x 730 hours a month (always-on, at the peak's size:
   an upper bound, which autoscaling lowers off-peak).

`closed_loop_throughput` is the variant for a fixed number of clients that wait for each answer
(the local load test). Beside this module: `helpers.workshop.capacity_prices` (prices, instance
profiles, `training_cost`: what onboarding one user costs) and
`helpers.workshop.capacity_limits` (`limits`: what breaks first at a scale).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from helpers.domain.serving import SERVING_MODES
from helpers.settings import PROJECT_ROOT
from helpers.workshop.capacity_prices import INSTANCES, InstanceProfile, Price, price

#: The serving modes the model plans for, as settings and the API spell them.
MODES = SERVING_MODES
#: The committed copy of `benchmarks/capacity_model.py`'s report (notebook 03 and the README).
VALIDATION_JSON = PROJECT_ROOT / "documentation" / "benchmarks" / "capacity_model.json"
HOURS_PER_MONTH = 730
#: Ranks counted one by one; beyond, users are grouped in geometric buckets (see `popularity`).
EXACT_RANKS = 10_000
BUCKETS = 2_000


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if not isinstance(value, int | float) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


@dataclass(frozen=True)
class Demand:
    """Who asks for how many images, and when.

    Attributes:
        users (`int`): registered users N (each with one personal model).
        active_fraction (`float`, defaults to 0.1): the share of users active on a day.
        requests_per_active_user (`float`, defaults to 10): images an active user asks a day.
        peak_to_mean (`float`, defaults to 2.0): the busiest hour's rate over the day's mean (a
            daily profile with evenings at twice the mean).
        zipf_s (`float`, defaults to 1.0): the Zipf exponent of per-user popularity.
        max_per_user_per_day (`float`, defaults to 200): the most images one user asks a day.
        new_users_per_day_fraction (`float`, defaults to 0.003): users onboarding each day, as a
            share of N (0.3%: the base doubles in about eight months), for the training load.
    """

    users: int
    active_fraction: float = 0.1
    requests_per_active_user: float = 10.0
    peak_to_mean: float = 2.0
    zipf_s: float = 1.0
    max_per_user_per_day: float = 200.0
    new_users_per_day_fraction: float = 0.003

    def __post_init__(self) -> None:
        if not isinstance(self.users, int) or self.users < 1:
            raise ValueError(f"users must be an integer >= 1, got {self.users!r}")
        if not 0 < self.active_fraction <= 1:
            raise ValueError(f"active_fraction must be in (0, 1], got {self.active_fraction!r}")
        _positive("requests_per_active_user", self.requests_per_active_user)
        if self.peak_to_mean < 1:
            raise ValueError(f"peak_to_mean must be >= 1, got {self.peak_to_mean!r}")
        _positive("zipf_s", self.zipf_s, allow_zero=True)
        _positive("new_users_per_day_fraction", self.new_users_per_day_fraction, allow_zero=True)
        if self.max_per_user_per_day * self.users < self.requests_per_day:
            raise ValueError(
                f"max_per_user_per_day={self.max_per_user_per_day!r} x users={self.users} is "
                f"below the {self.requests_per_day:g} requests a day asked: raise the cap"
            )

    @property
    def requests_per_day(self) -> float:
        return self.users * self.active_fraction * self.requests_per_active_user

    @property
    def peak_per_second(self) -> float:
        """The busiest hour's arrival rate: requests a day / 86400 x peak-to-mean."""
        return self.requests_per_day / 86_400 * self.peak_to_mean


@dataclass(frozen=True)
class Targets:
    """What the fleet must meet, and its bounds.

    Attributes:
        utilisation (`float`, defaults to 0.7): the busiest hour's busy share of the servers
            (headroom for bursts and for autoscaling to react).
        p95_s (`float`, defaults to 15): the 95th percentile of a request's time on the endpoint.
        min_instances (`int`, defaults to 1): the fleet never shrinks below this.
        max_instances (`int`, defaults to 1,000,000): the search stops here (infeasible beyond).
    """

    utilisation: float = 0.7
    p95_s: float = 15.0
    min_instances: int = 1
    max_instances: int = 1_000_000

    def __post_init__(self) -> None:
        if not 0 < self.utilisation < 1:
            raise ValueError(f"utilisation must be in (0, 1), got {self.utilisation!r}")
        _positive("p95_s", self.p95_s)
        if not isinstance(self.min_instances, int) or self.min_instances < 1:
            raise ValueError(f"min_instances must be an integer >= 1, got {self.min_instances!r}")
        if self.max_instances < self.min_instances:
            raise ValueError("max_instances must be >= min_instances")


# ------------------------------------------------------------------------ popularity and cache


def popularity(
    users: int, zipf_s: float, exact_ranks: int = EXACT_RANKS, buckets: int = BUCKETS
) -> tuple[np.ndarray, np.ndarray]:
    """Zipf shares of `users` ranked users, as (counts, share per user) arrays summing to 1.

    Ranks up to `exact_ranks` are one user each; the rest fall into `buckets` geometric groups
    (each about 0.4% wider than the last at 10 million users) whose users share the group's
    mean, i^-s integrated over the group. So 10 million users cost 12,000 array entries.
    """
    exact = min(users, exact_ranks)
    ranks = np.arange(1, exact + 1, dtype=float)
    counts = [np.ones(exact)]
    weights = [ranks**-zipf_s]
    if users > exact:
        edges = np.unique(np.geomspace(exact + 1, users + 1, buckets + 1).round())
        low, high = edges[:-1], edges[1:]  # ranks low .. high - 1
        group = high - low
        a, b = low - 0.5, high - 0.5
        if zipf_s == 1:
            mass = np.log(b / a)
        else:
            mass = (b ** (1 - zipf_s) - a ** (1 - zipf_s)) / (1 - zipf_s)
        counts.append(group)
        weights.append(mass / group)
    counts_all, weights_all = np.concatenate(counts), np.concatenate(weights)
    return counts_all, weights_all / float(np.dot(counts_all, weights_all))


def capped_shares(counts: np.ndarray, shares: np.ndarray, cap_share: float) -> np.ndarray:
    """`shares` with none above `cap_share`, the excess spread in proportion over the others:
    min(cap, k x share) with k such that they sum to 1 again (water filling)."""
    if float(np.dot(counts, np.minimum(shares, cap_share))) >= 1 - 1e-12:
        return shares
    low, high = 1.0, cap_share / float(shares.min())
    for _ in range(100):
        k = math.sqrt(low * high)
        if float(np.dot(counts, np.minimum(k * shares, cap_share))) < 1:
            low = k
        else:
            high = k
    return np.minimum(high * shares, cap_share)


def che_hit_ratio(counts: np.ndarray, shares: np.ndarray, capacity: float) -> float:
    """The hit ratio of an LRU cache holding `capacity` items, by Che's approximation.

    Requests are independent draws (user i with probability p_i). An item stays cached for a
    characteristic time T (in requests) after its last request; T solves
    sum_i (1 - exp(-p_i T)) = C, and the hit ratio is sum_i p_i (1 - exp(-p_i T)). Steady state:
    a user's very first request, a miss whatever the cache, is not counted.
    """
    total_items = float(counts.sum())
    if capacity >= total_items:
        return 1.0
    if capacity <= 0:
        return 0.0

    def occupied(t: float) -> float:
        return float(np.dot(counts, -np.expm1(-shares * t)))

    low = high = float(capacity)  # sum(1 - exp(-p T)) <= T, so T >= C
    while occupied(high) < capacity:
        low, high = high, high * 2
    for _ in range(60):
        middle = math.sqrt(low * high)
        if occupied(middle) < capacity:
            low = middle
        else:
            high = middle
    return float(np.dot(counts * shares, -np.expm1(-shares * high)))


def lru_replay(sequence: Sequence[str], capacity: int, initial: Sequence[str] = ()) -> float:
    """The hit ratio of an exact LRU cache of `capacity` items over `sequence`, starting with
    `initial` cached (least recently used first); other items' first requests are misses."""
    from collections import OrderedDict

    cache: OrderedDict[str, None] = OrderedDict((item, None) for item in initial[-capacity:])
    hits = 0
    for item in sequence:
        if item in cache:
            hits += 1
            cache.move_to_end(item)
        else:
            cache[item] = None
            if len(cache) > capacity:
                cache.popitem(last=False)
    return hits / max(len(sequence), 1)


# ------------------------------------------------------------------------------- queueing


def erlang_c(servers: int, offered: float) -> float:
    """The probability that an arrival waits in an M/M/c queue (Erlang C), for `servers` c and
    offered load a = arrival rate x mean service time (< c), computed in log space so that
    thousands of servers do not overflow."""
    if offered <= 0:
        return 0.0
    if offered >= servers:
        return 1.0
    k = np.arange(servers)
    log_terms = k * math.log(offered) - np.cumsum(np.log(np.maximum(k, 1)))
    log_last = servers * math.log(offered) - math.lgamma(servers + 1)
    log_last += math.log(servers / (servers - offered))
    top = float(np.max(log_terms))
    below = math.log(float(np.sum(np.exp(log_terms - top)))) + top
    gap = below - log_last
    return 0.0 if gap > 700 else 1 / (1 + math.exp(gap))


@dataclass(frozen=True)
class Latency:
    """Response time on the endpoint: queueing wait plus service."""

    mean_service_s: float
    utilisation: float
    p_wait: float
    p50_s: float
    p95_s: float


def response_quantiles(
    arrival_per_s: float,
    servers: int,
    hit_ratio: float,
    hit_s: float,
    miss_s: float,
    quantiles: Sequence[float] = (0.5, 0.95),
) -> Latency:
    """Quantiles of wait + service, for Poisson arrivals at `arrival_per_s` on `servers`.

    Service takes `hit_s` with probability `hit_ratio`, else `miss_s`. The wait is an M/G/c
    approximation: it is 0 with probability 1 - Erlang C, else exponential with the M/M/c mean
    1 / (c mu - lambda) scaled by (1 + cv^2) / 2, cv the service time's coefficient of
    variation (Allen-Cunneen). Utilisation >= 1 gives infinite quantiles.
    """
    mean = hit_ratio * hit_s + (1 - hit_ratio) * miss_s
    utilisation = arrival_per_s * mean / servers
    if utilisation >= 1:
        inf = math.inf
        return Latency(mean, utilisation, 1.0, inf, inf)
    second = hit_ratio * hit_s**2 + (1 - hit_ratio) * miss_s**2
    cv2 = second / mean**2 - 1
    p_wait = erlang_c(servers, arrival_per_s * mean)
    wait_mean = (1 + cv2) / 2 / (servers / mean - arrival_per_s)
    outcomes = ((hit_ratio, hit_s), (1 - hit_ratio, miss_s))

    def cdf(x: float) -> float:
        total = 0.0
        for weight, service in outcomes:
            if x >= service:
                total += weight * (1 - p_wait * math.exp(-(x - service) / wait_mean))
        return total

    values = []
    for q in quantiles:
        low, high = 0.0, max(hit_s, miss_s) + 60 * wait_mean
        for _ in range(80):
            middle = (low + high) / 2
            low, high = (middle, high) if cdf(middle) < q else (low, middle)
        values.append(high)
    return Latency(mean, utilisation, p_wait, values[0], values[-1])


def closed_loop_throughput(clients: int, service_s: float, think_s: float, servers: int) -> float:
    """Requests per second of `clients` that each send a request, wait for its answer, pause
    `think_s`, and send the next, to `servers` parallel servers of mean service `service_s`.

    The machine-repairman model (a closed M/M/c//K queue), solved exactly as a birth-death
    chain: with n requests in the system, the next arrives at rate (K - n) / Z and one ends at
    rate min(n, c) / S; throughput = sum_n P(n) min(n, c) / S. With Z = 0 every client is
    always in the system: min(K, c) / S. (With one client, 1 / (S + Z) whatever the
    distributions.) `servers` may be fractional: a machine's measured parallel speed-up.
    """
    if not isinstance(clients, int) or clients < 1:
        raise ValueError(f"clients must be an integer >= 1, got {clients!r}")
    if not isinstance(servers, int | float) or not servers >= 1:
        raise ValueError(f"servers must be a number >= 1, got {servers!r}")
    _positive("service_s", service_s)
    _positive("think_s", think_s, allow_zero=True)
    if think_s == 0:
        return min(clients, servers) / service_s
    log_p = [0.0]  # log of unnormalised P(n)
    for n in range(1, clients + 1):
        up = (clients - n + 1) / think_s
        down = min(n, servers) / service_s
        log_p.append(log_p[-1] + math.log(up / down))
    p = np.exp(np.array(log_p) - max(log_p))
    p /= p.sum()
    busy = np.minimum(np.arange(clients + 1), servers)
    return float(np.dot(p, busy)) / service_s


# ----------------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class ModePlan:
    """One serving mode's fleet for a demand (None fields where no fleet meets the targets)."""

    mode: str
    users: int
    instance_type: str
    hit_ratio: float
    cache_items: int
    instances: int | None
    p50_s: float | None
    p95_s: float | None
    utilisation: float | None
    peak_requests_per_s: float
    misses_per_s: float
    dollars_per_month: float | None
    dollars_per_user_month: float | None
    binding: str

    def as_dict(self) -> dict:
        return asdict(self)


def _hit_ratio(mode: str, shares: tuple, profile: InstanceProfile, instances: int) -> tuple:
    counts, p = shares
    items = (
        profile.models_per_instance * instances
        if mode == "per-user"
        else profile.adapters_per_instance
    )
    return che_hit_ratio(counts, p, items), items


def plan(
    demand: Demand,
    mode: str,
    profile: InstanceProfile | None = None,
    cost: Price | None = None,
    targets: Targets | None = None,
) -> ModePlan:
    """The fewest instances of `profile` that serve `demand` in `mode` within `targets`.

    Instances are searched by doubling, then bisection: more instances never lower the hit
    ratio, so a count that meets the targets stays meeting them.

    Args:
        demand (`Demand`): users and their requests.
        mode (`str`): `"per-user"` or `"shared-base"`.
        profile (`InstanceProfile`, defaults to ml.g5.xlarge's): what an instance holds, and
            how fast it serves.
        cost (`Price`, defaults to the profile's type in us-east-1): dollars per hour.
        targets (`Targets`, defaults to `Targets()`): utilisation, p95 and instance bounds.

    Raises:
        `ValueError`: an unknown mode.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    profile = profile or INSTANCES["ml.g5.xlarge"]
    cost = cost or price(profile.instance_type)
    targets = targets or Targets()
    counts, p = popularity(demand.users, demand.zipf_s)
    p = capped_shares(counts, p, demand.max_per_user_per_day / demand.requests_per_day)
    arrival = demand.peak_per_second
    miss_s = profile.inference_s + (profile.load_s if mode == "per-user" else profile.swap_s)

    def evaluate(instances: int):
        hit, items = _hit_ratio(mode, (counts, p), profile, instances)
        latency = response_quantiles(
            arrival, instances * profile.concurrency, hit, profile.inference_s, miss_s
        )
        return hit, items, latency

    def meets(latency: Latency) -> str:
        if latency.utilisation > targets.utilisation:
            return "utilisation"
        if latency.p95_s > targets.p95_s:
            return "p95"
        return ""

    low, high = targets.min_instances - 1, targets.min_instances
    while meets(evaluate(high)[2]) and high < targets.max_instances:
        low, high = high, min(high * 2, targets.max_instances)
    result = evaluate(high)
    if meets(result[2]):
        hit, items, latency = result
        return ModePlan(
            mode, demand.users, profile.instance_type, round(hit, 4), items, None, None, None,
            None, arrival, arrival * (1 - hit), None, None,
            f"infeasible within {targets.max_instances} instances ({meets(latency)})",
        )  # fmt: skip
    while high - low > 1:
        middle = (low + high) // 2
        if meets(evaluate(middle)[2]):
            low = middle
        else:
            high = middle
    hit, items, latency = evaluate(high)
    binding = (
        "min_instances"
        if high == targets.min_instances
        else meets(evaluate(high - 1)[2]) or "min_instances"
    )
    dollars = high * cost.inference_per_hour * HOURS_PER_MONTH
    return ModePlan(
        mode=mode,
        users=demand.users,
        instance_type=profile.instance_type,
        hit_ratio=round(hit, 4),
        cache_items=items,
        instances=high,
        p50_s=round(latency.p50_s, 2),
        p95_s=round(latency.p95_s, 2),
        utilisation=round(latency.utilisation, 3),
        peak_requests_per_s=round(arrival, 3),
        misses_per_s=round(arrival * (1 - hit), 3),
        dollars_per_month=round(dollars, 2),
        dollars_per_user_month=round(dollars / demand.users, 5),
        binding=binding,
    )


def invocations_per_instance_target(
    hit_ratio: float,
    mode: str = "shared-base",
    profile: InstanceProfile | None = None,
    utilisation: float = 0.7,
) -> float:
    """Invocations per instance per minute at `utilisation`: the value of a target-tracking
    policy on SageMakerVariantInvocationsPerInstance (a per-minute metric) that keeps each
    instance that busy. 60 x utilisation x concurrency / mean service time, whose misses cost
    a load (per-user) or a swap (shared base): ml.g5.xlarge's 2.0 s per image at 0.7 gives 21
    for a shared base that always hits, about 30 at saturation.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not 0 <= hit_ratio <= 1:
        raise ValueError(f"hit_ratio must be in [0, 1], got {hit_ratio!r}")
    profile = profile or INSTANCES["ml.g5.xlarge"]
    miss = profile.load_s if mode == "per-user" else profile.swap_s
    service = profile.inference_s + (1 - hit_ratio) * miss
    return 60 * utilisation * profile.concurrency / service


def scale_table(
    user_counts: Sequence[int] = (1_000, 100_000, 10_000_000), **options
) -> list[ModePlan]:
    """`plan` for each user count and both modes; `options` are `Demand`'s fields and
    `plan`'s `profile`, `cost` and `targets`."""
    plan_keys = {"profile", "cost", "targets"}
    plan_options = {k: v for k, v in options.items() if k in plan_keys}
    demand_options = {k: v for k, v in options.items() if k not in plan_keys}
    return [
        plan(Demand(users=int(users), **demand_options), mode, **plan_options)
        for users in user_counts
        for mode in MODES
    ]


def crossover(
    low: int = 100, high: int = 10_000_000, points: int = 41, **options
) -> dict[str, int | None]:
    """Where the per-user fleet first costs more than the shared base's, on a geometric grid of
    user counts from `low` to `high`: the last count where they cost the same and the first
    where per-user costs more (None if they never part)."""
    grid = sorted({round(u) for u in np.geomspace(low, high, points)})
    same = None
    for users in grid:
        per_user, shared = (p.dollars_per_month for p in scale_table((users,), **options))
        if per_user is None or shared is None or per_user > shared:
            return {"same_cost_up_to_users": same, "per_user_dearer_from_users": users}
        same = users
    return {"same_cost_up_to_users": same, "per_user_dearer_from_users": None}


# ------------------------------------------------------------------- validation predictions


@dataclass
class LocalPrediction:
    """What the model predicts for a local load test (`benchmarks/capacity_model.py`)."""

    hit_ratio: float
    service_s: float
    servers: float
    requests_per_second: float
    notes: list[str] = field(default_factory=list)


def predict_local(
    targets: int,
    zipf_s: float,
    budget: int,
    clients: int,
    warm_s: float,
    load_s: float,
    think_s: float,
    cores: float,
    hit_ratio: float | None = None,
) -> LocalPrediction:
    """The local per-user load test's hit ratio and throughput.

    Hit ratio: Che's approximation for `budget` loaded models over `targets` Zipf(`zipf_s`)
    users (or `hit_ratio` as given, to test the queueing part alone). Throughput: the closed
    loop of `clients` with `think_s` between requests, mean service warm + miss x load, on
    min(clients, cores, budget) servers: each request runs in one model process, no more than
    `budget` models are held at once, and `cores` is how many requests the machine runs in
    parallel (its CPU count, or better the measured speed-up of two loads run together).
    """
    counts, shares = popularity(targets, zipf_s)
    hit = che_hit_ratio(counts, shares, budget) if hit_ratio is None else hit_ratio
    service = warm_s + (1 - hit) * load_s
    servers = max(min(clients, cores, budget), 1)
    rate = closed_loop_throughput(clients, service, think_s, servers)
    return LocalPrediction(round(hit, 4), round(service, 4), servers, round(rate, 3))


def scale_markdown(plans: Sequence[ModePlan]) -> str:
    """`scale_table`'s plans as a markdown table, one row per user count and mode."""
    lines = [
        "| users | mode | cache-hit ratio | p50 (s) | p95 (s) | instances | $ / month | "
        "$ / user / month |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in plans:
        if p.instances is None:
            lines.append(f"| {p.users:,} | {p.mode} | {p.hit_ratio:.2f} | | | {p.binding} | | |")
            continue
        lines.append(
            f"| {p.users:,} | {p.mode} | {p.hit_ratio:.2f} | {p.p50_s:.1f} | {p.p95_s:.1f} | "
            f"{p.instances:,} | {p.dollars_per_month:,.0f} | {p.dollars_per_user_month:.3f} |"
        )
    return "\n".join(lines)


def validation_markdown(report: dict) -> str:
    """`benchmarks/capacity_model.py`'s report: predicted against measured, one row per run.

    Hit ratios: Che's (the model), an exact LRU simulation of many Zipf draws (Che's own
    error is the gap), the measured one with its binomial standard error, and in brackets an
    exact LRU replay of the requests the test sent (the router's departure from an LRU is
    the gap to the measured one; the sample's luck, the gap to the simulation). Throughput:
    predicted from Che's hit ratio, and from the measured one (the queueing part alone).
    """
    lines = [
        "| budget | clients | requests | hit ratio: Che / LRU simulated / measured (replay) | "
        "difference | requests/s: predicted / from measured hits / measured | difference |",
        "|---:|---:|---:|---|---:|---|---:|",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['budget']} | {r['clients']} | {r['requests']} | {r['predicted_hit_ratio']:.2f}"
            f" / {r.get('simulated_lru_hit_ratio', float('nan')):.2f}"
            f" / {r['measured_hit_ratio']:.2f} ± {r['measured_hit_ratio_stderr']:.2f}"
            f" ({r['lru_replay_hit_ratio']:.2f}) | {r['hit_ratio_difference']:+.0%} | "
            f"{r['predicted_requests_per_s']:.2f}"
            f" / {r['predicted_requests_per_s_from_measured_hits']:.2f}"
            f" / {r['measured_requests_per_s']:.2f} | {r['throughput_difference']:+.0%}"
            f" ({r['throughput_difference_from_measured_hits']:+.0%}) |"
        )
    return "\n".join(lines)


def plot_scale(plans: Sequence[ModePlan], user_grid: Sequence[int] | None = None, **options):
    """Dollars a month against users, both modes, log-log; `plans` are marked, and with
    `user_grid` a line through `scale_table(user_grid, **options)` is drawn too."""
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.2))
    lines = scale_table(user_grid, **options) if user_grid is not None else []
    for i, mode in enumerate(MODES):
        curve = [p for p in lines if p.mode == mode and p.dollars_per_month]
        if curve:
            axis.plot([p.users for p in curve], [p.dollars_per_month for p in curve], f"C{i}-")
        points = [p for p in plans if p.mode == mode and p.dollars_per_month]
        axis.plot(
            [p.users for p in points], [p.dollars_per_month for p in points], f"C{i}o", label=mode
        )
    axis.set(
        xscale="log",
        yscale="log",
        xlabel="registered users",
        ylabel="$ per month (busiest-hour fleet, always on)",
        title="Endpoint cost by serving mode",
    )
    axis.grid(True, which="major", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    return figure
