"""Routing policies: small plugins that pick a worker of one role for a request.

``base`` holds the interface (``Policy``) and the registry (``POLICIES``, ``make_policy``);
each other module is one policy and documents its algorithm and parameters. Importing this
package registers all of them:

- ``round_robin``: workers in turn, by address.
- ``min_load``: lowest load, ties by address (the decode default).
- ``power_of_two``: lower load of two random workers (seeded).
- ``cache_aware``: longest cached prefix, with a load-balance guard (the prefill default);
  precise (from the workers' KV events) where the router has them.
- ``min_latency``: lowest expected latency from the workers' recent TTFT / ITL.
- ``weighted``: least load per unit of weight (mixed GPU types).
"""
from baton.router.policies.base import POLICIES, Policy, make_policy, register_policy
from baton.router.policies.cache_aware import CacheAwarePolicy
from baton.router.policies.min_latency import MinLatencyPolicy
from baton.router.policies.min_load import MinLoadPolicy
from baton.router.policies.power_of_two import PowerOfTwoPolicy
from baton.router.policies.round_robin import RoundRobinPolicy
from baton.router.policies.weighted import WeightedPolicy


def policy_options(name: str, config) -> dict:
    """The parameters a router config gives the policy `name` (the weighted policy's weights, the
    cache-aware policy's thresholds)."""
    if name == WeightedPolicy.name:
        return {"weights": config.worker_weights}
    if name == CacheAwarePolicy.name:
        return {"cache_threshold": config.cache_threshold, "balance_abs_threshold": config.balance_abs_threshold,
                "balance_rel_threshold": config.balance_rel_threshold}
    return {}


DEFAULT_PREFILL_POLICY = CacheAwarePolicy.name
DEFAULT_DECODE_POLICY = MinLoadPolicy.name

__all__ = [
    "POLICIES", "Policy", "make_policy", "register_policy", "CacheAwarePolicy", "MinLoadPolicy",
    "PowerOfTwoPolicy", "RoundRobinPolicy", "MinLatencyPolicy", "WeightedPolicy", "policy_options",
    "DEFAULT_PREFILL_POLICY", "DEFAULT_DECODE_POLICY",
]
