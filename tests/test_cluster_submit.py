"""The pipeline as a Ray job, sent with the real `ray job submit` client to real Ray nodes
started with `ray start`, the way cluster/README.md tells people to run it, with Ray's
token authentication on.

- One node and a local run dir: the job's driver and its workers share the disk.
- Two nodes and a run dir on an S3 API on loopback (a moto server): the second node has a
  private, empty tmpfs over the model cache and the toy model's build directory (its own
  mount namespace), so a path that exists only on the head, where the job's driver runs,
  is missing there, as on a real cluster. A custom resource only the second node offers
  (`ray.worker_resource`) places the engine actors, the train workers and the report's
  scoring tasks there.

Every node also runs in its own PID namespace: `ray stop` run inside it stops that node
and nothing else on the machine (other Ray instances may share it), and killing the
namespace's first process ends whatever is left.

Also fast checks, with a faked `ray`, of the refusal to write a local run.dir from a
multi-node cluster and of a job driver's ray.init not clashing with the job's env vars."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import yaml

from pipeline.manifests import is_complete, read_manifest

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


def _fake_ray_init(monkeypatch) -> list[dict]:
    import ray

    from pipeline import ray_session

    calls = []
    # connect() records whether it started Ray; the session's real local Ray keeps its record.
    monkeypatch.setattr(ray_session, "_local", [])
    monkeypatch.setattr(ray_session, "_placement", {})
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0, "worker_node": 4.0})
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    return calls


def test_job_driver_leaves_the_jobs_env_vars_alone(monkeypatch):
    """ray.init inside a job refuses a runtime_env setting an env var that the job's
    runtime env sets too; cluster/runtime_env.yaml sets TOKENIZERS_PARALLELISM."""
    from pipeline import ray_session

    job_env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())["env_vars"]
    assert "TOKENIZERS_PARALLELISM" in job_env
    calls = _fake_ray_init(monkeypatch)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": job_env}}))
    ray_session.connect(log=lambda *_: None)
    (kw,) = calls
    assert kw["address"] == "127.0.0.1:1"
    assert not set(kw["runtime_env"]["env_vars"]) & set(job_env)
    assert kw["runtime_env"]["env_vars"]["PYTHONWARNINGS"] == "ignore::DeprecationWarning"
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")  # outside a job: all of them
    ray_session.connect(log=lambda *_: None)
    assert calls[1]["runtime_env"]["env_vars"] == ray_session.DRIVER_ENV_VARS


def test_a_local_ray_runs_training_without_dashboard_metrics_or_preemption_watcher(monkeypatch):
    """Only a Ray verifine starts itself (no dashboard, no preemptible nodes) turns off Ray
    Train's dashboard metrics and preemption watcher and shortens its controller's poll,
    in the driver and in the runtime env its actors get; a user's own value wins; a
    cluster keeps its settings."""
    from pipeline import ray_session

    calls = _fake_ray_init(monkeypatch)
    for k in ray_session.LOCAL_RAY_ENV_VARS:  # unset now and after the test, whatever connect() sets
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)
    ray_session.connect(log=lambda *_: None)  # RAY_ADDRESS set: a cluster
    assert not set(ray_session.LOCAL_RAY_ENV_VARS) & set(calls[0]["runtime_env"]["env_vars"])
    assert not set(ray_session.LOCAL_RAY_ENV_VARS) & set(os.environ)

    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setenv("RAY_TRAIN_METRICS_ENABLED", "1")  # the user's choice
    ray_session.connect(log=lambda *_: None)
    env_vars = calls[1]["runtime_env"]["env_vars"]
    assert env_vars["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert env_vars["RAY_TRAIN_METRICS_ENABLED"] == os.environ["RAY_TRAIN_METRICS_ENABLED"] == "1"
    assert env_vars["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"


def test_worker_resource_reaches_model_loading_workers_only_when_set(monkeypatch):
    """ray.worker_resource: a custom resource added to the requests of every worker that
    loads a model; nothing changes when it is not set; CPU/GPU stay the stages' own."""
    from pipeline import ray_session
    from pipeline.config import identity_dump, load_config

    _fake_ray_init(monkeypatch)
    logged = []
    ray_session.connect(log=logged.append)
    assert ray_session.worker_remote_args() == {} and ray_session.train_worker_resources(False) == {"CPU": 1}
    cfg = load_config(None, ["ray.worker_resource=worker_node"])
    ray_session.connect(log=logged.append, worker_resource=cfg.ray.worker_resource)
    amount = ray_session.WORKER_RESOURCE_AMOUNT
    assert ray_session.worker_remote_args() == {"resources": {"worker_node": amount}}
    assert ray_session.train_worker_resources(False) == {"CPU": 1, "worker_node": amount}
    assert ray_session.train_worker_resources(True) == {"GPU": 1, "worker_node": amount}
    assert ray_session.train_worker_resources(False, 2) == {"CPU": 2, "worker_node": amount}
    assert "'worker_node' (4 in the cluster now)" in logged[-1]
    # an execution setting: no stage's identity sees it
    assert identity_dump(cfg, "") == identity_dump(load_config(None, []), "")
    with pytest.raises(SystemExit, match="GPU"):
        ray_session.connect(log=logged.append, worker_resource="GPU")
    ray_session.connect(log=logged.append)
    assert ray_session.worker_remote_args() == {}


