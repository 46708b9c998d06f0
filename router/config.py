"""Router configuration: one frozen dataclass, a doc line per field (the `baton router` flags)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RouterConfig:
    """Where the router listens, which workers it knows, and how it balances and fails over."""

    model: str = ""
    """Model folder whose tokenizer and chat template the router uses (workers get token ids)."""
    served_model_name: str = ""
    """Model name clients use in requests and see in /v1/models; default: the folder's name."""
    host: str = "127.0.0.1"
    """Address the gRPC server and the HTTP gateway bind."""
    grpc_port: int = 0
    """Port of the baton.v1.Router gRPC service; 0 picks a free one."""
    http_port: int = 0
    """Port of the OpenAI-compatible HTTP gateway; 0 picks a free one."""
    prefill: str = ""
    """Comma-separated host:port of prefill workers known at start."""
    decode: str = ""
    """Comma-separated host:port of decode workers known at start."""
    prefill_policy: str = "cache_aware"
    """How to pick a prefill worker: cache_aware, min_load, round_robin or power_of_two."""
    decode_policy: str = "min_load"
    """How to pick a decode worker: min_load, round_robin, power_of_two or cache_aware."""
    decode_only_threshold: int = 256
    """Prompts with at most this many uncached tokens are prefilled by the decode worker itself."""
    health_interval_s: float = 1.0
    """Seconds between health checks and load reports of each worker."""
    health_timeout_s: float = 2.0
    """Deadline of one health check."""
    unhealthy_after_failures: int = 3
    """Health checks in a row that time out before a reachable (busy) worker counts as unhealthy."""
    request_timeout_s: float = 600.0
    """Deadline of a whole request, first byte to last."""
    max_attempts: int = 3
    """Workers tried for one request before its first token (retries with backoff)."""
    stream_stall_timeout_s: float = 60.0
    """Longest wait for a decode worker's next chunk before its stream moves elsewhere (also
    moved at once when the worker turns unhealthy while the stream waits: a frozen worker)."""
    max_migrations: int = 3
    """Times a stream may move to another decode worker after its first token."""
    retry_backoff_s: float = 0.05
    """First retry delay; doubles per attempt."""
    breaker_failures: int = 3
    """Consecutive failures that open a worker's circuit breaker."""
    breaker_cooldown_s: float = 5.0
    """Seconds an open breaker waits before letting one trial request through."""
    max_queued_requests: int = 1024
    """Requests the router holds while no worker has room; one more is refused with 429."""
    saturated_s: float = 0.5
    """How long a worker that answered OVERLOADED gets no new work (unless one of its requests ends)."""
    retry_after_s: float = 1.0
    """Retry-After (seconds) sent with a 429 when the router's own queue is full."""
    max_request_bytes: int = 8 << 20
    """Largest HTTP request body or gRPC message accepted (larger: 413 / RESOURCE_EXHAUSTED)."""
    api_keys: str = ""
    """Comma-separated API keys; when set, every /v1 request and gRPC call needs one."""
    api_keys_file: str = ""
    """File of further API keys, comma- or newline-separated (a mounted Kubernetes Secret); read at start."""
    discover_prefill: str = ""
    """host:port whose DNS name resolves to every prefill worker (a Kubernetes headless Service)."""
    discover_decode: str = ""
    """host:port whose DNS name resolves to every decode worker (a Kubernetes headless Service)."""
    discovery_interval_s: float = 5.0
    """Seconds between look-ups of the discovered names or Ray actors (workers come and go with them)."""
    ray_address: str = ""
    """Follow the worker actors of this Ray cluster (GCS host:port, auto or ray://host:port; `baton up --ray`)."""
    ray_namespace: str = "baton"
    """Ray namespace of the worker actors."""
    ray_actor_prefix: str = "baton"
    """Worker actors are named PREFIX-prefill-N and PREFIX-decode-N."""
    ray_node_ip: str = ""
    """This machine's address in the Ray cluster (127.0.0.1 for a loopback cluster); empty: Ray's guess."""

    def __post_init__(self) -> None:
        checks = [
            (self.decode_only_threshold >= 0, "decode_only_threshold must be non-negative"),
            (self.health_interval_s > 0 and self.health_timeout_s > 0, "health intervals must be positive"),
            (self.request_timeout_s > 0, "request_timeout_s must be positive"),
            (self.max_attempts >= 1, "max_attempts must be at least 1"),
            (self.max_migrations >= 0, "max_migrations must be non-negative"),
            (self.stream_stall_timeout_s > 0, "stream_stall_timeout_s must be positive"),
            (self.breaker_failures >= 1, "breaker_failures must be at least 1"),
            (self.max_queued_requests >= 1, "max_queued_requests must be at least 1"),
            (self.max_request_bytes >= 1024, "max_request_bytes must be at least 1024"),
            (self.unhealthy_after_failures >= 1, "unhealthy_after_failures must be at least 1"),
            (self.saturated_s > 0 and self.retry_after_s > 0, "saturated_s and retry_after_s must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.discovery_interval_s <= 0:
            raise ValueError("discovery_interval_s must be positive")
        if self.ray_address and (self.discover_prefill or self.discover_decode):
            raise ValueError("discover workers through DNS names or through Ray (--ray-address), not both")
        from_file = Path(self.api_keys_file).read_text().replace("\n", ",") if self.api_keys_file else ""
        keys = tuple(k.strip() for k in f"{self.api_keys},{from_file}".split(",") if k.strip())
        object.__setattr__(self, "_api_keys", keys)

    @property
    def api_key_list(self) -> tuple[str, ...]:
        """The configured API keys, from `api_keys` and `api_keys_file` (empty: no authentication)."""
        return self._api_keys

    @staticmethod
    def addresses(text: str) -> list[str]:
        """Split a comma-separated address list."""
        return [a.strip() for a in text.split(",") if a.strip()]
