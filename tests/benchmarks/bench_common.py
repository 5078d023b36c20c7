"""Helpers shared by the benchmark scripts (run as `python tests/benchmarks/<script>.py`,
so this directory is on sys.path)."""
from __future__ import annotations

import os


def load_avg() -> str:
    """The 1/5/15-minute load averages: every printed figure says how busy the machine was."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"
