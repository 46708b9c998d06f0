"""The simple routing policies and the registry, on hand-made WorkerViews."""
from __future__ import annotations

from collections import Counter

import pytest

from baton.router.policies import (POLICIES, CacheAwarePolicy, MinLoadPolicy, PowerOfTwoPolicy,
                             RoundRobinPolicy, make_policy)
from baton.router.types import Role, WorkerView

PROMPT = list(range(32))


def views(*loads: float, role: Role = Role.DECODE) -> list[WorkerView]:
    """One worker per load, addresses w0, w1, ... (load given as queued tokens)."""
    return [WorkerView(address=f"w{i}", role=role, queued_tokens=int(load)) for i, load in enumerate(loads)]


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_rejects_an_empty_list(name: str) -> None:
    with pytest.raises(ValueError, match="no workers"):
        make_policy(name).select([], PROMPT)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_returns_the_only_worker(name: str) -> None:
    (only,) = views(5)
    policy = make_policy(name)
    assert policy.select([only], PROMPT) is only
    policy.on_dispatch(only, PROMPT)
    policy.on_worker_removed(only.address)


def test_round_robin_cycles_in_address_order() -> None:
    workers = views(0, 0, 0)
    policy = RoundRobinPolicy()
    picks = [policy.select(list(reversed(workers)), PROMPT).address for _ in range(7)]
    assert picks == ["w0", "w1", "w2", "w0", "w1", "w2", "w0"]


def test_round_robin_keeps_its_turn_when_the_set_changes() -> None:
    w0, w1, w2 = views(0, 0, 0)
    policy = RoundRobinPolicy()
    assert policy.select([w0, w1, w2], PROMPT) is w0
    assert policy.select([w0, w2], PROMPT) is w2  # w1 excluded: next after w0 is w2
    assert policy.select([w0, w1, w2], PROMPT) is w0


def test_min_load_picks_the_minimum_deterministically() -> None:
    workers = views(30, 10, 20)
    assert MinLoadPolicy().select(workers, PROMPT).address == "w1"
    tied = views(10, 5, 5)
    for order in (tied, list(reversed(tied))):
        assert MinLoadPolicy().select(order, PROMPT).address == "w1"


def test_min_load_counts_in_flight_and_kv_usage() -> None:
    a, b = views(0, 0)
    a.in_flight = 2           # 128 load units
    b.kv_usage = 0.1          # 100 load units
    assert MinLoadPolicy().select([a, b], PROMPT) is b


def test_min_load_spreads_a_burst_evenly() -> None:
    workers = views(0, 0, 0, 0)
    policy = MinLoadPolicy()
    for _ in range(40):
        chosen = policy.select(workers, PROMPT)
        chosen.in_flight += 1
        policy.on_dispatch(chosen, PROMPT)
    counts = [w.in_flight for w in workers]
    assert sum(counts) == 40
    assert max(counts) - min(counts) <= 1


def test_power_of_two_picks_the_lower_of_two() -> None:
    low, high = views(1, 100)
    policy = PowerOfTwoPolicy(seed=3)
    assert all(policy.select([high, low], PROMPT) is low for _ in range(50))


def test_power_of_two_never_picks_the_most_loaded_and_favours_the_least() -> None:
    workers = views(50, 10, 40, 20, 30)
    policy = PowerOfTwoPolicy(seed=0)
    counts = Counter(policy.select(workers, PROMPT).address for _ in range(500))
    assert "w0" not in counts
    assert set(counts) == {"w1", "w2", "w3", "w4"}
    assert counts.most_common(1)[0][0] == "w1"  # the least loaded wins 4 of every 10 pairs


def test_power_of_two_covers_all_equal_workers_and_is_seeded() -> None:
    workers = views(0, 0, 0, 0, 0)
    first, second = PowerOfTwoPolicy(seed=7), PowerOfTwoPolicy(seed=7)
    seq1 = [first.select(workers, PROMPT).address for _ in range(300)]
    seq2 = [second.select(list(reversed(workers)), PROMPT).address for _ in range(300)]
    assert seq1 == seq2  # same seed, same draws, whatever the caller's order
    counts = Counter(seq1)
    assert set(counts) == {w.address for w in workers}
    assert min(counts.values()) > 30  # ties go to a random one of the pair: about 60 each


def test_registry_holds_the_builtin_policies() -> None:
    assert set(POLICIES) == {"round_robin", "min_load", "power_of_two", "cache_aware", "min_latency", "weighted"}
    for name, cls in POLICIES.items():
        assert cls.name == name
        assert isinstance(make_policy(name), cls)
    policy = make_policy("cache_aware", cache_threshold=0.3, max_tree_tokens=1024)
    assert isinstance(policy, CacheAwarePolicy)
    assert policy.cache_threshold == 0.3 and policy.max_tree_tokens == 1024
    assert make_policy("power_of_two", seed=1).select(views(0, 0), PROMPT).address in {"w0", "w1"}


def test_make_policy_errors_are_clear() -> None:
    with pytest.raises(ValueError, match=r"unknown routing policy 'fastest'.*cache_aware, min_latency, "
                                         r"min_load, power_of_two, round_robin, weighted"):
        make_policy("fastest")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) seed.*accepted: \(none\)"):
        make_policy("min_load", seed=1)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) threshold.*accepted: cache_threshold"):
        make_policy("cache_aware", threshold=0.2)
    with pytest.raises(ValueError, match="cache_threshold must be in"):
        make_policy("cache_aware", cache_threshold=1.5)
    with pytest.raises(ValueError, match="max_tree_tokens"):
        make_policy("cache_aware", max_tree_tokens=0)
    with pytest.raises(ValueError, match="balance_rel_threshold"):
        make_policy("cache_aware", balance_rel_threshold=0.5)
