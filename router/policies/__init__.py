"""Routing policies: small plugins that pick a worker of one role for a request.

``base`` holds the interface (``Policy``) and the registry (``POLICIES``, ``make_policy``);
each other module is one policy and documents its algorithm and parameters. Importing this
package registers all of them:

- ``round_robin``: workers in turn, by address.
- ``min_load``: lowest load, ties by address (the decode default).
- ``power_of_two``: lower load of two random workers (seeded).
- ``cache_aware``: longest cached prefix, with a load-balance guard (the prefill default).
"""
from baton.router.policies.base import POLICIES, Policy, make_policy, register_policy
from baton.router.policies.cache_aware import CacheAwarePolicy
from baton.router.policies.min_load import MinLoadPolicy
from baton.router.policies.power_of_two import PowerOfTwoPolicy
from baton.router.policies.round_robin import RoundRobinPolicy

DEFAULT_PREFILL_POLICY = CacheAwarePolicy.name
DEFAULT_DECODE_POLICY = MinLoadPolicy.name

__all__ = [
    "POLICIES", "Policy", "make_policy", "register_policy", "CacheAwarePolicy", "MinLoadPolicy",
    "PowerOfTwoPolicy", "RoundRobinPolicy", "DEFAULT_PREFILL_POLICY", "DEFAULT_DECODE_POLICY",
]
