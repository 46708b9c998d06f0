"""Router configuration: one frozen dataclass, a doc line per field (the `baton router` flags)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from baton.protos.cluster_auth import ClusterCredentials


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
    """How to pick a prefill worker: cache_aware, min_load, round_robin, power_of_two, min_latency or weighted."""
    decode_policy: str = "min_load"
    """How to pick a decode worker: min_load, round_robin, power_of_two, cache_aware, min_latency or weighted."""
    worker_weights: str = ""
    """host:port=weight pairs, comma-separated, for the weighted policy (mixed GPU types; unlisted workers weigh 1)."""
    cache_threshold: float = 0.5
    """cache_aware: matched fraction of the prompt needed to follow the cache rather than spread new prefixes."""
    balance_abs_threshold: float = 4096.0
    """cache_aware: load gap (tokens; 64 per request in flight) beyond which, with the relative gap too, load wins over affinity."""
    balance_rel_threshold: float = 1.5
    """cache_aware: relative load gap (max > min * this) that must also hold before load wins over affinity."""
    router_peers: str = ""
    """Comma-separated gRPC host:port of the other router replicas before the same workers: the router queue limit is shared among the live ones."""
    processes: int = 1
    """Router processes sharing --http-port and --grpc-port (SO_REUSEPORT, Linux), each a replica of the others (as with --router-peers): more than 1 spreads the router's CPU over cores, like vLLM's --api-server-count (router/processes.py)."""
    process_ports: str = ""
    """With --processes N: N comma-separated HTTP:gRPC port pairs, each process's own (its /metrics for Prometheus, its health for its peers); empty: picked free. With one process and one pair (how each process of --processes starts): its own ports, and --http-port / --grpc-port are shared (SO_REUSEPORT)."""
    kv_events: bool = True
    """Subscribe to the workers' KV events: cache-aware scores from what each really caches (off: the approximate tree only)."""
    kv_index_max_entries: int = 1_000_000
    """Most (block, worker) pairs the KV-event index holds; least recently used blocks are dropped beyond it."""
    kv_pending_ttl_s: float = 5.0
    """Seconds a prompt's pages count as cached on the worker the router just sent it to, until its KV events store them (0: off)."""
    kv_pending_max_entries: int = 65536
    """Most pending (block, worker) pairs the KV-event index holds (this router's recent dispatches); oldest dropped beyond it."""
    decode_only_threshold: int = 256
    """Prompts with at most this many uncached tokens are prefilled by the decode worker itself."""
    prefill_backlog_limit: int = 16384
    """Prompt tokens (queued + running) the least-loaded prefill worker may hold before requests are prefilled on their decode worker instead (conditional disaggregation); 0: never."""
    health_interval_s: float = 1.0
    """Seconds between health checks and load reports of each worker."""
    health_check_interval: float = 0.0
    """Alias of --health-interval-s (SGLang's name), in seconds; when > 0 it wins."""
    max_unhealthy_workers: int = -1
    """The router reports itself NOT_SERVING (health) once more workers than this are unhealthy (-1: never for that reason)."""
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
    decode_stream: bool = True
    """Send requests to each decode worker on one multiplexed stream (Decode.GenerateStream) instead of a gRPC call each (off: a call each; workers without it get calls anyway)."""
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
    chat_template: str = ""
    """Jinja chat-template file used instead of the model's own (e.g. router/gateway/templates/smollm2_tool_hermes.jinja)."""
    tool_call_parser: str = ""
    """How model output is read as tool calls: hermes, llama3_json or mistral; empty: implied by the chat template, else none."""
    trust_request_chat_template: bool = False
    """Let requests supply their own Jinja chat template (`chat_template_kwargs.chat_template`); off: refused with 400."""
    api_keys: str = ""
    """Comma-separated API keys; when set, every /v1 request and gRPC call needs one (visible in `ps`: prefer --api-keys-file or $BATON_API_KEYS)."""
    api_keys_file: str = ""
    """File of further API keys, comma- or newline-separated (a mounted Kubernetes Secret); read at start."""
    api_keys_env: str = "BATON_API_KEYS"
    """Environment variable holding further comma-separated API keys (empty: read none)."""
    admin_api_keys_file: str = ""
    """File of admin keys (comma- or newline-separated): registering / deregistering workers needs one (empty: only when no client keys are set either)."""
    protect_admin_endpoints: bool = False
    """Put /metrics, /workers, /docs and the dashboard behind an admin key (probes keep /health)."""
    docs: bool = False
    """Serve the interactive API docs at /docs (Swagger UI, served without external assets) and /openapi.json."""
    cluster_secret_file: str = ""
    """File holding the cluster secret; the router's calls to workers carry its token (empty: open cluster)."""
    tls_cert_file: str = ""
    """PEM client certificate for TLS to the workers (with --tls-key-file; mTLS when they require it)."""
    tls_key_file: str = ""
    """PEM private key of --tls-cert-file."""
    tls_ca_file: str = ""
    """PEM CA bundle the workers' certificates must chain to (TLS to the workers)."""
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
    encoders: str = ""
    """Comma-separated host:port of encoders (`baton serve encoder`); empty: workers run the vision tower."""
    discover_encoders: str = ""
    """host:port whose DNS name resolves to every encoder (a Kubernetes headless Service; with --ray-address: PREFIX-encoder:0, the encoder actors); with or instead of --encoders."""
    encoder_policy: str = "min_load"
    """How to rank encoders for a request with images: min_load or cache_affinity (on the image hash)."""
    allowed_local_media_path: str = ""
    """A folder whose files image parts may name with file:// URLs; empty: no local files."""
    max_images_per_request: int = 8
    """Images one chat request may carry."""
    max_image_bytes: int = 20 * 1024 * 1024
    """Largest encoded image a request may carry (data URL, file or fetched)."""
    image_fetch_timeout_s: float = 10.0
    """Deadline of fetching one http(s) image URL."""

    def __post_init__(self) -> None:
        checks = [
            (self.decode_only_threshold >= 0, "decode_only_threshold must be non-negative"),
            (self.prefill_backlog_limit >= 0, "prefill_backlog_limit must be non-negative"),
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
        if (self.health_check_interval < 0 or self.max_unhealthy_workers < -1 or self.kv_index_max_entries < 1
                or self.kv_pending_ttl_s < 0 or self.kv_pending_max_entries < 0):
            raise ValueError("health_check_interval must be >= 0, max_unhealthy_workers >= -1, "
                             "kv_index_max_entries >= 1, kv_pending_ttl_s and kv_pending_max_entries >= 0")
        if self.processes < 1:
            raise ValueError("processes must be at least 1")
        if self.process_ports and len(self.port_pairs()) != self.processes:
            raise ValueError(f"process_ports must hold one HTTP:gRPC pair per process ({self.processes}), "
                             f"got {self.process_ports!r}")
        if self.health_check_interval > 0:
            object.__setattr__(self, "health_interval_s", self.health_check_interval)
        if self.discovery_interval_s <= 0:
            raise ValueError("discovery_interval_s must be positive")
        if self.ray_address and (self.discover_prefill or self.discover_decode):
            raise ValueError("discover workers through DNS names or through Ray (--ray-address), not both")
        from_file = Path(self.api_keys_file).read_text().replace("\n", ",") if self.api_keys_file else ""
        from_env = os.environ.get(self.api_keys_env, "") if self.api_keys_env else ""
        keys = tuple(dict.fromkeys(k.strip() for k in f"{self.api_keys},{from_file},{from_env}".split(",")
                                   if k.strip()))
        object.__setattr__(self, "_api_keys", keys)
        admin = Path(self.admin_api_keys_file).read_text().replace("\n", ",") if self.admin_api_keys_file else ""
        object.__setattr__(self, "_admin_keys", tuple(k.strip() for k in admin.split(",") if k.strip()))
        object.__setattr__(self, "_cluster", ClusterCredentials.from_files(
            self.cluster_secret_file, self.tls_cert_file, self.tls_key_file, self.tls_ca_file))

    @property
    def api_key_list(self) -> tuple[str, ...]:
        """The configured API keys, from `api_keys`, `api_keys_file` and `$api_keys_env` (empty: no authentication)."""
        return self._api_keys

    @property
    def admin_key_list(self) -> tuple[str, ...]:
        """The admin keys from `admin_api_keys_file` (router/gateway/auth.py says what they open)."""
        return self._admin_keys

    @property
    def cluster_credentials(self) -> ClusterCredentials:
        """The cluster secret and TLS files the router's channels to workers use."""
        return self._cluster

    @property
    def own_ports(self) -> Optional[tuple[int, int]]:
        """This process's own (HTTP, gRPC) ports when it is one of the processes of --processes (its main
        ports are then shared with the others); None for a router on its own."""
        return self.port_pairs()[0] if self.processes == 1 and self.process_ports else None

    def port_pairs(self) -> list[tuple[int, int]]:
        """`process_ports` as (HTTP, gRPC) pairs (a clear error for a malformed one)."""
        pairs = []
        for item in self.addresses(self.process_ports):
            try:
                http, grpc_port = (int(x) for x in item.split(":"))
            except ValueError:
                raise ValueError(f"process_ports: {item!r} is not HTTP:gRPC (two port numbers)") from None
            pairs.append((http, grpc_port))
        return pairs

    @staticmethod
    def addresses(text: str) -> list[str]:
        """Split a comma-separated address list."""
        return [a.strip() for a in text.split(",") if a.strip()]
