"""The stage runner on tiny stages (no Ray): identity from config + inputs' content,
invalidate before destroy, broken stages, forced stages."""
import time

import pytest

from actors.store import RunStore
from pipeline import manifests
from pipeline.runner import ConfigView, Stage, run_stages, stage_states

QUIET = dict(log=lambda *_: None)


def _stage(name, inputs, calls, value=None, version=1, config=None):
    """A stage writing `value` (or its own config's x plus its inputs' values)."""
    def run(ctx):
        calls.append(name)
        got = [ctx.store.read_rows(ctx.input_file(i, "out.parquet"))[0]["v"] for i in inputs]
        v = value() if callable(value) else value
        out = f"{ctx.work_dir}/out.parquet"
        ctx.store.write_rows(out, [{"v": f"{name}:{ctx.cfg.x}:{v}:{'|'.join(got)}"}])
        return [out], {}
    return Stage(name, version, config or {"x": 1}, inputs, run)


def _chain(calls, cfgs=None, values=None):
    cfgs, values = cfgs or {}, values or {}
    return [_stage("a", [], calls, values.get("a"), config=cfgs.get("a")),
            _stage("b", ["a"], calls, values.get("b"), config=cfgs.get("b")),
            _stage("c", ["b"], calls, values.get("c"), config=cfgs.get("c")),
            _stage("d", ["a"], calls, values.get("d"), config=cfgs.get("d"))]


def test_completed_stages_are_skipped(tmp_path):
    store, calls = RunStore(str(tmp_path)), []
    run_stages(store, _chain(calls), **QUIET)
    assert sorted(calls) == ["a", "b", "c", "d"] and calls[0] == "a"
    calls.clear()
    outcome = run_stages(store, _chain(calls), **QUIET)
    assert calls == [] and set(outcome.values()) == {"cached"}


def test_changed_config_reruns_the_stage_and_dependents_whose_input_content_changed(tmp_path):
    store, calls = RunStore(str(tmp_path)), []
    run_stages(store, _chain(calls), **QUIET)
    calls.clear()
    run_stages(store, _chain(calls, cfgs={"b": {"x": 2}}), **QUIET)
    assert calls == ["b", "c"]  # not a (upstream), not d (a sibling branch)
    assert len([p for p in (tmp_path / "b").iterdir() if p.name.startswith("parts-")]) == 1


def test_same_bytes_upstream_leave_dependents_done(tmp_path):
    """A version bump of b that writes the same bytes re-runs b only."""
    store, calls = RunStore(str(tmp_path)), []
    run_stages(store, _chain(calls), **QUIET)
    calls.clear()
    stages = _chain(calls)
    stages[1].version = 2
    run_stages(store, stages, **QUIET)
    assert calls == ["b"]


def test_force_reruns_only_what_content_requires(tmp_path):
    store, calls = RunStore(str(tmp_path)), []
    counter = iter(range(1, 100))
    run_stages(store, _chain(calls, values={"b": lambda: 0}), **QUIET)
    calls.clear()
    run_stages(store, _chain(calls, values={"b": lambda: 0}), force={"b"}, **QUIET)
    assert calls == ["b"]  # same bytes: c stays done
    calls.clear()
    run_stages(store, _chain(calls, values={"b": lambda: next(counter)}), force={"b"}, **QUIET)
    assert calls == ["b", "c"]  # new bytes: c re-runs, d (other branch) does not


def _logging_chain(calls, value):
    """a writes `value()` and logs that differ on every run (a wall-clock stats file and a
    folder of event files); b reads a's data."""
    def run_a(ctx):
        calls.append("a")
        out = f"{ctx.work_dir}/out.parquet"
        ctx.store.write_rows(out, [{"v": str(value())}])
        logs = [f"{ctx.work_dir}/stats.json", f"{ctx.work_dir}/events/run-{time.time_ns()}"]
        ctx.store.write_json(logs[0], {"seconds": time.time_ns()})
        ctx.store.write_bytes(logs[1], str(time.time_ns()).encode())
        return [out, *logs], {}
    return [Stage("a", 1, {"x": 1}, [], run_a, logs=("stats.json", "events/")), _stage("b", ["a"], calls)]


