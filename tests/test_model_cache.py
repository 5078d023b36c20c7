"""The node-local model cache, against a real S3 API (a local moto server) and real disk."""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from actors import model_cache as mc
from actors.store import RunStore

MODEL_DIR = "train/dft/parts-ab12/model"


def s3_run_uri(monkeypatch, endpoint: str) -> str:
    """Point pyarrow's S3 at the local server through the environment (what RunStore's
    FileSystem.from_uri reads) and return the URI of a run in a fresh bucket."""
    for k in ("AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    admin = pafs.S3FileSystem(endpoint_override=endpoint, access_key="testing", secret_key="testing",
                              region="us-east-1", scheme="http", allow_bucket_creation=True)
    admin.create_dir(bucket)
    return f"s3://{bucket}/run"


@pytest.fixture
def s3_uri(s3_server, monkeypatch):
    return s3_run_uri(monkeypatch, s3_server)


def write_model(store: RunStore, contents: dict[str, bytes], model_dir: str = MODEL_DIR) -> dict:
    """Write files into the store; return their manifest records, as a stage would."""
    for name, data in contents.items():
        store.write_bytes(f"{model_dir}/{name}", data)
    return {f"{model_dir}/{name}": store.file_record(f"{model_dir}/{name}") for name in contents}


def model_bytes(tag: str, size: int = 4096) -> dict[str, bytes]:
    weights = hashlib.sha256(tag.encode()).digest() * (size // 32 + 1)
    return {"config.json": f'{{"tag": "{tag}"}}'.encode(), "model.safetensors": weights[:size]}


def read_dir(path: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in Path(path).iterdir()}


def entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_materialize_from_s3(s3_uri, tmp_path):
    store = RunStore(s3_uri)
    files = write_model(store, model_bytes("v1"))
    root = tmp_path / "cache"
    path = mc.materialize_model(s3_uri, files, cache_root=str(root))
    assert Path(path).parent == root and read_dir(path) == model_bytes("v1")
    assert entries(root) == [mc.cache_key(files)]  # no temporary directory left behind
    inode = os.stat(Path(path) / "model.safetensors").st_ino
    assert mc.materialize_model(s3_uri, files, cache_root=str(root)) == path  # a hit: no new copy
    assert os.stat(Path(path) / "model.safetensors").st_ino == inode


def test_a_leftover_temporary_directory_is_never_used_and_later_removed(s3_uri, tmp_path):
    store = RunStore(s3_uri)
    files = write_model(store, model_bytes("v1"))
    root = tmp_path / "cache"
    half = root / f"{mc.TMP_PREFIX}{mc.cache_key(files)}-dead"
    half.mkdir(parents=True)
    (half / "config.json").write_bytes(model_bytes("v1")["config.json"])  # weights never arrived
    path = mc.materialize_model(s3_uri, files, cache_root=str(root))
    assert Path(path).name == mc.cache_key(files) and read_dir(path) == model_bytes("v1")
    assert half.exists()  # recent: perhaps another process still filling it
    old = time.time() - 2 * mc.STALE_TMP_S
    for p in (half / "config.json", half):
        os.utime(p, (old, old))
    mc.materialize_model(s3_uri, files, cache_root=str(root))
    assert entries(root) == [mc.cache_key(files)]


def test_a_copy_failing_midway_leaves_no_entry(s3_uri, tmp_path):
    store = RunStore(s3_uri)
    files = write_model(store, model_bytes("v1"))
    root = tmp_path / "cache"
    bad = dict(files)
    rel = f"{MODEL_DIR}/model.safetensors"
    bad[rel] = {**files[rel], "sha256": "0" * 64}  # right size, wrong checksum
    with pytest.raises(mc.ModelFileMismatch, match="model.safetensors"):
        mc.materialize_model(s3_uri, bad, cache_root=str(root))
    assert entries(root) == []  # neither an entry nor the temporary directory
    short = {**files, rel: {**files[rel], "bytes": files[rel]["bytes"] + 1}}
    with pytest.raises(mc.ModelFileMismatch, match="model.safetensors"):
        mc.materialize_model(s3_uri, short, cache_root=str(root))
    assert entries(root) == []
    assert read_dir(mc.materialize_model(s3_uri, files, cache_root=str(root))) == model_bytes("v1")


def test_a_killed_copy_is_never_used(s3_uri, tmp_path):
    """SIGKILL a process after it downloaded one of the two files: no entry appears, and
    the next call copies the model anew."""
    store = RunStore(s3_uri)
    files = write_model(store, model_bytes("v1"))
    root = tmp_path / "cache"
    code = textwrap.dedent(f"""
        import os, signal
        from actors import model_cache as mc
        from actors.store import RunStore
        real = RunStore.download_file
        def download_then_die(self, rel, local_path):
            rec = real(self, rel, local_path)
            os.kill(os.getpid(), signal.SIGKILL)
        RunStore.download_file = download_then_die
        mc.materialize_model({s3_uri!r}, {files!r}, cache_root={str(root)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == -9
    left = entries(root)
    assert len(left) == 1 and left[0].startswith(mc.TMP_PREFIX)
    path = mc.materialize_model(s3_uri, files, cache_root=str(root))
    assert Path(path).name == mc.cache_key(files) and read_dir(path) == model_bytes("v1")


def test_a_retrained_model_at_the_same_uri_gets_a_new_entry(s3_uri, tmp_path):
    store = RunStore(s3_uri)
    root = tmp_path / "cache"
    v1 = write_model(store, model_bytes("v1"))
    p1 = mc.materialize_model(s3_uri, v1, cache_root=str(root))
    v2 = write_model(store, model_bytes("v2"))  # same paths, new bytes
    assert v2.keys() == v1.keys() and v2 != v1
    p2 = mc.materialize_model(s3_uri, v2, cache_root=str(root))
    assert p2 != p1 and read_dir(p2) == model_bytes("v2")
    assert read_dir(p1) == model_bytes("v1")  # the old entry is untouched, never overwritten
    assert sorted(entries(root)) == sorted([Path(p1).name, Path(p2).name])


def _race(uri, files, root, barrier, out):
    real_rename, outcome = os.rename, ["hit"]

    def rename(src, dst):
        try:
            real_rename(src, dst)
            outcome[0] = "won"
        except OSError:
            outcome[0] = "lost"
            raise

    mc.os.rename = rename  # this child process only
    barrier.wait()
    out.put((mc.materialize_model(uri, files, cache_root=root), outcome[0]))


def test_concurrent_materializations_end_with_one_entry(s3_uri, tmp_path):
    store = RunStore(s3_uri)
    contents = model_bytes("big", size=12 << 20)  # long enough for the copies to overlap
    files = write_model(store, contents)
    root = tmp_path / "cache"
    ctx = mp.get_context("spawn")  # pyarrow's S3 client must not be forked
    n = 3
    barrier, out = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(s3_uri, files, str(root), barrier, out)) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        results = [out.get(timeout=240) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs)
    paths, outcomes = zip(*results)
    assert outcomes.count("won") == 1  # the others lost the rename or found the entry
    assert len(set(paths)) == 1 and read_dir(paths[0]) == contents
    assert entries(root) == [mc.cache_key(files)]  # the losers' copies are gone


def test_losing_the_rename_race_uses_the_winners_copy(s3_uri, tmp_path, monkeypatch):
    """Deterministic race: while this call downloads, another fills the same entry."""
    store = RunStore(s3_uri)
    files = write_model(store, model_bytes("v1"))
    root = tmp_path / "cache"
    real, calls = RunStore.download_file, []

    def download_then_let_another_finish(self, rel, local_path):
        rec = real(self, rel, local_path)
        calls.append(rel)
        if len(calls) == len(files):  # our copy is complete but not yet renamed
            monkeypatch.setattr(RunStore, "download_file", real)
            winner = mc.materialize_model(s3_uri, files, cache_root=str(root))
            (Path(winner) / "marker").write_text("winner")
        return rec

    monkeypatch.setattr(RunStore, "download_file", download_then_let_another_finish)
    path = mc.materialize_model(s3_uri, files, cache_root=str(root))
    assert (Path(path) / "marker").read_text() == "winner"
    assert entries(root) == [mc.cache_key(files)]  # our own copy was discarded


def test_eviction_keeps_the_bound_and_the_most_recently_used(s3_uri, tmp_path, monkeypatch):
    store = RunStore(s3_uri)
    root = tmp_path / "cache"
    size = 1_000_000
    monkeypatch.setenv("VERIFINE_MODEL_CACHE_MAX_GB", str(2.5 * size / 1e9))  # room for two models
    models = {t: write_model(store, model_bytes(t, size), model_dir=f"m/{t}") for t in "abcd"}
    key = {t: mc.cache_key(f) for t, f in models.items()}

    def use(t):
        path = mc.materialize_model(s3_uri, models[t], cache_root=str(root))
        assert read_dir(path) == model_bytes(t, size)
        time.sleep(0.02)  # distinct mtimes even on coarse filesystem clocks

    def total():
        return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())

    use("a"); use("b")
    assert entries(root) == sorted([key["a"], key["b"]])
    use("c")  # over the bound: the least recently used (a) goes
    assert entries(root) == sorted([key["b"], key["c"]]) and total() <= 2.5 * size
    use("b")  # a hit refreshes b, so c is now the oldest
    use("d")
    assert entries(root) == sorted([key["b"], key["d"]]) and total() <= 2.5 * size

    monkeypatch.setenv("VERIFINE_MODEL_CACHE_MAX_GB", str(size / 2 / 1e9))  # smaller than one model
    use("a")  # the entry returned is kept even alone over the bound; all others go
    assert entries(root) == [key["a"]]


def test_cache_root_from_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("VERIFINE_MODEL_CACHE", raising=False)
    monkeypatch.setenv("VERIFINE_CACHE", str(tmp_path / "c"))
    assert mc.default_cache_root() == tmp_path / "c" / "models"
    monkeypatch.setenv("VERIFINE_MODEL_CACHE", str(tmp_path / "m"))
    assert mc.default_cache_root() == tmp_path / "m"
    monkeypatch.delenv("VERIFINE_MODEL_CACHE")
    monkeypatch.delenv("VERIFINE_CACHE")
    assert mc.default_cache_root() == Path.home() / ".cache" / "verifine" / "models"


def test_materialize_uses_the_default_cache_root(s3_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("VERIFINE_MODEL_CACHE", str(tmp_path / "m"))
    files = write_model(RunStore(s3_uri), model_bytes("v1"))
    path = mc.materialize_model(s3_uri, files)
    assert Path(path).parent == tmp_path / "m" and read_dir(path) == model_bytes("v1")


def test_a_local_store_is_used_in_place(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    files = write_model(store, model_bytes("v1"))
    path = mc.materialize_model(store.uri, files, cache_root=str(tmp_path / "cache"))
    assert path == str(tmp_path / "run" / MODEL_DIR) and read_dir(path) == model_bytes("v1")
    assert mc.materialize_model("file://" + store.uri, files) == path
    assert not (tmp_path / "cache").exists()
    rel = f"{MODEL_DIR}/config.json"
    (tmp_path / "run" / rel).write_bytes(b"{}")  # a different size than recorded
    with pytest.raises(mc.ModelFileMismatch, match="config.json"):
        mc.materialize_model(store.uri, files)
    (tmp_path / "run" / rel).unlink()
    with pytest.raises(mc.ModelFileMismatch, match="missing"):
        mc.materialize_model(store.uri, files)
