import hashlib
import os
import subprocess
import sys
import textwrap

import pyarrow.parquet as pq
import pytest

from pipeline import manifests
from actors import store as st
from actors.store import RunStore


def test_roundtrip_and_manifest_checksums(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    store.write_rows("s/parts-x/a.parquet", [{"x": 1}, {"x": 2}])
    m = manifests.write_complete(store, "s", "id1", 1, {"k": 1}, {}, {}, "s/parts-x", ["s/parts-x/a.parquet"],
                                 {}, 0.0)
    assert m["rows"] == 2 and manifests.read_manifest(store, "s")["identity"] == "id1"
    assert manifests.changed_files(store, m) == [] and manifests.missing_or_resized(store, m) == []
    (tmp_path / "run/s/parts-x/a.parquet").write_bytes(b"corrupt")
    assert manifests.changed_files(store, m) == ["s/parts-x/a.parquet"]
    assert manifests.missing_or_resized(store, m) == ["s/parts-x/a.parquet"]


def test_interrupted_write_leaves_no_complete_looking_file(tmp_path):
    """Kill a writer in the middle of a large write: the target never exists half-written."""
    run = tmp_path / "run"
    code = textwrap.dedent(f"""
        import os, signal, pyarrow as pa
        from actors import store as st
        s = st.RunStore({str(run)!r})
        real_fsync = os.fsync
        def die(fd):
            os.kill(os.getpid(), signal.SIGKILL)   # crash after the bytes, before the rename
        os.fsync = die
        s.write_rows("stage/out.parquet", [{{"x": i}} for i in range(100000)])
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=os.getcwd())
    assert proc.returncode != 0
    assert not (run / "stage/out.parquet").exists()
    leftovers = list((run / "stage").iterdir())
    assert leftovers and all(".tmp-" in p.name for p in leftovers)
    store = RunStore(str(run))
    assert manifests.read_manifest(store, "stage") is None


def test_existing_file_survives_a_failed_overwrite(tmp_path):
    store = RunStore(str(tmp_path))
    store.write_rows("a.parquet", [{"x": 1}])

    class Boom(Exception):
        pass

    import actors.store as st
    real = st.os.replace
    st.os.replace = lambda *a: (_ for _ in ()).throw(Boom())
    try:
        with pytest.raises(Boom):
            store.write_rows("a.parquet", [{"x": 2}])
    finally:
        st.os.replace = real
    assert pq.read_table(tmp_path / "a.parquet").to_pylist() == [{"x": 1}]


# -- streaming: checksums, uploads, downloads ------------------------------------------
def _big_bytes(n: int) -> bytes:
    block = hashlib.sha256(b"seed").digest() * 4096  # 128 KiB, not all one byte
    return (block * (n // len(block) + 1))[:n]


@pytest.fixture
def s3_store(s3_server, monkeypatch):
    from tests.test_model_cache import s3_run_uri

    return RunStore(s3_run_uri(monkeypatch, s3_server))


def test_file_record_streams_a_file_larger_than_the_chunk(tmp_path):
    import tracemalloc

    data = _big_bytes(2 * st.CHUNK + 12345)
    (tmp_path / "big.bin").write_bytes(data)
    store = RunStore(str(tmp_path))
    tracemalloc.start()
    try:
        rec = store.file_record("big.bin")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rec == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert peak < 1.5 * st.CHUNK  # never the whole file (2 chunks and more) at once


@pytest.mark.parametrize("where", ["local", "s3"])
def test_file_record_counts_parquet_rows_from_the_footer(where, tmp_path, request):
    store = RunStore(str(tmp_path / "run")) if where == "local" else request.getfixturevalue("s3_store")
    store.write_rows("s/a.parquet", [{"x": i, "t": "y" * 50} for i in range(5000)])
    rec = store.file_record("s/a.parquet")
    assert rec["rows"] == 5000
    data = store.read_bytes("s/a.parquet")
    assert rec["bytes"] == len(data) and rec["sha256"] == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_upload_download_roundtrip(where, tmp_path, request):
    store = RunStore(str(tmp_path / "run")) if where == "local" else request.getfixturevalue("s3_store")
    data = _big_bytes(st.CHUNK + 777)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    want = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert store.upload_file(src, "m/model/weights.bin") == want
    store.write_bytes("m/model/config.json", b"{}")
    assert store.file_record("m/model/weights.bin") == want
    assert store.file_sizes("m") == {"m/model/weights.bin": len(data), "m/model/config.json": 2}
    assert store.file_sizes("nothing/here") == {}
    if where == "local":  # no temporary file left next to the published one
        assert sorted(p.name for p in (tmp_path / "run/m/model").iterdir()) == ["config.json", "weights.bin"]
    dest = tmp_path / "back.bin"
    assert store.download_file("m/model/weights.bin", dest) == want
    assert dest.read_bytes() == data and [p.name for p in tmp_path.glob("back.bin*")] == ["back.bin"]
    src.write_bytes(b"new")  # overwriting replaces the whole file
    assert store.upload_file(src, "m/model/weights.bin")["bytes"] == 3
    assert store.read_bytes("m/model/weights.bin") == b"new"


def test_a_failed_upload_to_s3_leaves_no_object(s3_store, tmp_path, monkeypatch):
    src = tmp_path / "src.bin"
    src.write_bytes(_big_bytes(st.CHUNK + 1))
    real = st.copy_stream

    def copy_half_then_fail(source, dest, chunk=None):
        dest.write(source.read(st.CHUNK // 2))
        raise OSError("read error")

    monkeypatch.setattr(st, "copy_stream", copy_half_then_fail)
    with pytest.raises(OSError, match="read error"):
        s3_store.upload_file(src, "m/w.bin")
    assert not s3_store.exists("m/w.bin")
    monkeypatch.setattr(st, "copy_stream", real)
    assert s3_store.upload_file(src, "m/w.bin")["bytes"] == st.CHUNK + 1


def test_a_failed_upload_leaves_the_old_file(tmp_path, monkeypatch):
    store = RunStore(str(tmp_path / "run"))
    store.write_bytes("a.bin", b"old")
    src = tmp_path / "src.bin"
    src.write_bytes(_big_bytes(1000))

    def boom(*a):
        raise OSError("disk full")

    monkeypatch.setattr(st.os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        store.upload_file(src, "a.bin")
    assert os.listdir(tmp_path / "run") == ["a.bin"] and store.read_bytes("a.bin") == b"old"


def test_verify_files_on_s3(s3_store):
    s3_store.write_rows("s/parts-x/a.parquet", [{"x": 1}, {"x": 2}])
    m = manifests.write_complete(s3_store, "s", "id1", 1, {}, {}, {}, "s/parts-x", ["s/parts-x/a.parquet"], {}, 0.0)
    assert m["rows"] == 2 and manifests.changed_files(s3_store, m) == []
    assert manifests.missing_or_resized(s3_store, m) == []
    s3_store.write_bytes("s/parts-x/a.parquet", b"corrupt")
    assert manifests.changed_files(s3_store, m) == ["s/parts-x/a.parquet"]