def test_a_forced_rerun_with_new_logs_but_the_same_data_leaves_dependents_done(tmp_path):
    """Logs (Stage.logs) are checksummed but not hashed into the output digest: a forced
    rerun writing the same data and new timings re-runs a only; new data re-runs b."""
    store, calls = RunStore(str(tmp_path)), []
    run_stages(store, _logging_chain(calls, lambda: 0), **QUIET)
    first = manifests.read_manifest(store, "a")
    calls.clear()
    run_stages(store, _logging_chain(calls, lambda: 0), force={"a"}, **QUIET)
    second = manifests.read_manifest(store, "a")
    assert calls == ["a"]
    stats = lambda m: next(r["sha256"] for f, r in m["files"].items() if f.endswith("stats.json"))
    assert stats(first) != stats(second) and len(second["files"]) == 3  # the logs did change, and are recorded
    assert first["output_digest"] == second["output_digest"]
    calls.clear()
    run_stages(store, _logging_chain(calls, lambda: 1), force={"a"}, **QUIET)
    assert calls == ["a", "b"]
    # A log is still part of the stage's files: losing it makes the stage broken.
    log = next(f for f in manifests.read_manifest(store, "a")["files"] if "/events/" in f)
    store.delete_file(log)
    assert stage_states(store, _logging_chain([], lambda: 1))["a"][0] == "broken"


def test_a_log_entry_matches_its_name_or_the_folder_it_names():
    logs = ("stats.json", "tensorboard/")
    assert manifests.is_log("stats.json", logs) and manifests.is_log("tensorboard/a/events.1", logs)
    assert not manifests.is_log("model/stats.json", logs) and not manifests.is_log("tensorboard.json", logs)
    assert not manifests.is_log("out.parquet", logs)


def test_rerun_upstream_makes_dependents_stale_in_status(tmp_path):
    store, calls = RunStore(str(tmp_path)), []
    run_stages(store, _chain(calls, values={"b": lambda: 0}), **QUIET)
    run_stages(store, _chain(calls, values={"b": lambda: 1}), only={"b"}, force={"b"}, **QUIET)
    states = {k: v[0] for k, v in stage_states(store, _chain([])).items()}
    assert states == {"a": "done", "b": "done", "c": "stale", "d": "done"}


def test_only_runs_missing_inputs_first(tmp_path):
    store, calls = RunStore(str(tmp_path)), []
    run_stages(store, _chain(calls), only={"b"}, **QUIET)
    assert calls == ["a", "b"]


def test_a_failing_forced_stage_leaves_no_complete_manifest(tmp_path):
    """Invalidate before destroy: the forced stage's files are deleted only after its
    manifest stopped saying complete, so a crash leaves an honest 'missing'."""
    store, calls = RunStore(str(tmp_path)), []
    run_stages(store, _chain(calls), **QUIET)
    stages = _chain(calls)

    def fail(ctx):
        assert not store.list_files(ctx.work_dir)  # forced: its old files are already gone
        raise RuntimeError("killed")
    stages[1].run = fail
    with pytest.raises(RuntimeError):
        run_stages(store, stages, force={"b"}, **QUIET)
    assert manifests.read_manifest(store, "b")["status"] == "invalid"
    states = {k: v[0] for k, v in stage_states(store, _chain([])).items()}
    assert states["b"] == "missing" and states["c"] == "stale" and states["a"] == states["d"] == "done"
    assert store.list_files("c")  # a stage this invocation did not re-run keeps its files


def test_deleted_file_makes_a_done_stage_broken_and_run_redoes_it(tmp_path):
    store, calls = RunStore(str(tmp_path)), []
    run_stages(store, _chain(calls), **QUIET)
    out = next(f for f in store.list_files("b") if f.endswith("out.parquet"))
    store.delete_file(out)
    assert stage_states(store, _chain([]))["b"][0] == "broken"
    calls.clear()
    run_stages(store, _chain(calls), **QUIET)
    assert calls == ["b"] and store.exists(out)


