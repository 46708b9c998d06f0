"""One line describing the machine a benchmark ran on (CPU model, cores, torch version)."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


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
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores, torch {torch.__version__}" + (f", {extra}" if extra else "")
