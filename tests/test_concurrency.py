"""Independent stages run at the same time: with a local Ray given more logical CPUs than
the machine has, two training runs overlap (their recorded stage intervals intersect),
and their models equal those of a one-stage-at-a-time run."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from actors.store import RunStore
from pipeline.manifests import read_manifest
from tests.conftest import all_cpus_free_within

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = ["data.toy_count=32", "sample.block_size=32", "train.objectives=[rft,dft]", "train.batch_size=16",
             "train.epochs=1", "train.checkpoint_every=10", "eval.models=[]", "ray.num_cpus=6"]


def cli(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", *args, f"run.dir={run_dir}", *OVERRIDES],
                          cwd=REPO, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def weights(store: RunStore, stage: str) -> dict:
    from safetensors.torch import load_file

    m = read_manifest(store, stage)
    rel = next(f for f in m["files"] if f.endswith(".safetensors"))
    return load_file(store.path(rel))


def test_two_training_runs_overlap_and_equal_a_sequential_run(toy_model, tmp_path):
    import torch

    parallel, serial = tmp_path / "parallel", tmp_path / "serial"
    cli(parallel, "--stages", "verify")
    shutil.copytree(parallel, serial)
    cli(parallel)
    cli(serial, "ray.max_parallel_stages=1")
    p, s = RunStore(str(parallel)), RunStore(str(serial))
    spans = {run: (read_manifest(p, f"train/{run}")["started"], read_manifest(p, f"train/{run}")["finished"])
             for run in ("rft", "dft")}
    (a0, a1), (b0, b1) = spans["rft"], spans["dft"]
    assert a0 < b1 and b0 < a1, f"independent training runs did not overlap: {spans}"
    t = {run: (read_manifest(s, f"train/{run}")["started"], read_manifest(s, f"train/{run}")["finished"])
         for run in ("rft", "dft")}
    assert t["rft"][1] <= t["dft"][0] or t["dft"][1] <= t["rft"][0], "max_parallel_stages=1 must not overlap"
    for run in ("rft", "dft"):
        wp, ws = weights(p, f"train/{run}"), weights(s, f"train/{run}")
        assert wp.keys() == ws.keys()
        for k in wp:
            torch.testing.assert_close(wp[k], ws[k], rtol=1e-5, atol=1e-6)


def test_a_local_training_run_starts_only_when_its_cpus_are_free(ray_local, monkeypatch):
    """On a local Ray verifine started, Ray Train's fit (here: a stand-in that creates the
    same kind of placement group) is called only once all the CPUs it needs are free, so
    Ray Train's per-run actors never poll while it queues; a second caller is admitted
    only after the first one's placement group is created."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from pipeline import ray_session

    monkeypatch.setattr(ray_session, "_local", [True])
    all_cpus_free_within(60)  # actors of earlier tests end asynchronously (ray.kill)
    need = {"CPU": ray.available_resources().get("CPU", 0)}  # everything free now
    assert need["CPU"] >= 1
    holder = ray.remote(num_cpus=1)(threading.Event).remote()  # an actor holding one of those CPUs
    ray.get(holder.is_set.remote())
    started, release = [], threading.Event()

    def fit():
        started.append(time.time())
        pg = placement_group([{"CPU": 1}] * int(need["CPU"]))
        ray.get(pg.ready())
        release.wait(60)
        remove_placement_group(pg)
        return "fitted"

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(ray_session.run_when_free, fit, need, 0.1)
        time.sleep(3)
        assert started == []  # one CPU is still held
        ray.kill(holder)
        second = pool.submit(ray_session.run_when_free, lambda: started.append("second") or "second", {"CPU": 1}, 0.1)
        deadline = time.time() + 60
        while len(started) < 1 and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(2)
        assert len(started) == 1  # the second waits: the first one's group holds every CPU
        release.set()
        assert first.result(timeout=60) == "fitted"
        assert second.result(timeout=60) == "second"

    monkeypatch.setattr(ray_session, "_local", [])
    assert ray_session.run_when_free(lambda: "now", {"CPU": 10 ** 6}) == "now"  # not a local Ray: never held back