def test_resized_file_is_broken(tmp_path):
    store, calls = RunStore(str(tmp_path)), []
    run_stages(store, _chain(calls), **QUIET)
    out = next(f for f in store.list_files("a") if f.endswith("out.parquet"))
    store.write_bytes(out, b"x")
    assert stage_states(store, _chain([]))["a"][0] == "broken"
    assert stage_states(store, _chain([]))["b"][0] == "stale"


def test_config_view_refuses_keys_the_stage_was_not_given():
    view = ConfigView({"sample": {"n": 4}, "run.seed": 3}, "sample")
    assert view.run.seed == 3 and view.sample == {"n": 4}
    with pytest.raises(AttributeError, match="run.dir"):
        view.run.dir
    with pytest.raises(AttributeError, match="train"):
        view.train


def test_keys_without_output_effect_are_not_hashed():
    from pipeline.config import load_config
    from pipeline.runner import stage_identity

    a, b = load_config(), load_config(None, ["verify.num_tasks=7", "verify.deadline_s=9"])
    s = lambda cfg: Stage("verify", 1, {"verify": cfg.verify}, [], lambda ctx: None)
    a2 = load_config(None, ["verify.num_tasks=7"])
    assert stage_identity(s(a), {}) == stage_identity(s(a2), {})
    assert stage_identity(s(a), {}) != stage_identity(s(b), {})


def _timed(name, inputs, spans, seconds=1.5, fail=False, after=()):
    def run(ctx):
        start = time.time()
        time.sleep(seconds)
        if fail:
            raise RuntimeError(f"{name} broke")
        spans[name] = (start, time.time())
        out = f"{ctx.work_dir}/out.parquet"
        ctx.store.write_rows(out, [{"v": name}])
        return [out], {}
    return Stage(name, 1, {"x": 1}, inputs, run, after=list(after))


def test_independent_stages_run_at_the_same_time(tmp_path):
    spans = {}
    stages = [_timed("a", [], spans), _timed("b", ["a"], spans), _timed("d", ["a"], spans), _timed("e", ["b", "d"], spans)]
    run_stages(RunStore(str(tmp_path)), stages, **QUIET)
    (b0, b1), (d0, d1) = spans["b"], spans["d"]
    assert b0 < d1 and d0 < b1, "b and d depend only on a: they should overlap"
    assert spans["e"][0] >= max(b1, d1) and min(b0, d0) >= spans["a"][1]


def test_max_parallel_one_runs_one_stage_at_a_time(tmp_path):
    spans = {}
    stages = [_timed("a", [], spans), _timed("b", ["a"], spans), _timed("d", ["a"], spans)]
    run_stages(RunStore(str(tmp_path)), stages, max_parallel=1, **QUIET)
    (b0, b1), (d0, d1) = spans["b"], spans["d"]
    assert b1 <= d0 or d1 <= b0


def test_after_orders_without_becoming_an_input(tmp_path):
    spans = {}
    stages = [_timed("a", [], spans), _timed("b", [], spans, after=["a"])]
    run_stages(RunStore(str(tmp_path)), stages, **QUIET)
    assert spans["b"][0] >= spans["a"][1]
    assert stages[1].inputs == []


def test_a_failing_branch_does_not_stop_the_others_and_they_stay_cached(tmp_path):
    from pipeline.runner import StagesFailed

    store, spans = RunStore(str(tmp_path)), {}
    stages = [_timed("a", [], spans), _timed("b", ["a"], spans, fail=True), _timed("c", ["b"], spans),
              _timed("d", ["a"], spans, seconds=3.0)]
    with pytest.raises(StagesFailed) as e:
        run_stages(store, stages, **QUIET)
    assert set(e.value.failed) == {"b"} and e.value.blocked == ["c"]
    assert "b broke" in str(e.value) and "c" in str(e.value)
    assert set(spans) == {"a", "d"}  # d, a sibling branch, finished although b failed first
    spans.clear()
    stages = [_timed("a", [], spans), _timed("b", ["a"], spans), _timed("c", ["b"], spans), _timed("d", ["a"], spans)]
    outcome = run_stages(store, stages, **QUIET)
    assert outcome == {"a": "cached", "d": "cached", "b": "ran", "c": "ran"}
