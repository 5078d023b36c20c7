"""The implicit-reward recipe: its wall time on this machine, and how its stage DAG would
schedule on a cluster.

    python tests/benchmarks/bench_recipe_schedule.py [--run] [--run-dir runs/toy-implicit-reward]
        [--nodes 4 --gpus-per-node 8 --gpus-per-train 8 --gpus-per-engine 1 --sample-engines 8] [key=value ...]

--run first runs `verifine run configs/toy-implicit-reward.yaml` (cold or warm, as the
run directory is) and prints its wall time (target: <= 15 min on 2 cores). Then, from the
stage durations the run's manifests record (started/finished), it simulates a greedy
list schedule of the same DAG on a stated GPU cluster (each training run asks for
--gpus-per-train GPUs, an eval or reference stage for one engine, sampling for
--sample-engines engines, CPU stages for none; ready stages start longest-remaining-path
first when their GPUs are free) and prints its makespan against the sum of stage times
(one after another) and the critical path (infinite resources). Target: makespan <= 1.2x
the critical path.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import load_avg  # noqa: E402

CONFIG = REPO / "configs" / "toy-implicit-reward.yaml"


def gpus_for(stage: str, args) -> int:
    kind = stage.split("/", 1)[0]
    return {"train": args.gpus_per_train, "sample": args.sample_engines * args.gpus_per_engine,
            "eval": args.gpus_per_engine, "reference": args.gpus_per_engine}.get(kind, 0)


def critical_path(durations: dict, deps: dict) -> dict[str, float]:
    """Longest remaining path (this stage included) from each stage to the end."""
    children = {s: [c for c, ds in deps.items() if s in ds] for s in deps}
    memo: dict[str, float] = {}

    def rest(s):
        if s not in memo:
            memo[s] = durations[s] + max((rest(c) for c in children[s]), default=0.0)
        return memo[s]
    return {s: rest(s) for s in deps}


def simulate(durations: dict, deps: dict, gpus: dict, capacity: int) -> float:
    """Greedy list scheduling: at each event, start ready stages (longest remaining path
    first) whose GPU demand fits the free GPUs. Returns the makespan."""
    priority = critical_path(durations, deps)
    done_at: dict[str, float] = {}
    running: list[tuple[float, str]] = []
    free, now = capacity, 0.0
    pending = set(durations)
    while pending or running:
        ready = sorted((s for s in pending if all(d in done_at and done_at[d] <= now for d in deps[s])),
                       key=lambda s: -priority[s])
        for s in ready:
            if gpus[s] <= free:
                free -= gpus[s]
                pending.remove(s)
                running.append((now + durations[s], s))
        if not running:
            raise RuntimeError(f"stages {sorted(pending)} can never start (a stage needs more GPUs than exist?)")
        running.sort()
        now, s = running.pop(0)
        done_at[s] = now
        free += gpus[s]
    return max(done_at.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="store_true", help="run the recipe first and time it")
    p.add_argument("--run-dir", default=str(REPO / "runs" / "toy-implicit-reward"))
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpus-per-train", type=int, default=8)
    p.add_argument("--gpus-per-engine", type=int, default=1)
    p.add_argument("--sample-engines", type=int, default=8)
    p.add_argument("overrides", nargs="*", help="key=value overrides the run was made with (e.g. a reduced recipe)")
    args = p.parse_args()

    if args.run:
        before = load_avg()
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(CONFIG), f"run.dir={args.run_dir}",
                               *args.overrides],
                              cwd=REPO, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        wall = time.time() - t0
        print(f"recipe run: {wall:.1f} s ({wall / 60:.1f} min; target <= 15 min), exit {proc.returncode}; "
              f"load average before {before}, after {load_avg()}")
        if proc.returncode:
            sys.exit(proc.returncode)

    from actors.store import RunStore
    from pipeline.config import load_config
    from pipeline.manifests import read_manifest
    from pipeline.plan import build_stages

    store = RunStore(args.run_dir, create=False)
    stages = build_stages(load_config(CONFIG, [f"run.dir={args.run_dir}", *args.overrides]))
    durations, deps = {}, {}
    for s in stages:
        m = read_manifest(store, s.name)
        if not m or m.get("status") != "complete":
            sys.exit(f"{s.name} has no complete manifest in {args.run_dir}: run with --run first")
        durations[s.name] = m["finished"] - m["started"]
        deps[s.name] = [*s.inputs, *s.after]
    gpus = {s: gpus_for(s, args) for s in durations}
    capacity = args.nodes * args.gpus_per_node
    total = sum(durations.values())
    path = max(critical_path(durations, deps).values())
    makespan = simulate(durations, deps, gpus, capacity)
    print(f"{len(durations)} stages, measured on this machine (toy recipe); resource model: {args.nodes} nodes x "
          f"{args.gpus_per_node} GPUs, {args.gpus_per_train} GPUs per training run, {args.gpus_per_engine} per "
          f"engine, {args.sample_engines} sampling engines")
    print(f"sum of stage times (one after another): {total:8.1f} s")
    print(f"critical path (unlimited resources):    {path:8.1f} s")
    print(f"DAG schedule makespan:                  {makespan:8.1f} s = {makespan / path:.2f}x the critical path "
          f"(target <= 1.2x), {total / makespan:.2f}x faster than one after another")


if __name__ == "__main__":
    main()
