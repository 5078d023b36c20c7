"""Shared fixtures: the toy base model (built once, cached) and a real local Ray."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_BENCHMARKS = REPO.parent / "shared" / "data" / "benchmarks"


@pytest.fixture(scope="session")
def toy_model() -> str:
    from pipeline.toy_model import ensure_toy_model

    return str(ensure_toy_model(seed=0))


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from pipeline.ray_session import connect

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # As `verifine run` starts it (2 logical CPUs): a local Ray of this driver's own, so
    # runs here admit a training only on free CPUs and keep an idle engine, as users' do.
    connect(num_cpus=2, log=lambda *_: None)
    yield ray
    ray.shutdown()


def all_cpus_free_within(seconds: float) -> bool:
    """Waits until no CPU of the session's Ray is held (actors end asynchronously after
    ray.kill); False if some still are after `seconds`."""
    import time

    import ray

    deadline = time.time() + seconds
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        if time.time() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A local S3-compatible server (moto) on loopback; yields its endpoint URL.

    Point pyarrow at it with AWS_ENDPOINT_URL=<url> plus AWS_ACCESS_KEY_ID /
    AWS_SECRET_ACCESS_KEY (any value, but set: without keys uploads are sent unsigned
    and stored mangled) and AWS_DEFAULT_REGION. Buckets are created with
    S3FileSystem(endpoint_override=url, ..., allow_bucket_creation=True). Stopped at the
    end of the session, whatever happens.
    """
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    pytest.importorskip("moto.server", reason="needs moto[server] (pip install 'moto[server]')")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("s3_server") / "moto.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start:\n{log_path.read_text()[-2000:]}")
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