# ---- real Ray nodes, each in its own PID and mount namespaces ----------------------------


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


def _namespaces_unavailable() -> str | None:
    """Why the nodes cannot get their own namespaces here (None: they can)."""
    for tool in ("unshare", "nsenter", "mount"):
        if not shutil.which(tool):
            return f"needs `{tool}` (util-linux)"
    out = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "sh", "-c",
                          "mount -t tmpfs probe /mnt"], capture_output=True, text=True, timeout=30)
    if out.returncode:
        return f"cannot create PID and mount namespaces (needs root): {out.stderr.strip()[:200]}"
    return None


def _base_env() -> dict:
    """For every node and client call: this cluster only (no RAY_ADDRESS or token from
    outside), the venv's tools on PATH, no S3 settings but the ones a test gives."""
    drop = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN", "AWS_PROFILE",
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


class RayNode:
    """`ray start --block ARGS` in new PID and mount namespaces. `private_dirs` are covered
    by an empty tmpfs that only this node's processes see."""

    def __init__(self, name: str, args: list[str], env: dict, temp_dir: Path, private_dirs=()):
        self.name, self.temp_dir = name, temp_dir
        self.log_path = temp_dir / f"{name}.log"
        mounts = "".join(f"mount -t tmpfs {name}-private {shlex.quote(str(d))} && " for d in private_dirs)
        cmd = ["unshare", "--pid", "--fork", "--mount-proc", "--propagation", "private", "--kill-child",
               "sh", "-c", mounts + 'exec "$@"', "sh", RAY, "start", "--block", *args]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self._init: int | None = None

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def init_pid(self) -> int | None:
        """This machine's pid of the namespace's first process (the one unshare forked)."""
        import psutil

        if self._init is None:
            deadline = time.time() + 10
            while self._init is None and self.alive() and time.time() < deadline:
                try:
                    children = psutil.Process(self.proc.pid).children()
                except psutil.NoSuchProcess:
                    break
                if children:
                    self._init = children[0].pid
                else:
                    time.sleep(0.05)
        return self._init

    def run_inside(self, *cmd: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run a command in this node's namespaces (its view of the files, its processes)."""
        pid = self.init_pid()
        assert pid, f"node {self.name} is not running:\n{self.log_tail()}"
        return subprocess.run(["nsenter", "-t", str(pid), "--pid", "--mount", "--", *cmd], cwd=REPO,
                              capture_output=True, text=True, timeout=timeout, env=env or _base_env())

    def stop(self) -> None:
        """`ray stop` inside the node's namespaces, then SIGKILL to the namespace's first
        process, which takes anything still in the namespace with it."""
        pid = self.init_pid() if self.alive() else None
        if pid:
            env = {**_base_env(), "RAY_TMPDIR": str(self.temp_dir)}  # it resets *this* cluster's address file
            try:
                self.run_inside(RAY, "stop", "--grace-period", "10", timeout=60, env=env)
            except (subprocess.TimeoutExpired, AssertionError):
                pass
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # unshare --kill-child: its child, the namespace, goes with it
            self.proc.wait()


class Cluster:
    """Ray nodes on loopback with token authentication, every port chosen free and a
    private temp dir (short: Ray's socket paths must stay under 108 bytes), so this runs
    beside other Ray instances on the same machine.

    The token is made the documented way, `ray get-auth-token --generate`, with HOME at a
    private directory (never the user's ~/.ray/auth_token): the head reads it through
    RAY_AUTH_TOKEN_PATH, other nodes get its value in RAY_AUTH_TOKEN, and the client
    reads it from its default place, ~/.ray/auth_token; all of them set RAY_AUTH_MODE=token."""

    def __init__(self, node_env: dict | None = None):
        self.temp_dir = Path(tempfile.mkdtemp(prefix="vf-ray-"))
        self.home = self.temp_dir / "home"
        self.home.mkdir()
        self.node_env = node_env or {}
        self.nodes: list[RayNode] = []
        env = {**_base_env(), "HOME": str(self.home)}
        subprocess.run([RAY, "get-auth-token", "--generate"], env=env, capture_output=True, check=True, timeout=120)
        self.token_file = self.home / ".ray" / "auth_token"
        self.token = self.token_file.read_text().strip()
        assert self.token

    def client_env(self) -> dict:
        return {**_base_env(), "HOME": str(self.home), "RAY_AUTH_MODE": "token"}

    def start_head(self, num_cpus: int) -> None:
        self.gcs_port, dash, client, agent = _free_ports(4)
        self.gcs = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{dash}"
        env = {**_base_env(), **self.node_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_file)}
        head = RayNode("head", [
            "--head", "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}", f"--num-cpus={num_cpus}",
            "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
            f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}", "--min-worker-port=0",
            "--max-worker-port=0", "--object-store-memory=300000000", f"--temp-dir={self.temp_dir / 'h'}",
            "--disable-usage-stats"], env, self.temp_dir)
        self.nodes.append(head)
        deadline = time.time() + 180
        while True:
            assert head.alive(), f"ray start --head exited {head.proc.returncode}:\n{head.log_tail()}"
            if _ray("job", "list", "--address", self.dashboard, env=self.client_env(), timeout=60,
                    check=False).returncode == 0:
                return
            assert time.time() < deadline, f"the job server never came up:\n{head.log_tail()}"
            time.sleep(2)

    def add_node(self, name: str, num_cpus: int, resources: dict, private_dirs=()) -> RayNode:
        (agent,) = _free_ports(1)
        env = {**_base_env(), **self.node_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}
        node = RayNode(name, [
            f"--address={self.gcs}", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", "--num-gpus=0",
            f"--resources={json.dumps(resources)}", f"--dashboard-agent-listen-port={agent}",
            "--min-worker-port=0", "--max-worker-port=0", "--object-store-memory=300000000",
            f"--temp-dir={self.temp_dir / name}", "--disable-usage-stats"], env, self.temp_dir, private_dirs)
        self.nodes.append(node)
        return node

    def state(self, kind: str, *filters: str) -> list[dict]:
        """`ray list <kind>` (the state API, through the job server), as dicts."""
        args = ["list", kind, "--address", self.gcs, "--format", "json", "--limit", "10000", "--detail"]
        for f in filters:
            args += ["--filter", f]
        return json.loads(_ray(*args, env=self.client_env(), timeout=120).stdout)

    def wait_for_nodes(self, n: int, timeout: float = 180) -> list[dict]:
        deadline = time.time() + timeout
        while True:
            for node in self.nodes:
                assert node.alive(), f"node {node.name} exited {node.proc.returncode}:\n{node.log_tail()}"
            try:
                alive = self.state("nodes", "state=ALIVE")
            except AssertionError:
                alive = []
            if len(alive) >= n:
                return alive
            assert time.time() < deadline, f"only {len(alive)} of {n} nodes joined"
            time.sleep(2)

    def stop(self) -> None:
        """`ray stop` on every node (the workers first), whatever happened."""
        for node in reversed(self.nodes):
            node.stop()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _ray(*args: str, env: dict, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([RAY, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    if check and out.returncode != 0:
        raise AssertionError(f"ray {' '.join(args)} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


@pytest.fixture
def ray_head(toy_model):
    """A one-node cluster: a Ray head with its job server."""
    reason = _namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    cluster = Cluster()
    try:
        cluster.start_head(num_cpus=2)
        yield cluster
    finally:
        cluster.stop()


def _runtime_env(working_dir: Path) -> str:
    """cluster/runtime_env.yaml as shipped, less its pip step (it installs the `gpu`
    extra, vLLM for CUDA, which cannot install here; this venv has the rest)."""
    env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    env.pop("pip", None)
    env["working_dir"] = str(working_dir)
    return json.dumps(env)


def _checkout_copy(dest: Path) -> Path:
    """The checkout as a job uploads it (runtime_env.yaml's excludes), copied once: every
    job of a test runs the same code, however the tree changes meanwhile. The working dir
    comes first on a job's PYTHONPATH, before the editable install."""
    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(
        ".venv", "runs", ".git", "__pycache__", ".pytest_cache", "*.egg-info"))
    return dest


class Jobs:
    """The `ray job` client, with the token the documented way (RAY_AUTH_MODE=token and
    ~/.ray/auth_token)."""

    def __init__(self, cluster: Cluster):
        self.address, self.env, self.n = cluster.dashboard, cluster.client_env(), 0
        self.working_dir = _checkout_copy(cluster.temp_dir / "checkout")

    def _ray(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        return _ray(*args, env=self.env, timeout=timeout, check=check)

    def submit(self, *entrypoint: str) -> str:
        self.n += 1
        job_id = f"verifine-test-{os.getpid()}-{self.n}"
        self._ray("job", "submit", "--address", self.address, "--submission-id", job_id, "--runtime-env-json",
                  _runtime_env(self.working_dir), "--no-wait", "--", *entrypoint, timeout=300)
        return job_id

    def wait(self, job_id: str, timeout: float = 900) -> str:
        """Follow the job's logs to its end; return its final status."""
        self._ray("job", "logs", job_id, "--address", self.address, "--follow", timeout=timeout, check=False)
        for _ in range(30):
            status = self.status(job_id)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status
            time.sleep(2)
        return status

    def status(self, job_id: str) -> str:
        out = self._ray("job", "status", job_id, "--address", self.address, timeout=120).stdout
        for pattern, status in ((r"Job '[^']+' succeeded", "SUCCEEDED"), (r"Job '[^']+' failed", "FAILED"),
                                (r"Job '[^']+' was stopped", "STOPPED")):
            if re.search(pattern, out):
                return status
        m = re.search(r"Status for job '[^']+': (?:JobStatus\.)?(\w+)", out)
        assert m, out
        return m.group(1)

    def logs(self, job_id: str) -> str:
        return self._ray("job", "logs", job_id, "--address", self.address, timeout=120).stdout

    def stop(self, job_id: str) -> None:
        self._ray("job", "stop", job_id, "--address", self.address, timeout=120)

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

    # 0. Token authentication is on: a client without the token is turned away.
    anonymous = {**_base_env(), "HOME": str(tmp_path), "RAY_AUTH_MODE": "disabled"}
    out = _ray("job", "list", "--address", ray_head.dashboard, env=anonymous, check=False)
    assert out.returncode != 0 and "Authentication required" in out.stdout + out.stderr, out.stdout + out.stderr

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
    assert not is_complete(read_manifest(store, "sample")), "a stopped stage must not look complete"
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


# ---- two nodes, a run dir on S3 -----------------------------------------------------------

S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
# Execution-only settings keep the run small: checkpoints every step (so a stop lands
# after one), a small KV cache, placement on the worker node.
SMALL_S3 = ["data.toy_count=16", "sample.block_size=8", "sample.gpu_memory_utilization=0.05",
            "train.objectives=[rft]", "train.batch_size=4", "train.epochs=1.0", "train.checkpoint_every=1",
            "eval.limit=8", "eval.n=2", "ray.worker_resource=worker_node",
            "train.num_workers=2", "train.cpus_per_worker=1"]  # two ranks: both must land on the worker node
WORKER_RESOURCES = {"worker_node": 1}


def _node_model_dirs() -> list[Path]:
    """The local directories where a stage puts models: the model cache and the toy
    model's build directory (both under VERIFINE_CACHE unless set apart)."""
    from actors.model_cache import default_cache_root

    base = Path(os.environ.get("VERIFINE_CACHE", Path.home() / ".cache" / "verifine"))
    dirs = [base]
    cache = default_cache_root()
    if base not in cache.parents and cache != base:
        dirs.append(cache)
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)  # a mount point must exist
    return dirs


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A fresh bucket on the loopback S3 server; this process reaches it through the
    standard AWS environment variables, as the nodes do."""
    import pyarrow.fs as pafs

    for k, v in {"AWS_ENDPOINT_URL": s3_server, **S3_KEYS}.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    bucket = f"vf-{uuid.uuid4().hex[:12]}"
    admin = pafs.S3FileSystem(endpoint_override=s3_server, access_key="testing", secret_key="testing",
                              region="us-east-1", scheme="http", allow_bucket_creation=True)
    admin.create_dir(bucket)
    return bucket


@pytest.fixture
def two_nodes(toy_model, s3_server):
    """A head (runs the job's driver) and a worker node offering WORKER_RESOURCES, with
    its own empty model directories; both get the S3 endpoint and keys from the standard
    AWS variables in their environment, as an instance profile would."""
    reason = _namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    cluster = Cluster(node_env={"AWS_ENDPOINT_URL": s3_server, **S3_KEYS})
    try:
        cluster.start_head(num_cpus=1)
        cluster.worker = cluster.add_node("w", num_cpus=2, resources=WORKER_RESOURCES,
                                          private_dirs=_node_model_dirs())
        cluster.wait_for_nodes(2)
        yield cluster
    finally:
        cluster.stop()


def _objects(bucket: str) -> dict[str, int]:
    """Every object in the bucket: key -> size."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(f"s3://{bucket}")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return {i.path[len(root) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}


def _cache_entries(node: RayNode, cache: Path) -> set[str]:
    out = node.run_inside("find", str(cache), "-mindepth", "1", "-maxdepth", "1", "-type", "d")
    return {Path(line).name for line in out.stdout.split()}


def _checkpoint_snapshot(store, train_work_dir: str) -> bytes | None:
    """Ray Train's record of the checkpoints it registered (the files alone may be in the
    bucket before that, and a stop then rightly starts over)."""
    try:
        return store.read_bytes(f"{train_work_dir}/ray/ray-train/checkpoint_manager_snapshot.json")
    except (OSError, FileNotFoundError):
        return None


def _registered(snapshot: bytes | None) -> bool:
    try:
        return snapshot is not None and json.loads(snapshot).get("latest_checkpoint_result") is not None
    except ValueError:
        return False


@pytest.mark.slow
def test_two_node_cluster_runs_a_pipeline_on_s3(two_nodes, s3_bucket, toy_model, tmp_path):
    from actors.model_cache import cache_key, default_cache_root, materialize_model
    from actors.model_source import store_model_source
    from actors.store import RunStore
    from pipeline.runner import work_dir_for

    cluster, worker = two_nodes, two_nodes.worker
    jobs = Jobs(cluster)
    run_uri = f"s3://{s3_bucket}/runs/toy"
    store = RunStore(run_uri, create=False)
    cache = default_cache_root()
    run = ("verifine", "run", f"run.dir={run_uri}", *SMALL_S3)
    t0 = time.time()

    # 0. The cluster as built: tokens required; the worker node cannot see the head's models.
    anonymous = {**_base_env(), "HOME": str(tmp_path), "RAY_AUTH_MODE": "disabled"}
    out = _ray("job", "list", "--address", cluster.dashboard, env=anonymous, check=False)
    assert out.returncode != 0 and "Authentication required" in out.stdout + out.stderr, out.stdout + out.stderr
    assert Path(toy_model, "config.json").is_file()
    assert worker.run_inside("test", "-e", str(Path(toy_model, "config.json"))).returncode == 1, \
        "the worker node sees the head's toy model: its model directories are not private"
    nodes = {n["node_id"]: n for n in cluster.state("nodes", "state=ALIVE")}
    (head_id,) = [i for i, n in nodes.items() if n["is_head_node"]]
    (worker_id,) = [i for i, n in nodes.items() if "worker_node" in (n.get("resources_total") or {})]

    # 1. The whole reduced pipeline as a job, its run dir in the bucket.
    logs = jobs.run(*run, "eval.benchmarks=[toy_id]")
    print(f"\n[two-node test] first job: {time.time() - t0:.0f}s;",
          "; ".join(f"{a} {b}" for a, b in re.findall(r"\[([\w/]+)\] done in ([\d.]+s)", logs)))
    assert "connected to Ray cluster" in logs
    first = stage_lines(logs)
    stages = {"prompts", "sample", "verify", "train/rft", "eval/base/toy_id", "eval/rft/toy_id", "report"}
    assert set(first) == stages and set(first.values()) == {"running"}, first
    objects = _objects(s3_bucket)
    for stage in stages:
        assert is_complete(read_manifest(store, stage)), stage
        assert f"runs/toy/{stage}/manifest.json" in objects, stage
        assert all(f"runs/toy/{f}" in objects for f in read_manifest(store, stage)["files"]), stage
    for stage in ("prompts", "sample", "verify", "eval/base/toy_id", "eval/rft/toy_id"):
        assert any(re.match(rf"runs/toy/{stage}/parts-\w+/.*\.parquet$", k) for k in objects), stage
    assert any(re.match(r"runs/toy/models/toy/[^/]+/model\.safetensors$", k) for k in objects), "base model"
    assert any(re.match(r"runs/toy/train/rft/parts-\w+/model/model\.safetensors$", k) for k in objects)
    assert any(re.match(r"runs/toy/train/rft/parts-\w+/ray/ray-train/checkpoint_", k) for k in objects), \
        "Ray Train's checkpoints belong in the run dir"
    assert not (REPO / "s3:").exists(), "an s3:// run dir was taken for a local path"
    # The driver ran on the head; whatever loaded a model ran on the worker node.
    (job,) = [j for j in cluster.state("jobs") if j.get("submission_id") == f"verifine-test-{os.getpid()}-1"]
    assert job["driver_node_id"] == head_id, job
    actors = cluster.state("actors")
    engines = [a for a in actors if "VLLMSampler" in f"{a.get('class_name')} {a.get('repr_name')}"]
    trainers = [a for a in actors if a.get("class_name") == "RayTrainWorker"]
    assert len(engines) >= 3 and len(trainers) == 2, (len(engines), len(trainers))  # sample, 2 evals; 2 ranks
    assert {a["node_id"] for a in engines + trainers} == {worker_id}, "model-loading actors ran on the head"
    scorers = cluster.state("tasks", "name=_score")
    assert scorers and {t["node_id"] for t in scorers} == {worker_id}
    # ... and copied the models it needed from the bucket into its own cache.
    base_key = cache_key({f: store.file_record(f) for f in store.list_files("models/toy")})
    rft_key = cache_key(store_model_source(run_uri, read_manifest(store, "train/rft"))["files"])
    assert {base_key, rft_key} <= _cache_entries(worker, cache)
    assert not (cache / rft_key).exists(), "the trained model was copied to the head"

    # 2. The same job again: nothing to do.
    t1 = time.time()
    logs = jobs.run(*run, "eval.benchmarks=[toy_id]")
    print(f"[two-node test] cached job: {time.time() - t1:.0f}s")
    assert stage_lines(logs) == {s: "cached" for s in stages}
    assert f"finished: 0 stage(s) ran, {len(stages)} cached" in logs

    # 3. Retrain, stopped with `ray job stop` once Ray Train registered a checkpoint in the
    #    bucket. A test hook pauses after each step so the stop lands mid-training.
    t2 = time.time()
    # The finished run's record, in its work dir (--force keeps the identity, and so the
    # work dir; it deletes the files first): a checkpoint of the new run must differ.
    done_before = _checkpoint_snapshot(store, read_manifest(store, "train/rft")["work_dir"])
    job_id = jobs.submit("env", "VERIFINE_TEST_STEP_DELAY_S=8", *run[:2], "--force", "train/rft", *run[2:],
                         "eval.benchmarks=[toy_id]")
    deadline, next_check = time.time() + 600, time.time() + 15
    while True:
        manifest = read_manifest(store, "train/rft") or {}
        if manifest.get("status") == "invalid":  # the stage (re)started: its identity names its work dir
            work_dir = work_dir_for("train/rft", manifest["identity"])
            snapshot = _checkpoint_snapshot(store, work_dir)
            if snapshot != done_before and _registered(snapshot):
                break
        assert time.time() < deadline, "training never registered a checkpoint"
        if time.time() > next_check:  # a job that died early: fail now, with its logs
            status, next_check = jobs.status(job_id), time.time() + 15
            assert status in ("PENDING", "RUNNING"), f"{status}:\n{jobs.logs(job_id)[-4000:]}"
        time.sleep(0.5)
    jobs.stop(job_id)
    assert jobs.wait(job_id, timeout=120) == "STOPPED"
    time.sleep(2)
    assert not is_complete(read_manifest(store, "train/rft")), "a stopped stage must not look complete"
    assert not store.exists(f"{work_dir}/model/model.safetensors"), "stopped too late to test resuming"
    print(f"[two-node test] retrain stopped after {time.time() - t2:.0f}s")

    # 4. The worker node loses its model cache; the run goes on, the trained model with a
    #    new benchmark: training resumes from the bucket, the models are copied again.
    worker.run_inside("find", str(cache), "-mindepth", "1", "-delete")
    assert not _cache_entries(worker, cache)
    t3 = time.time()
    logs = jobs.run(*run, "eval.benchmarks=[toy_id,toy_harder]", "eval.models=[rft]")
    print(f"[two-node test] resumed job: {time.time() - t3:.0f}s;",
          "; ".join(f"{a} {b}" for a, b in re.findall(r"\[([\w/]+)\] done in ([\d.]+s)", logs)))
    states = stage_lines(logs)
    assert {s: states[s] for s in ("prompts", "sample", "verify")} == dict.fromkeys(("prompts", "sample", "verify"),
                                                                                  "cached")
    assert states["train/rft"] == states["eval/rft/toy_harder"] == "running", states
    manifest = read_manifest(store, "train/rft")
    assert is_complete(manifest) and manifest["work_dir"] == work_dir
    metrics = [json.loads(line) for line in store.read_bytes(f"{work_dir}/metrics.jsonl").decode().splitlines() if line]
    assert [m["step"] for m in metrics] == list(range(1, len(metrics) + 1))
    assert metrics[-1]["resumed_from_step"] > 0, "training started over instead of resuming from the bucket"
    # The final model is complete: every file its manifest records, with its checksum.
    rft_model = store_model_source(run_uri, manifest)
    local = Path(materialize_model(run_uri, rft_model["files"], cache_root=str(tmp_path / "check")))
    from safetensors.numpy import load_file

    trained, base = load_file(local / "model.safetensors"), load_file(Path(toy_model) / "model.safetensors")
    assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in base.items()}
    for stage in ("eval/rft/toy_harder", "eval/rft/toy_id", "eval/base/toy_id"):
        assert is_complete(read_manifest(store, stage)), stage
    assert is_complete(read_manifest(store, "report"))
    rft_key = cache_key(rft_model["files"])
    assert {base_key, rft_key} <= _cache_entries(worker, cache), "the models were not copied to the node again"
    assert not (cache / rft_key).exists(), "the trained model was copied to the head"
    print(f"[two-node test] total {time.time() - t0:.0f}s")
