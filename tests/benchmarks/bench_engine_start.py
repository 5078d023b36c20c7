"""Start-up cost of one vLLM engine as a sampling actor pays it: `from vllm import LLM`
plus building the engine on the cached toy model, in a fresh process with one OpenMP
thread (what Ray gives a 1-CPU actor).

    python tests/benchmarks/bench_engine_start.py [--repeat 3] [--arms ram_share,gc_paused,explicit_kv]

Arms, each in its own child process, alternating over --repeat rounds:
- ram_share: the KV cache sized as a share of RAM (gpu_memory_utilization 0.2, the toy
  configs' setting before sample.kv_cache_gib), cyclic GC on: the old start-up.
- gc_paused: the same inside `actors.gc_pause.gc_paused` (as VLLMSampler builds it now).
- explicit_kv: also sample.kv_cache_gib=0.25 (configs/toy.yaml): a 0.25 GiB cache instead
  of 20% of RAM, which vLLM's CPU backend zero-fills at start-up.

Printed per arm: median wall and CPU seconds (user+sys of the child) and peak RSS, and
the ratio of each median to the first arm's. Every engine start runs the same imports,
so the figures move with the machine's load: the load average is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

from bench_common import load_avg

REPO = Path(__file__).resolve().parents[2]
ARMS = {"ram_share": dict(gc_paused=False, kv_cache_gib=None),
        "gc_paused": dict(gc_paused=True, kv_cache_gib=None),
        "explicit_kv": dict(gc_paused=True, kv_cache_gib=0.25)}
RESULT = "BENCH_RESULT "


def child(arm: str) -> None:
    """Runs in the child: time the imports and the engine build."""
    import contextlib

    sys.path.insert(0, str(REPO))
    from actors.gc_pause import gc_paused
    from pipeline.toy_model import ensure_toy_model

    model = str(ensure_toy_model(0))  # built beforehand by the parent: a cache hit
    settings = ARMS[arm]
    t0 = time.perf_counter()
    with gc_paused() if settings["gc_paused"] else contextlib.nullcontext():
        from actors.sampler import EngineSpec, make_engine

        make_engine(EngineSpec(model=model, gpu_memory_utilization=0.2, kv_cache_gib=settings["kv_cache_gib"]))
    print(RESULT + json.dumps({"wall_s": time.perf_counter() - t0}), flush=True)


def run_child(arm: str) -> dict:
    """Wall time of the start-up (the child's own clock), CPU seconds and peak RSS of the
    whole child process (os.wait4's rusage: imports of the interpreter included)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, __file__, "--child", arm], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    lines = [l for l in out.splitlines() if l.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"[{arm}] failed (exit {proc.returncode}):\n{out[-2000:]}")
    return {**json.loads(lines[-1][len(RESULT):]), "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mib": usage.ru_maxrss / 1024}  # Linux: KiB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--child", choices=sorted(ARMS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child)
        return
    sys.path.insert(0, str(REPO))
    from pipeline.toy_model import ensure_toy_model

    ensure_toy_model(0)
    arms = args.arms.split(",")
    print(f"{os.cpu_count()} CPUs; load average {load_avg()}")
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    for rep in range(args.repeat):
        for arm in arms:  # alternate, so a burst of outside load hits every arm
            r = run_child(arm)
            runs[arm].append(r)
            print(f"[{arm}] run {rep + 1}: wall {r['wall_s']:.2f} s, CPU {r['cpu_s']:.2f} s, peak RSS "
                  f"{r['peak_rss_mib']:.0f} MiB (load {load_avg()})", flush=True)
    base = None
    for arm in arms:
        wall, cpu = median(r["wall_s"] for r in runs[arm]), median(r["cpu_s"] for r in runs[arm])
        rss = median(r["peak_rss_mib"] for r in runs[arm])
        base = base or (wall, cpu)
        print(f"{arm:12s} median start-up wall {wall:.2f} s ({wall / base[0]:.2f}x), process CPU {cpu:.2f} s "
              f"({cpu / base[1]:.2f}x), peak RSS {rss:.0f} MiB")
    print(f"load average now {load_avg()}")


if __name__ == "__main__":
    main()
