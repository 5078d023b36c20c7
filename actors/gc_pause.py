"""Start-up without the cyclic garbage collector.

A worker's start-up (importing vLLM or DeepSpeed and transformers, building the engine
or the model) allocates millions of long-lived objects and almost no garbage, and the
collector walks the growing heap again on every few hundred allocations: `from vllm
import LLM` plus a toy engine, 26.0 CPU-s with it and 24.2 without (median of 3,
tests/benchmarks/bench_engine_start.py; README). Used only
in worker processes around their set-up; the collector is back on before any work.
"""
from __future__ import annotations

import gc
from contextlib import contextmanager


@contextmanager
def gc_paused():
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
