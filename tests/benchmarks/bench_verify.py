"""Verification throughput: one `Verifier` serially vs `verify_with_ray` with 2 tasks.

    python tests/benchmarks/bench_verify.py [--repeat 4] [--tasks 2]

Uses the MATH-500 (solution, answer) pairs from the shared/ data dir beside the repo,
repeated --repeat times (like k samples per prompt). Prints verifications/s and the
ratios. "cold": fresh child processes (for Ray also the workers' first import);
"warm": a second pass on the same children, as a long-running pipeline sees them.
Ray start-up itself is not timed.

Wall-clock ratios only mean something on otherwise idle cores, so the script also
prints the CPU seconds burnt by this process tree (Ray daemons, workers and verifier
children included) and the speed-up that CPU cost allows on `--tasks` idle cores.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run as a plain script from anywhere

from actors.verifier import Verifier, verify_with_ray  # noqa: E402

MATH500 = REPO.parent / "shared/data/benchmarks/math_oai.jsonl"
TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def load_pairs(repeat: int) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in MATH500.read_text().splitlines() if line.strip()]
    return [(r["solution"], r["answer"]) for r in rows] * repeat


def tree_cpu_s() -> dict[int, float]:
    """user+sys CPU seconds of this process and its live descendants (Linux /proc)."""
    parent, cpu = {}, {}
    for d in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not d.isdigit():
            continue
        try:
            fields = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # it just exited
        pid = int(d)
        parent[pid] = int(fields[1])
        cpu[pid] = (int(fields[11]) + int(fields[12])) / TICKS
    mine, grown = {os.getpid()}, True
    while grown:  # pids are not ordered by ancestry: sweep until the tree stops growing
        more = {p for p, pp in parent.items() if pp in mine} - mine
        mine, grown = mine | more, bool(more)
    return {p: cpu[p] for p in mine if p in cpu}


def timed(fn):
    """(result, wall seconds, CPU seconds of the process tree)."""
    c0, t0 = tree_cpu_s(), time.perf_counter()
    out = fn()
    wall, c1 = time.perf_counter() - t0, tree_cpu_s()
    return out, wall, sum(c - c0.get(p, 0.0) for p, c in c1.items())


def run_serial(pairs, deadline_s):
    """Two passes on one Verifier: the first starts and warms its child."""
    v = Verifier(deadline_s=deadline_s)  # its child starts on the first item
    cold = timed(lambda: v.judge_many(pairs))
    warm = timed(lambda: v.judge_many(pairs))
    v.close()
    return cold, warm


def report(name: str, n: int, wall: float, cpu: float) -> tuple[float, float]:
    print(f"{name:<26} {n:>6} items {wall:7.2f} s {n / wall:7.1f} verifications/s"
          f"   CPU {cpu:6.2f} s")
    return n / wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--deadline", type=float, default=10.0)
    args = ap.parse_args()
    if not MATH500.exists():
        sys.exit(f"MATH-500 not found at {MATH500}")

    import ray

    pairs = load_pairs(args.repeat)
    completions, golds = [c for c, _ in pairs], [g for _, g in pairs]
    ray.init(num_cpus=args.tasks, include_dashboard=False, log_to_driver=False)
    try:
        s_cold, s_warm = run_serial(pairs, args.deadline)
        r_cold = timed(lambda: verify_with_ray(completions, golds, args.tasks, args.deadline, min_items_per_task=1))
        r_warm = timed(lambda: verify_with_ray(completions, golds, args.tasks, args.deadline, min_items_per_task=1))
    finally:
        ray.shutdown()

    assert s_cold[0] == s_warm[0] == r_cold[0] == r_warm[0], "ray differs from serial"
    correct = sum(v == "correct" for v, _ in s_cold[0])
    print(f"MATH-500 x{args.repeat}: {correct}/{len(pairs)} judged correct; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    n = len(pairs)
    for label, serial, par in (("cold", s_cold, r_cold), ("warm", s_warm, r_warm)):
        rate_s, cpu_s = report(f"serial 1 Verifier, {label}", n, *serial[1:])
        rate_r, cpu_r = report(f"ray {args.tasks} tasks, {label}", n, *par[1:])
        bound = args.tasks * cpu_s / cpu_r if cpu_r else float("nan")
        print(f"  {label}: wall-clock speed-up {rate_r / rate_s:.2f}x; CPU cost allows "
              f"{bound:.2f}x on {args.tasks} idle cores (target >= 1.6x)")


if __name__ == "__main__":
    main()
