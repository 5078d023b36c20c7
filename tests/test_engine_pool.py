"""When an engine is kept idle for the next stage and when it ends (no Ray: the pool's
bookkeeping with stand-in engines; tests/test_sample_verify.py switches a real one)."""
import ray

from pipeline import engine_pool, ray_session


def test_an_idle_engine_is_kept_only_inside_a_run_on_a_local_ray_and_never_holds_the_last_slot(monkeypatch):
    closed, cpus = [], [3]
    monkeypatch.setattr(engine_pool, "_close", lambda engines: closed.extend(engines))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": cpus[0]})
    groups = {}
    monkeypatch.setattr(ray.util, "placement_group_table", lambda: groups)
    monkeypatch.setattr(ray_session, "_local", [True])
    first, second = (engine_pool.Engine(("settings",), {"CPU": 1}, object()) for _ in range(2))

    engine_pool.release([first])
    assert closed == [first], "outside a run an engine ends with its stage"
    with engine_pool.keeping_engines():
        engine_pool.release([first, second])
        assert engine_pool._idle == [first] and closed == [first, second], "one engine at most is kept"
        assert not engine_pool.close_idle({"CPU": 2}), "its one CPU would not end a training's wait"
        assert engine_pool.close_idle({"CPU": 1}) and engine_pool._idle == []

        closed.clear()
        cpus[0] = 1
        engine_pool.release([first])
        assert closed == [first], "a Ray's last CPU is never held idle"
        cpus[0] = 3
        monkeypatch.setattr(ray_session, "_local", [])
        engine_pool.release([first])
        assert closed == [first, first], "on a cluster an engine ends with its stage"
        monkeypatch.setattr(ray_session, "_local", [True])
        engine_pool.release([first], healthy=False)
        assert len(closed) == 3, "an engine whose stage failed is not handed on"
        groups["pg"] = {"state": "PENDING"}
        engine_pool.release([first])
        assert len(closed) == 4, "a training's placement group waits: it may need the slot"
        groups["pg"] = {"state": "CREATED"}
        engine_pool.release([second])
        assert engine_pool._idle == [second]
    assert engine_pool._idle == [] and closed[-1] is second, "the run's end closes the idle engine"
