"""Configuration of simulated workers: their shape, their timing model and their faults.

Three frozen dataclasses, a doc line per field (the `baton serve sim` flags come from them;
field names are distinct from the engine's and the worker's so the flags do not clash).
Times are seconds; a `SimTiming` of all zeros answers as fast as the process can.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SimConfig:
    """How many simulated workers to run and the shape of each."""

    sim_prefills: int = 0
    """Simulated prefill workers to start in this process."""
    sim_decodes: int = 1
    """Simulated decode workers to start in this process."""
    sim_model: str = "sim"
    """Model name the workers report in Info."""
    sim_blocks: int = 4096
    """KV blocks in each worker's pool."""
    sim_block_size: int = 16
    """Tokens per KV block (the page size)."""
    sim_max_running: int = 64
    """Requests a worker runs at once (its batch); more wait in its queue."""
    sim_max_queued: int = 256
    """Requests a worker lets wait; one more is refused with OVERLOADED."""
    sim_default_max_tokens: int = 16
    """Tokens generated when a request sets no max_tokens."""
    sim_vocab: int = 32000
    """Token ids are drawn below this."""
    sim_seed: int = 0
    """Seed of the token-id hash and of the fault injection's random draws."""
    sim_kv_events: bool = True
    """Serve baton.v1.KVEvents (off: like an older worker; the router falls back to its approximate tree)."""
    sim_address_file: str = ""
    """Write the started workers' addresses here as JSON {"prefill": [...], "decode": [...]} (empty: print only)."""

    def __post_init__(self) -> None:
        checks = [
            (self.sim_prefills >= 0 and self.sim_decodes >= 0, "sim worker counts must be non-negative"),
            (self.sim_blocks >= 1 and self.sim_block_size >= 1, "sim_blocks and sim_block_size must be at least 1"),
            (self.sim_max_running >= 1 and self.sim_max_queued >= 0, "sim_max_running >= 1, sim_max_queued >= 0"),
            (self.sim_default_max_tokens >= 1 and self.sim_vocab >= 2, "sim_default_max_tokens >= 1, sim_vocab >= 2"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass(frozen=True)
class SimTiming:
    """The timing model: what prefill, a decode step and a KV transfer cost."""

    prefill_base_s: float = 0.002
    """Fixed cost of one prefill."""
    prefill_token_s: float = 2e-5
    """Prefill time per uncached prompt token."""
    prefill_attention_s: float = 1e-9
    """Quadratic attention term: per (uncached token x context token) pair, context = cached + uncached so far."""
    decode_step_s: float = 0.005
    """Fixed cost of one decode step (one token for every running request)."""
    decode_seq_s: float = 1e-4
    """Decode step time per request in the batch."""
    decode_ctx_token_s: float = 1e-8
    """Decode step time per context token summed over the batch (attention reads)."""
    transfer_base_s: float = 0.0005
    """Fixed cost of one KV transfer (prefill to decode)."""
    transfer_bytes_per_s: float = 20e9
    """KV transfer bandwidth."""
    kv_bytes_per_token: int = 131072
    """KV bytes per token (all layers), for transfer sizes."""
    slowdown: float = 1.0
    """Every time above is multiplied by this (a slow GPU, a noisy neighbour)."""

    def __post_init__(self) -> None:
        times = [self.prefill_base_s, self.prefill_token_s, self.prefill_attention_s, self.decode_step_s,
                 self.decode_seq_s, self.decode_ctx_token_s, self.transfer_base_s]
        if min(times) < 0 or self.transfer_bytes_per_s <= 0 or self.kv_bytes_per_token < 0 or self.slowdown <= 0:
            raise ValueError("sim times must be >= 0, transfer_bytes_per_s and slowdown > 0")

    def prefill_s(self, uncached: int, cached: int) -> float:
        """Time to compute `uncached` prompt tokens after `cached` ones."""
        if uncached <= 0:
            return self.prefill_base_s * self.slowdown
        attention = uncached * cached + uncached * (uncached + 1) / 2
        return (self.prefill_base_s + self.prefill_token_s * uncached
                + self.prefill_attention_s * attention) * self.slowdown

    def step_s(self, batch: int, context_tokens: int) -> float:
        """Time of one decode step for `batch` requests holding `context_tokens` in all."""
        return (self.decode_step_s + self.decode_seq_s * batch + self.decode_ctx_token_s * context_tokens) * self.slowdown

    def transfer_s(self, num_bytes: int) -> float:
        """Time to move `num_bytes` of KV from prefill to decode."""
        return (self.transfer_base_s + num_bytes / self.transfer_bytes_per_s) * self.slowdown


@dataclass(frozen=True)
class SimFaults:
    """Failure injection (all off by default); a running worker's faults can also be set by hand."""

    die_after_requests: int = 0
    """Die once this many requests were admitted: calls in flight fail UNAVAILABLE, the port closes (0: never)."""
    hang_after_requests: int = 0
    """Freeze once this many requests were admitted: streams and Info stop answering (0: never)."""
    overloaded_fraction: float = 0.0
    """Fraction of new requests refused with OVERLOADED (1.0: every one)."""
    flap_health_s: float = 0.0
    """Toggle health between SERVING and NOT_SERVING every this many seconds (0: steady)."""

    def __post_init__(self) -> None:
        if self.die_after_requests < 0 or self.hang_after_requests < 0:
            raise ValueError("die_after_requests and hang_after_requests must be non-negative")
        if not 0.0 <= self.overloaded_fraction <= 1.0 or self.flap_health_s < 0:
            raise ValueError("overloaded_fraction must be in [0, 1] and flap_health_s >= 0")
