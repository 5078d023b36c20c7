"""Connecting to Ray: the cluster of RAY_ADDRESS / `ray job submit` when there is one,
a local Ray otherwise. Never starts a second Ray next to an existing cluster."""
from __future__ import annotations

import json
import os

from actors.store import is_remote


DRIVER_ENV_VARS = {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore::DeprecationWarning"}


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


def connect(address: str | None = None, num_cpus: int | None = None, log=print) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Workers import the project from the driver's working directory when it is not installed.
    env = {"env_vars": {k: v for k, v in DRIVER_ENV_VARS.items() if k not in _job_env_vars()}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        log(f"connected to Ray cluster at {address}")
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=env)
        log(f"started a local Ray ({ray.cluster_resources().get('CPU', 0):.0f} CPUs)")
    ray.data.DataContext.get_current().enable_progress_bars = False


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
