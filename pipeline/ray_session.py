"""Connecting to Ray: the cluster of RAY_ADDRESS / `ray job submit` when there is one,
a local Ray otherwise. Never starts a second Ray next to an existing cluster.

Placement: with `ray.worker_resource` set (a custom resource name, e.g. "gpu_worker"),
every worker that loads a model asks for WORKER_RESOURCE_AMOUNT of it: engine actors,
reference scorers, train workers and the report's scoring tasks (`worker_remote_args`,
`train_worker_resources`). Only nodes started with `ray start --resources='{"gpu_worker": 1}'`
take them, e.g. not a head node that runs the job's driver. An execution setting: it is
in no stage's identity (the whole `ray` section is NO_OUTPUT_EFFECT)."""
from __future__ import annotations

import json
import os
import threading
import time

from actors.store import is_remote


DRIVER_ENV_VARS = {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
# A local Ray that verifine starts has no dashboard and no preemptible nodes, so Ray
# Train's dashboard metrics and its node-preemption watcher (an actor per training run)
# serve nothing there. Its controller polls its few local workers every 0.5 s instead of
# 2 s: each step of a training run's life (workers up, a checkpoint taken, the loop
# finished) waits for the next poll, and a toy training stage alone took 3.3 s less
# (median difference of 7 alternating pairs, README). On a cluster all three stay as the
# cluster sets them. A value already in the environment wins.
LOCAL_RAY_ENV_VARS = {"RAY_TRAIN_METRICS_ENABLED": "0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                      "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
RESERVED_RESOURCES = ("CPU", "GPU", "TPU", "memory", "object_store_memory")  # each stage asks for its own
WORKER_RESOURCE_AMOUNT = 0.001  # a label, not a quota: one unit on a node admits 1000 such workers
_placement: dict[str, float] = {}  # {ray.worker_resource: WORKER_RESOURCE_AMOUNT} of this driver, set by connect()
_local: list[bool] = []  # [True] once connect() started a local Ray for this driver
_admission = threading.Lock()  # run_when_free: one caller admitted at a time


def _job_env_vars() -> dict:
    """env_vars of the runtime env this driver was submitted with (`ray job submit
    --runtime-env ...`), {} outside a job. ray.init refuses a runtime_env that sets an
    env var the job's already sets (cluster/runtime_env.yaml sets TOKENIZERS_PARALLELISM),
    so those keys are left to the job's value."""
    # Set by Ray's job supervisor for the entrypoint (ray._private.runtime_env.constants).
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    return (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}


def connect(address: str | None = None, num_cpus: int | None = None, log=print,
            worker_resource: str | None = None) -> None:
    import ray

    if worker_resource in RESERVED_RESOURCES:
        raise SystemExit(f"ray.worker_resource={worker_resource}: each stage asks for its own {worker_resource} "
                         f"(train.use_gpu, sample.gpus_per_engine); name a custom resource")
    _placement.clear()
    if worker_resource:
        _placement[worker_resource] = WORKER_RESOURCE_AMOUNT
    if ray.is_initialized():  # connected before (a test session, a second run in one process)
        return
    _local.clear()
    address = address or os.environ.get("RAY_ADDRESS")
    # Workers import the project from the driver's working directory when it is not installed.
    env = {"env_vars": {k: v for k, v in DRIVER_ENV_VARS.items() if k not in _job_env_vars()}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        log(f"connected to Ray cluster at {address}")
    else:
        for k, v in LOCAL_RAY_ENV_VARS.items():  # the driver reads some, the controller actor others
            env["env_vars"][k] = os.environ.setdefault(k, v)
        ray.init(num_cpus=num_cpus or local_logical_cpus(), include_dashboard=False, runtime_env=env)
        _local.append(True)
        log(f"started a local Ray ({ray.cluster_resources().get('CPU', 0):.0f} logical CPUs)")
    if worker_resource:
        offered = ray.cluster_resources().get(worker_resource, 0)
        log(f"workers that load a model run on nodes offering {worker_resource!r}"
            + (f" ({offered:g} in the cluster now)" if offered else
               f"; no node offers it yet: they wait until one does (ray start --resources=...)"))


def local_logical_cpus() -> int:
    """Logical CPUs of a local Ray that verifine starts (ray.num_cpus unset): the cores it
    may use, plus one. Every stage asks for one CPU per process, but much of a process's
    time is single-threaded or waiting (imports, engine start-up, rank 0's export, Ray
    Train's polling), so with one slot per core an evaluation waits for a training run
    that holds every core. The spare slot lets them overlap (toy default on 2 cores,
    cached toy model: 233 -> 215 s, process tree 79% -> 90% busy; README)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores + 1


def is_local() -> bool:
    """Whether this driver started the Ray it is connected to (nothing else uses it)."""
    return bool(_local)


def run_when_free(start, need: dict[str, float], poll_s: float = 0.5, reclaim=lambda shortfall: False,
                  asked: str = "this stage"):
    """`start()`'s result; on a local Ray this driver started, `start` is called only once
    `need` (e.g. {"CPU": 2}) is free all at once. Ray Train starts a controller, a
    placement-group cleaner, a sync actor and a dataset manager when fit() is called, and
    they poll every 0.5-1 s for as long as the run waits for its placement group: in the
    toy default on 2 cores training stages queued behind others for minutes (README).
    One caller at a time is admitted, and the next waits until the admitted one's
    placement group is created, so two never pass on the same free CPUs. Nothing grows a local Ray, so
    waiting here costs nothing; on a cluster a pending fit is the demand an autoscaler
    acts on, so there it is not held back. A need larger than the whole local Ray would
    wait forever: ConfigError, naming `asked` (the config keys that set `need`).
    While `need` is not free, `reclaim(shortfall)` may end something held idle that
    covers the shortfall (True if it did)."""
    import ray
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.config import ConfigError

    if not _local:
        return start()
    have = ray.cluster_resources()
    if short := {k: v for k, v in need.items() if have.get(k, 0) < v}:
        raise ConfigError(f"{asked} needs {', '.join(f'{v:g} {k}' for k, v in short.items())}, but this local Ray "
                          f"has {', '.join(f'{have.get(k, 0):g} {k}' for k in short)}: lower "
                          + ("it" if "GPU" in short else "them, or raise ray.num_cpus"))
    with ThreadPoolExecutor(1) as pool:
        with _admission:
            while shortfall := _shortfall(need):
                if not reclaim(shortfall):
                    time.sleep(poll_s)
            before = set(ray.util.placement_group_table())
            running = pool.submit(start)
            deadline = time.time() + 60  # until the started one's placement group holds its resources
            while not running.done() and time.time() < deadline and not any(
                    pg not in before and info.get("state") == "CREATED"
                    for pg, info in ray.util.placement_group_table().items()):
                time.sleep(poll_s / 5)
        return running.result()


def _shortfall(need: dict[str, float]) -> dict[str, float]:
    import ray

    available = ray.available_resources()
    return {k: v - available.get(k, 0) for k, v in need.items() if available.get(k, 0) < v}


def worker_remote_args() -> dict:
    """Extra Ray options for a task or actor that loads a model: {"resources": {name:
    amount}} when ray.worker_resource is set, else {}."""
    return {"resources": dict(_placement)} if _placement else {}


def train_worker_resources(use_gpu: bool, cpus_per_worker: int = 1) -> dict:
    """ScalingConfig.resources_per_worker: one GPU, or `cpus_per_worker` CPUs (Ray then
    sets the worker's OMP_NUM_THREADS, so torch's threads, to that count), plus
    ray.worker_resource when it is set."""
    return {**({"GPU": 1} if use_gpu else {"CPU": cpus_per_worker}), **_placement}


def slot_resources(resources: dict) -> dict:
    """The CPUs and GPUs of a worker's `resources` (train_worker_resources), without the
    ray.worker_resource label: it places a worker but holds no slot."""
    return {k: v for k, v in resources.items() if k in ("CPU", "GPU")}


def check_shared_storage(run_dir: str) -> None:
    """On a multi-node cluster every node writes into the run directory: a local path
    would scatter the run over the nodes' disks."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    if len(alive) > 1 and not is_remote(run_dir) and not os.environ.get("VERIFINE_SHARED_MOUNT"):
        raise SystemExit(
            f"run.dir={run_dir!r} is a local path, but this Ray cluster has {len(alive)} nodes: each node "
            f"would write its part of the run to its own disk. Use object storage (run.dir=s3://bucket/runs/x "
            f"or gs://...), or a filesystem mounted at the same path on every node and set "
            f"VERIFINE_SHARED_MOUNT=1 to say so.")
