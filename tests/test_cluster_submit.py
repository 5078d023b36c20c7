"""The pipeline as a Ray job: a real Ray head (with its job server) on loopback, jobs sent
with the real `ray job submit` client, the way cluster/README.md tells people to run it.
The job's driver runs on this machine, so a local run.dir is shared by driver and workers.

Also fast checks, with a faked `ray`, of the refusal to write a local run.dir from a
multi-node cluster and of a job driver's ray.init not clashing with the job's env vars."""
from __future__ import annotations

from pipeline.manifests import read_manifest
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
from collections import Counter
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")  # the venv's: its job drivers find `verifine`

# The reduced toy pipeline: one objective, one benchmark, a few prompts.
SMALL = ["data.toy_count=16", "sample.block_size=4", "train.objectives=[rft]", "train.batch_size=16",
         "train.epochs=1.0", "eval.benchmarks=[toy_id]", "eval.limit=8", "eval.n=2"]
STAGE_LINE = re.compile(r"\[([\w/.\-]+)\] (running|cached) \(")


# ---- multi-node refusal (fast, fake cluster) -------------------------------------------


@pytest.fixture
def two_node_cluster(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "nodes", lambda: [{"NodeID": "a", "Alive": True}, {"NodeID": "b", "Alive": True},
                                               {"NodeID": "c", "Alive": False}])
    monkeypatch.delenv("VERIFINE_SHARED_MOUNT", raising=False)


def test_multi_node_cluster_refuses_local_run_dir(two_node_cluster, tmp_path):
    from pipeline.ray_session import check_shared_storage

    with pytest.raises(SystemExit, match=r"s3://") as e:
        check_shared_storage(str(tmp_path / "run"))
    assert "2 nodes" in str(e.value) and "VERIFINE_SHARED_MOUNT" in str(e.value)
    check_shared_storage("s3://bucket/runs/x")
    check_shared_storage("gs://bucket/runs/x")


def test_multi_node_cluster_accepts_declared_shared_mount(two_node_cluster, tmp_path, monkeypatch):
    from pipeline.ray_session import check_shared_storage

    monkeypatch.setenv("VERIFINE_SHARED_MOUNT", "1")
    check_shared_storage(str(tmp_path / "run"))


def test_single_node_cluster_accepts_local_run_dir(monkeypatch, tmp_path):
    import ray

    from pipeline.ray_session import check_shared_storage

    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": False}])
    monkeypatch.delenv("VERIFINE_SHARED_MOUNT", raising=False)
    check_shared_storage(str(tmp_path / "run"))


