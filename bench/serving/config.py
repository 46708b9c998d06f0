"""`BenchConfig`: every knob of `baton bench`, one frozen dataclass.

Each field's doc line becomes the help of its `--flag` (`services.common.dataclass_flags`),
so `baton bench --help` lists them all. `__post_init__` checks values and the parsed forms of
the two list-valued flags are available as `config.slos()` and `config.rates()`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, Optional

DATASETS = ("random", "sharegpt-like", "shared-prefix", "multi-turn", "file", "images")
SLO_KEYS = ("ttft", "tpot", "e2e")


@dataclass(frozen=True)
class BenchConfig:
    """A serving benchmark: server, workload, load shape and outputs."""

    base_url: str = "http://127.0.0.1:8000"
    """Server root URL (a trailing /v1 is accepted); requests go to BASE/v1, metrics come from BASE/metrics."""
    model: str = ""
    """Model name sent with every request (empty: the first one /v1/models lists)."""
    api_key: str = "none"
    """API key sent as a Bearer token."""
    endpoint: Literal["chat", "completions"] = "chat"
    """OpenAI API to call: /v1/chat/completions or /v1/completions (history is flattened to text)."""
    dataset: Literal["random", "sharegpt-like", "shared-prefix", "multi-turn", "file", "images"] = "random"
    """Workload: random, sharegpt-like, shared-prefix, multi-turn, file (a JSONL of prompts) or images (synthetic PNGs)."""
    dataset_path: str = ""
    """JSONL file for --dataset file: one object per line with "prompt", optional "system" and "output_len"."""
    num_prompts: int = 100
    """Requests to send (shared-prefix and multi-turn derive Q / sessions from it when those are 0)."""
    input_len: int = 256
    """Prompt tokens: random's upper end (see range_ratio), each shared-prefix question, each multi-turn user turn."""
    output_len: int = 64
    """Output tokens: random's upper end (see range_ratio); shared-prefix, multi-turn; file lines without one."""
    range_ratio: float = 1.0
    """random: lengths drawn uniformly from [len * ratio, len] (1.0: every request has exactly the given lengths)."""
    input_len_min: Optional[int] = None
    """random: the lowest prompt length instead of input_len * range_ratio."""
    output_len_min: Optional[int] = None
    """random: the lowest output length instead of output_len * range_ratio."""
    sharegpt_output_len: Optional[int] = None
    """sharegpt-like: give every request this output length instead of the drawn one."""
    sharegpt_max_input_len: int = 1024
    """sharegpt-like: prompts drawn longer than this are drawn again (vLLM's ShareGPT filter uses 1024)."""
    prefix_groups: int = 4
    """shared-prefix: groups (G), each with its own system prompt."""
    prefix_len: int = 512
    """shared-prefix: tokens of each group's system prompt (P)."""
    questions_per_group: int = 0
    """shared-prefix: questions per group (Q); 0: num_prompts / G."""
    image_size: int = 224
    """images: width and height of each synthetic image, in pixels."""
    images_per_request: int = 1
    """images: images attached to each request."""
    image_repeat_share: float = 0.0
    """images: share of images drawn from a small pool sent before (embedding-cache hits); the rest are new."""
    turns: int = 3
    """multi-turn: user turns per session; each turn resends the whole history with the server's replies."""
    sessions: int = 0
    """multi-turn: sessions; 0: num_prompts / turns."""
    request_rate: float = math.inf
    """Requests per second, Poisson arrivals (inf: send everything at once)."""
    burstiness: float = 1.0
    """Shape of the gamma inter-arrival times: 1 is Poisson, < 1 burstier, > 1 more regular."""
    max_concurrency: Optional[int] = None
    """Most requests in flight at once (default: no limit)."""
    duration: Optional[float] = None
    """Stop sending new requests after this many seconds (the workload is cycled); requests in flight finish."""
    warmup: int = 0
    """Requests sent and discarded before the measurement (separate prompts, same shape)."""
    seed: int = 0
    """Seed of the workload and the arrival times (sweep point i uses seed + i)."""
    tokenizer: str = ""
    """Tokenizer (HF folder / hub id) for exact prompt lengths and chunk token counts ("": the model's; "none")."""
    continuous_usage: bool = True
    """Ask for usage with every chunk (stream_options.continuous_usage_stats, vLLM / SGLang) to count its tokens."""
    ignore_eos: bool = True
    """Ask the server to ignore EOS (extra_body ignore_eos) so every request produces its output length."""
    temperature: float = 0.0
    """Sampling temperature sent with every request."""
    request_timeout: float = 600.0
    """Seconds one request may take before it counts as a timeout error."""
    slo: str = ""
    """Service-level objectives for goodput, in milliseconds: e.g. ttft=500,tpot=50,e2e=5000."""
    sweep_rates: str = ""
    """Comma-separated request rates to run one after another (e.g. 1,2,4,8,inf); overrides request_rate."""
    output: str = ""
    """Write every figure, the per-request timelines and the full configuration to this JSON file."""
    plot: str = ""
    """Write PNG charts (latency CDFs, throughput over time, sweep curves) into this directory."""
    scrape_metrics: bool = True
    """Scrape BASE/metrics before and after each run and report the Baton router's counters."""
    progress: bool = True
    """Draw a progress bar on stderr while running."""

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ValueError("--num-prompts must be >= 1")
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError("--input-len and --output-len must be >= 1")
        if not 0.0 <= self.range_ratio <= 1.0:
            raise ValueError("--range-ratio must be in [0, 1]")
        if self.input_len_min is not None and not 1 <= self.input_len_min <= self.input_len:
            raise ValueError("--input-len-min must be in [1, --input-len]")
        if self.output_len_min is not None and not 1 <= self.output_len_min <= self.output_len:
            raise ValueError("--output-len-min must be in [1, --output-len]")
        if self.sharegpt_output_len is not None and self.sharegpt_output_len < 1:
            raise ValueError("--sharegpt-output-len must be >= 1")
        if self.prefix_groups < 1 or self.prefix_len < 0 or self.questions_per_group < 0:
            raise ValueError("need --prefix-groups >= 1, --prefix-len >= 0, --questions-per-group >= 0")
        if self.turns < 1 or self.sessions < 0:
            raise ValueError("need --turns >= 1 and --sessions >= 0")
        if not self.request_rate > 0:
            raise ValueError("--request-rate must be > 0 (inf sends everything at once)")
        if not self.burstiness > 0:
            raise ValueError("--burstiness must be > 0")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("--max-concurrency must be >= 1")
        if self.duration is not None and not self.duration > 0:
            raise ValueError("--duration must be > 0")
        if self.warmup < 0 or self.request_timeout <= 0:
            raise ValueError("need --warmup >= 0 and --request-timeout > 0")
        if self.image_size < 1 or self.images_per_request < 1 or not 0.0 <= self.image_repeat_share <= 1.0:
            raise ValueError("need --image-size >= 1, --images-per-request >= 1, --image-repeat-share in [0, 1]")
        if self.dataset == "images" and self.endpoint != "chat":
            raise ValueError("--dataset images needs --endpoint chat (images are chat content parts)")
        if self.dataset == "file" and not self.dataset_path:
            raise ValueError("--dataset file needs --dataset-path")
        rates = self.rates()
        if self.duration is not None and self.max_concurrency is None and any(math.isinf(r) for r in rates):
            raise ValueError("--duration with an infinite request rate needs --max-concurrency")
        self.slos()

    def slos(self) -> dict[str, float]:
        """The SLOs in milliseconds, e.g. {"ttft": 500.0, "tpot": 50.0}."""
        slos: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in self.slo.split(","))):
            key, sep, value = part.partition("=")
            key = key.strip().lower()
            if not sep or key not in SLO_KEYS:
                raise ValueError(f"--slo: {part!r} is not one of ttft=MS, tpot=MS, e2e=MS")
            try:
                slos[key] = float(value)
            except ValueError:
                raise ValueError(f"--slo: {value!r} is not a number of milliseconds") from None
            if not slos[key] > 0:
                raise ValueError(f"--slo: {key} must be > 0 ms")
        return slos

    def rates(self) -> list[float]:
        """The request rates to run: the sweep's, else [request_rate]."""
        if not self.sweep_rates.strip():
            return [self.request_rate]
        try:
            rates = [float(p) for p in self.sweep_rates.split(",") if p.strip()]
        except ValueError:
            raise ValueError(f"--sweep-rates: {self.sweep_rates!r} is not a list of numbers") from None
        if not rates or any(not r > 0 for r in rates):
            raise ValueError("--sweep-rates: every rate must be > 0 (inf allowed)")
        return rates

    def to_json(self) -> dict[str, Any]:
        """Every field, JSON-safe (infinite rates as the string "inf")."""
        return {k: json_number(v) for k, v in asdict(self).items()}


def json_number(value: Any) -> Any:
    """`value` with non-finite floats as strings ("inf", "-inf", "nan"); JSON has no infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
