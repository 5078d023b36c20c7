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