def test_job_driver_leaves_the_jobs_env_vars_alone(monkeypatch):
    """ray.init inside a job refuses a runtime_env setting an env var that the job's
    runtime env sets too; cluster/runtime_env.yaml sets TOKENIZERS_PARALLELISM."""
    import ray

    from pipeline import ray_session

    job_env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())["env_vars"]
    assert "TOKENIZERS_PARALLELISM" in job_env
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    context = types.SimpleNamespace(enable_progress_bars=True)  # importing ray.data takes seconds
    monkeypatch.setattr(ray, "data", types.SimpleNamespace(DataContext=types.SimpleNamespace(
        get_current=lambda: context)), raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": job_env}}))
    ray_session.connect(log=lambda *_: None)
    (kw,) = calls
    assert kw["address"] == "127.0.0.1:1"
    assert not set(kw["runtime_env"]["env_vars"]) & set(job_env)
    assert kw["runtime_env"]["env_vars"]["PYTHONWARNINGS"] == "ignore::DeprecationWarning"
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")  # outside a job: all of them
    ray_session.connect(log=lambda *_: None)
    assert calls[1]["runtime_env"]["env_vars"] == ray_session.DRIVER_ENV_VARS


# ---- a real Ray head and its job server -------------------------------------------------


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _env() -> dict:
    """For the head and every client call: this cluster only (no RAY_ADDRESS from outside),
    the venv's tools on PATH, and token auth off on both sides. Ray turns token auth on
    by itself when it finds a token in ~/.ray, and the job CLI then fails without one:
    a throwaway loopback cluster must not depend on what some earlier Ray left there."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    return env


def _ray(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([RAY, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=_env())
    if check and out.returncode != 0:
        raise AssertionError(f"ray {' '.join(args)} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def _stop_head(proc: subprocess.Popen) -> None:
    """Stop this head and everything it started, by process id. Not `ray stop`: that kills
    every Ray on the machine, including a test session's own local Ray next to this one."""
    import psutil

    def tree():
        try:
            root = psutil.Process(proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    procs = {p.pid: p for p in tree()}
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` shuts its processes down
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    for p in procs.values():  # stragglers: workers, job drivers, engine processes
        try:
            if p.is_running():  # same pid *and* start time: never a recycled pid
                p.kill()
        except psutil.Error:
            pass
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture
def ray_head(toy_model):
    """A Ray head on loopback with its dashboard (the job server). Every port is chosen
    free, and the temp dir is private (and short: Ray's socket paths must stay under
    108 bytes), so this runs beside other Ray instances on the same machine."""
    gcs, dash, client, agent = _free_ports(4)
    temp_dir = tempfile.mkdtemp(prefix="vf-ray-")
    log_path = Path(temp_dir) / "ray-start.log"
    cmd = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
           "--object-store-memory=500000000", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, f"ray start exited {proc.returncode}:\n{log_path.read_text()[-3000:]}"
            if _ray("job", "list", "--address", address, timeout=60, check=False).returncode == 0:
                break
            assert time.time() < deadline, f"the job server never came up:\n{log_path.read_text()[-3000:]}"
            time.sleep(2)
        yield address
    finally:
        _stop_head(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _runtime_env() -> str:
    """cluster/runtime_env.yaml as shipped, less its pip step (it installs the `gpu`
    extra, vLLM for CUDA, which cannot install here; this venv has the rest)."""
    env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    env.pop("pip", None)
    env["working_dir"] = str(REPO)
    return json.dumps(env)


class Jobs:
    def __init__(self, address: str):
        self.address, self.n = address, 0

    def submit(self, *entrypoint: str) -> str:
        self.n += 1
        job_id = f"verifine-test-{os.getpid()}-{self.n}"
        _ray("job", "submit", "--address", self.address, "--submission-id", job_id, "--runtime-env-json",
             _runtime_env(), "--no-wait", "--", *entrypoint, timeout=300)
        return job_id

    def wait(self, job_id: str, timeout: float = 900) -> str:
        """Follow the job's logs to its end; return its final status."""
        _ray("job", "logs", job_id, "--address", self.address, "--follow", timeout=timeout, check=False)
        for _ in range(30):
            status = self.status(job_id)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status
            time.sleep(2)
        return status

    def status(self, job_id: str) -> str:
        out = _ray("job", "status", job_id, "--address", self.address, timeout=120).stdout
        for pattern, status in ((r"Job '[^']+' succeeded", "SUCCEEDED"), (r"Job '[^']+' failed", "FAILED"),
                                (r"Job '[^']+' was stopped", "STOPPED")):
            if re.search(pattern, out):
                return status
        m = re.search(r"Status for job '[^']+': (?:JobStatus\.)?(\w+)", out)
        assert m, out
        return m.group(1)

    def logs(self, job_id: str) -> str:
        return _ray("job", "logs", job_id, "--address", self.address, timeout=120).stdout

    def stop(self, job_id: str) -> None:
        _ray("job", "stop", job_id, "--address", self.address, timeout=120)

    def run(self, *entrypoint: str) -> str:
        job_id = self.submit(*entrypoint)
        status = self.wait(job_id)
        logs = self.logs(job_id)
        assert status == "SUCCEEDED", f"job {job_id} {status}:\n{logs[-6000:]}"
        return logs


def stage_lines(logs: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in STAGE_LINE.finditer(logs)}


@pytest.mark.slow
def test_pipeline_as_ray_job(ray_head, tmp_path):
    from actors.store import RunStore

    jobs = Jobs(ray_head)
    run_dir = tmp_path / "run"
    t0 = time.time()

    # 1. The whole reduced pipeline as a job.
    logs = jobs.run("verifine", "run", f"run.dir={run_dir}", *SMALL)
    print(f"\n[cluster test] first job: {time.time() - t0:.0f}s;",
          "; ".join(f"{a} {b}" for a, b in re.findall(r"\[([\w/]+)\] done in ([\d.]+s)", logs)))
    assert "connected to Ray cluster" in logs, "the driver must join the job's cluster, not start its own"
    first = stage_lines(logs)
    assert set(first.values()) == {"running"}, first
    assert {"prompts", "sample", "verify", "train/rft", "eval/base/toy_id", "eval/rft/toy_id", "report"} <= set(first)
    for stage in first:
        assert f"[{stage}] done in " in logs, stage
        assert (run_dir / stage / "manifest.json").is_file(), stage
    assert re.search(r"finished: \d+ stage\(s\) ran, 0 cached", logs)
    assert (run_dir / "report" / "report.md").is_file()
    assert json.loads((run_dir / "eval/base/toy_id/manifest.json").read_text())["status"] == "complete"
    assert json.loads((run_dir / "train/rft/manifest.json").read_text())["status"] == "complete"

    # 2. Only an eval setting changed: the evals and the report re-run, nothing upstream.
    t1 = time.time()
    logs = jobs.run("verifine", "run", f"run.dir={run_dir}", *SMALL, "eval.n=3")
    print(f"[cluster test] eval-only job: {time.time() - t1:.0f}s")
    second = stage_lines(logs)
    assert set(second) == set(first)
    ran = {s for s, state in second.items() if state == "running"}
    assert ran == {s for s in first if s.startswith("eval/") or s == "report"}, second
    assert f"finished: {len(ran)} stage(s) ran, {len(first) - len(ran)} cached" in logs

    # 3. Sampling stopped with `ray job stop` part-way, then the same job again: it resumes,
    #    and every (prompt, sample) is there exactly once.
    t2 = time.time()
    run2 = tmp_path / "run2"
    # The toy model fills a block in ~0.2 s, faster than `ray job stop` (a CLI start, then
    # SIGTERM) lands; the stopped job pauses 1 s after each block (a test hook) so the stop
    # falls mid-stage. The resubmission runs at full speed.
    prompts, n, block = 96, 4, 4
    cmd = ("verifine", "run", "--stages", "sample", f"run.dir={run2}", f"data.toy_count={prompts}",
           f"sample.n={n}", f"sample.block_size={block}")
    job_id = jobs.submit("env", "VERIFINE_TEST_BLOCK_DELAY_S=1", *cmd)
    deadline, next_check = time.time() + 600, time.time() + 15
    while not list(run2.glob("sample/parts-*/block-*.parquet")):
        assert time.time() < deadline, "sampling never produced a block"
        if time.time() > next_check:  # a job that died early: fail now, with its logs
            status, next_check = jobs.status(job_id), time.time() + 15
            assert status in ("PENDING", "RUNNING"), f"{status}:\n{jobs.logs(job_id)[-4000:]}"
        time.sleep(0.2)
    jobs.stop(job_id)
    assert jobs.wait(job_id, timeout=120) == "STOPPED"
    time.sleep(2)  # the driver's process group is gone; nothing writes any more
    store = RunStore(str(run2))
    assert read_manifest(store, "sample") is None, "a stopped stage must not look complete"
    before = list(run2.glob("sample/parts-*/block-*.parquet"))
    assert 1 <= len(before) < prompts // block, f"stopped too late to test resuming ({len(before)} blocks)"
    logs = jobs.run(*cmd)
    print(f"[cluster test] stop + resume: {time.time() - t2:.0f}s ({len(before)} blocks before the stop)")
    assert stage_lines(logs) == {"prompts": "cached", "sample": "running"}
    assert f"{len(before)} already sampled" in logs
    rows = store.read_rows("sample")
    keys = Counter((r["prompt_id"], r["sample_idx"]) for r in rows)
    assert len(rows) == len(keys) == prompts * n and max(keys.values()) == 1
    assert {k[1] for k in keys} == set(range(n))
    print(f"[cluster test] total {time.time() - t0:.0f}s")
