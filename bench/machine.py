"""One line describing the machine a benchmark ran on (CPU model, cores, torch version), and
how a benchmark prints its report and appends it to a RESULTS.md (`report`)."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def describe_machine(extra: str = "") -> str:
    """e.g. "AMD EPYC, 2 cores, torch 2.13.0+cpu" (plus `extra`, comma-separated, when given)."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch  # here, so that `report` needs no torch
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores, torch {torch.__version__}" + (f", {extra}" if extra else "")


def report(text: str, results: str = "") -> None:
    """Print a benchmark's markdown section and, with `results` (a path), append it there."""
    print(text)
    if results:
        with open(results, "a") as out:
            out.write("\n" + text)
