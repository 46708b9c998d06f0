"""PNG charts of a `baton bench` result document (matplotlib, Agg backend, no display).

- `latency_cdf.png`: CDFs of TTFT, TPOT, ITL and E2E, one line per run (rate).
- `throughput_over_time.png`: output tokens/s and completed requests/s per time bin.
- with a sweep (more than one rate): `sweep_goodput.png` (goodput and request throughput
  against the offered rate) and `sweep_ttft.png` (TTFT mean and p99 against the rate).
An infinite rate is drawn at twice the largest finite one and labelled "inf".
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from baton.bench.serving.metrics import cdf  # noqa: E402


def _label(run: dict) -> str:
    return f"rate {run['request_rate']}"


def _latency_cdf(doc: dict, path: Path) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (name, key) in zip(axes.flat, (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"),
                                           ("E2E latency", "e2e_ms"))):
        for run in doc["runs"]:
            ok = [r for r in run["requests"] if r["success"]]
            values = [x for r in ok for x in r["itl_ms"]] if key == "itl_ms" else \
                [r[key] for r in ok if r[key] is not None]
            if values:
                xs, ys = cdf(values)
                ax.step([xs[0], *xs], [0.0, *ys], where="post", label=_label(run))
        ax.set_title(f"{name} CDF")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests" if key != "itl_ms" else "fraction of gaps")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _throughput(doc: dict, path: Path) -> None:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for run in doc["runs"]:
        series = run["throughput_over_time"]
        if not series["t"]:
            continue
        t = [*series["t"], series["t"][-1] + series["bin_s"]]  # close the last bin
        top.step(t, [*series["output_tokens_per_s"], series["output_tokens_per_s"][-1]], where="post",
                 label=_label(run))
        bottom.step(t, [*series["requests_per_s"], series["requests_per_s"][-1]], where="post", label=_label(run))
    top.set_ylabel("output tokens/s")
    bottom.set_ylabel("completed requests/s")
    bottom.set_xlabel("seconds since the run started")
    top.set_title("Throughput over time")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _rate_axis(rates: list) -> tuple[list[float], list[str]]:
    finite = [float(r) for r in rates if r != "inf"]
    top = max(finite) * 2 if finite else 1.0
    return [top if r == "inf" else float(r) for r in rates], [str(r) for r in rates]


def _sweep(doc: dict, directory: Path) -> list[Path]:
    sweep = doc["sweep"]
    xs, labels = _rate_axis(sweep["request_rate"])
    paths = []
    for name, series, ylabel, title in (
            ("sweep_goodput.png", (("goodput", "goodput"), ("request_throughput", "request throughput")),
             "requests/s", "Goodput against request rate"),
            ("sweep_ttft.png", (("ttft_ms_mean", "TTFT mean"), ("ttft_ms_p99", "TTFT p99")),
             "ms", "TTFT against request rate")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for key, label in series:
            points = [(x, y) for x, y in zip(xs, sweep[key]) if y is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=label)
        ax.set_xticks(xs, labels)
        ax.set_xlabel("offered request rate (req/s)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        fig.tight_layout()
        path = directory / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def write_plots(doc: dict, directory: str) -> list[str]:
    """Write every chart for `doc` into `directory`; returns the paths written."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "latency_cdf.png", out / "throughput_over_time.png"]
    _latency_cdf(doc, paths[0])
    _throughput(doc, paths[1])
    if doc.get("sweep"):
        paths += _sweep(doc, out)
    return [str(p) for p in paths]
