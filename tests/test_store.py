import os
import subprocess
import sys
import textwrap

import pyarrow.parquet as pq
import pytest

from pipeline.runner import Stage, run_stages
from actors.store import RunStore


def test_roundtrip_and_manifest_checksums(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    store.write_rows("s/parts-x/a.parquet", [{"x": 1}, {"x": 2}])
    m = store.complete_stage("s", "fp", {"k": 1}, {}, ["s/parts-x/a.parquet"])
    assert m["rows"] == 2 and store.manifest("s")["fingerprint"] == "fp"
    assert store.verify_files(m) == []
    (tmp_path / "run/s/parts-x/a.parquet").write_bytes(b"corrupt")
    assert store.verify_files(m) == ["s/parts-x/a.parquet"]


def test_interrupted_write_leaves_no_complete_looking_file(tmp_path):
    """Kill a writer in the middle of a large write: the target never exists half-written."""
    run = tmp_path / "run"
    code = textwrap.dedent(f"""
        import os, signal, pyarrow as pa
        from pipeline import store as st
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
    assert store.manifest("stage") is None


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


def _chain(calls, configs):
    def runner(name):
        def run(ctx):
            calls.append(name)
            path = f"{ctx.work_dir}/out.parquet"
            ctx.store.write_rows(path, [{"v": name}])
            return [path], {}
        return run
    return [Stage("a", configs["a"], [], runner("a")),
            Stage("b", configs["b"], ["a"], runner("b")),
            Stage("c", configs["c"], ["b"], runner("c")),
            Stage("d", configs["d"], ["a"], runner("d"))]


def test_completed_stages_are_skipped(tmp_path):
    store, calls = RunStore(str(tmp_path)), []
    cfgs = {k: {"x": 1} for k in "abcd"}
    run_stages(store, _chain(calls, cfgs), log=lambda *_: None)
    assert calls == ["a", "b", "c", "d"]
    calls.clear()
    outcome = run_stages(store, _chain(calls, cfgs), log=lambda *_: None)
    assert calls == [] and set(outcome.values()) == {"cached"}


def test_changed_config_reruns_exactly_that_stage_and_dependents(tmp_path):
    store, calls = RunStore(str(tmp_path)), []
    cfgs = {k: {"x": 1} for k in "abcd"}
    run_stages(store, _chain(calls, cfgs), log=lambda *_: None)
    calls.clear()
    cfgs["b"] = {"x": 2}
    run_stages(store, _chain(calls, cfgs), log=lambda *_: None)
    assert calls == ["b", "c"]  # not a (upstream), not d (a sibling branch)
    # the old block directory of b is gone, only the new one is kept
    assert len([p for p in (tmp_path / "b").iterdir() if p.name.startswith("parts-")]) == 1


def test_force_and_only(tmp_path):
    store, calls = RunStore(str(tmp_path)), []
    cfgs = {k: {"x": 1} for k in "abcd"}
    run_stages(store, _chain(calls, cfgs), only={"b"}, log=lambda *_: None)
    assert calls == ["a", "b"]
    calls.clear()
    run_stages(store, _chain(calls, cfgs), force={"d"}, log=lambda *_: None)
    assert calls == ["c", "d"]  # c was never run (missing); d forced
    calls.clear()
    run_stages(store, _chain(calls, cfgs), force={"a"}, log=lambda *_: None)
    assert calls == ["a", "b", "c", "d"]


def test_a_failing_stage_leaves_no_manifest(tmp_path):
    store = RunStore(str(tmp_path))

    def fail(ctx):
        ctx.store.write_rows(f"{ctx.work_dir}/half.parquet", [{"x": 1}])
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        run_stages(store, [Stage("a", {}, [], fail)], log=lambda *_: None)
    assert store.manifest("a") is None
