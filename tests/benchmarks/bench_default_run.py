"""Wall time of the embedded toy default, `verifine run`, cold and then fully cached.

    python tests/benchmarks/bench_default_run.py [--reuse-cache] [--keep] [override ...]

Runs `verifine run run.dir=<tmp>/run [override ...]` as a child process twice:

1. cold: VERIFINE_CACHE points at a fresh empty directory, so the toy base model is
   built from scratch, then every stage runs (sample, verify, reference, train x5,
   eval, report). Target: <= 20 minutes on 2 cores.
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
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import load_avg

REPO = Path(__file__).resolve().parents[2]
FIRST_TARGET_S = 20 * 60


def verifine_command() -> list[str]:
    script = Path(sys.executable).with_name("verifine")
    return [str(script)] if script.exists() else [sys.executable, "-m", "pipeline.cli"]


def timed_run(cmd: list[str], env: dict, log_path: Path, label: str, quiet: bool) -> tuple[int, float]:
    print(f"[{label}] {' '.join(cmd)}  (load average {load_avg()})", flush=True)
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
    print(f"[{label}] exit {rc}, wall {wall:.1f} s (load average {load_avg()})", flush=True)
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
