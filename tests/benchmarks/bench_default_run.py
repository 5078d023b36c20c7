"""Wall time of the embedded toy default, `verifine run`, cold and then fully cached,
the CPU utilisation of the run, and where the wall time goes.

    python tests/benchmarks/bench_default_run.py [--reuse-cache] [--keep] [override ...]

Runs `verifine run run.dir=<tmp>/run [override ...]` as a child process twice:

1. cold: VERIFINE_CACHE points at a fresh empty directory, so the toy base model is
   built from scratch, then every stage runs (sample, verify, reference, train x5,
   eval, report). Target: <= 6 minutes on 2 cores, CPUs >= 85% busy on average.
2. warm: the same command again; every stage's manifest matches, so nothing is
   recomputed. Target: seconds (what remains is Python/Ray start-up and fingerprints).

--reuse-cache keeps the default cache ($VERIFINE_CACHE or ~/.cache/verifine), so the
cold run reuses an already built toy model and times only the pipeline. Other caches
(vLLM's, DeepSpeed's JIT-built ops under ~/.cache/torch_extensions) are left as they
are in both modes. The children's output is streamed with elapsed-time stamps and
kept in <tmp>/run-{1,2}.log; the temp dir is removed unless --keep.
This takes ~20 minutes: it is a script, not a pytest test.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import load_avg

REPO = Path(__file__).resolve().parents[2]
FIRST_TARGET_S = 6 * 60


def stage_table(run_dir: Path) -> str:
    """Per stage: wall time (manifest started -> finished), the part spent on the work
    itself (engine generate time + judging; the training loop; verification) and the rest
    (start-up: actors, engines, worker groups, model loading; export)."""
    rows = [("stage", "start", "wall s", "work s", "start-up+rest s")]
    manifests = []
    for m in run_dir.rglob("manifest.json"):
        data = json.loads(m.read_text())
        if data.get("status") == "complete":
            manifests.append(data)
    if not manifests:
        return "(no stages)"
    t0 = min(m["started"] for m in manifests)
    for m in sorted(manifests, key=lambda m: m["started"]):
        wall, stats, name = m["finished"] - m["started"], m.get("stats") or {}, m["stage"]
        if name == "sample":
            work = stats.get("generate_s")
        elif name.startswith("eval/"):
            work = (stats.get("sampling") or {}).get("generate_s", 0) + stats.get("judge_s", 0)
        elif name.startswith("train/"):
            work = (stats.get("final") or {}).get("elapsed_s")
        elif name == "verify":
            work = stats.get("seconds")
        else:
            work = None
        rest = "-" if work is None else f"{wall - work:.1f}"
        rows.append((name, f"+{m['started'] - t0:.0f}s", f"{wall:.1f}", "-" if work is None else f"{work:.1f}", rest))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def verifine_command() -> list[str]:
    script = Path(sys.executable).with_name("verifine")
    return [str(script)] if script.exists() else [sys.executable, "-m", "pipeline.cli"]


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def timed_run(cmd: list[str], env: dict, log_path: Path, label: str, quiet: bool) -> tuple[int, float]:
    print(f"[{label}] {' '.join(cmd)}  (load average {load_avg()})", flush=True)
    busy0, total0 = cpu_jiffies()
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        for line in proc.stdout:
            log.write(line)
            if not quiet:
                print(f"  {time.perf_counter() - t0:7.1f}s | {line.rstrip()}", flush=True)
        rc = proc.wait()
    wall = time.perf_counter() - t0
    busy1, total1 = cpu_jiffies()
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (children1.ru_utime - children0.ru_utime) + (children1.ru_stime - children0.ru_stime)
    cores = os.cpu_count() or 1
    print(f"[{label}] exit {rc}, wall {wall:.1f} s (load average {load_avg()}); CPU busy: machine "
          f"{100 * (busy1 - busy0) / max(total1 - total0, 1):.0f}% (/proc/stat), process tree "
          f"{100 * cpu_s / (wall * cores):.0f}% of {cores} cores (user+sys {cpu_s:.0f} s, reaped children)",
          flush=True)
    if rc != 0:
        print(f"[{label}] last output:\n{log_path.read_text()[-3000:]}")
    return rc, wall


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reuse-cache", action="store_true",
                   help="keep the default VERIFINE_CACHE (the toy model is not rebuilt)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (run dir, cache, logs)")
    p.add_argument("--quiet", action="store_true", help="do not stream the runs' output")
    p.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-default-run-"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.reuse_cache:
        cache_note = f"default cache kept ({os.environ.get('VERIFINE_CACHE', '~/.cache/verifine')})"
    else:
        env["VERIFINE_CACHE"] = str(tmp / "cache")
        cache_note = f"fresh VERIFINE_CACHE={env['VERIFINE_CACHE']} (toy model built from scratch)"
    cmd = verifine_command() + ["run", f"run.dir={tmp / 'run'}", *args.overrides]
    print(f"{os.cpu_count()} CPUs; {cache_note}")
    try:
        rc1, first = timed_run(cmd, env, tmp / "run-1.log", "first", args.quiet)
        if rc1 != 0:
            return rc1
        rc2, second = timed_run(cmd, env, tmp / "run-2.log", "second", args.quiet)
        print()
        print(stage_table(tmp / "run"))
        print()
        print(f"first run (cold{'' if not args.reuse_cache else ', cached toy model'}): {first:8.1f} s "
              f"({first / 60:.1f} min; target <= {FIRST_TARGET_S / 60:.0f} min on 2 cores: "
              f"{'met' if first <= FIRST_TARGET_S else 'MISSED'})")
        print(f"second run (all cached):   {second:8.1f} s (target: seconds)")
        tail = [l for l in (tmp / "run-2.log").read_text().splitlines() if l.strip()][-1:]
        print(f"second run's last line: {tail[0] if tail else '(none)'}")
        return rc2
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
