"""Sampler engines (actors/sampler.py) for the stages of one `verifine run`.

Outside `keeping_engines()` every call gets engines started for it, and they end with it.
Inside, on a local Ray that verifine started, the engine a stage finished with is kept
(one at most, idle) and the next stage that samples with the same engine settings takes
it over: a model of the same architecture and tokenizer is loaded into it in place. In
the toy default an engine start-up costs 12.5 CPU-s alone and each trained model's
evaluation paid one; the weights load in well under a second (README, "Measured
figures").

An idle engine holds its CPU (or GPU) slot, never the Ray's last one, and none is kept
while a placement group waits for slots. A training whose wait for slots it alone
prolongs closes it (`close_idle`, the reclaim of ray_session.run_when_free), so do a
stage that needs other engine settings and the end of the run. On a cluster nothing
could take a held slot back from a pending training, so there engines end with their
stage."""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

from actors.sampler import EngineSpec, VLLMSampler
from pipeline.ray_session import is_local, worker_remote_args


@dataclass(frozen=True)
class Engine:
    settings: tuple   # what it was started with besides the model and sampling (engine_settings)
    holds: dict       # the Ray resources it holds, e.g. {"CPU": 1}
    actor: object     # the VLLMSampler actor


_lock = threading.Lock()
_keeping: list[bool] = []  # [True] inside keeping_engines()
_idle: list[Engine] = []   # one at most


def engine_settings(spec: EngineSpec, options: dict) -> tuple:
    """What an engine is started with and cannot change: everything but the model's
    weights and the sampling parameters."""
    return (spec.seed, spec.tensor_parallel, spec.gpu_memory_utilization, spec.kv_cache_gib, spec.max_model_len,
            spec.dtype, repr(sorted(options.items())))


def acquire(spec: EngineSpec, count: int, gpus_per_engine: int) -> list[Engine]:
    """`count` engines serving `spec`: the idle one if it can switch to it, new ones for
    the rest."""
    import ray

    holds = {"GPU": gpus_per_engine} if gpus_per_engine else {"CPU": 1}
    options = {"num_gpus": gpus_per_engine} if gpus_per_engine else {"num_cpus": 1}
    options.update(worker_remote_args())
    settings = engine_settings(spec, options)
    with _lock:
        idle = [e for e in _idle if e.settings == settings]
        _close([e for e in _idle if e.settings != settings])
        _idle.clear()
    engines = []
    for e in idle[:count]:
        try:
            switched = ray.get(e.actor.switch.remote(spec.to_dict()))
        except BaseException:
            _close([e])  # out of _idle already: nothing else would end it
            raise
        if switched:
            engines.append(e)
        else:
            _close([e])
    actor_class = ray.remote(VLLMSampler)
    while len(engines) < count:
        engines.append(Engine(settings, holds, actor_class.options(**options).remote(spec.to_dict())))
    return engines


def release(engines: list[Engine], healthy: bool = True) -> None:
    """Engines a stage is done with: one is kept idle inside keeping_engines() on a local
    Ray (if it finished its work without error), the others end."""
    import ray

    with _lock:
        # Never the whole Ray, nor while a placement group waits (a training admitted on
        # free CPUs whose group an engine started before it came): neither could make an
        # idle engine go.
        if (healthy and _keeping and is_local() and not _idle and engines
                and all(ray.cluster_resources().get(k, 0) > v for k, v in engines[0].holds.items())
                and not any(pg.get("state") == "PENDING" for pg in ray.util.placement_group_table().values())):
            _idle.append(engines[0])
            engines = engines[1:]
    _close(engines)


def close_idle(shortfall: dict[str, float] | None = None) -> bool:
    """End the idle engine, if any, when the slot it holds covers `shortfall` (e.g.
    {"CPU": 1} more wanted by a waiting training), or whenever no shortfall is given.
    True if it ended one. A training that would wait anyway leaves it to the next
    evaluation."""
    with _lock:
        ending = [e for e in _idle if shortfall is None or
                  all(e.holds.get(k, 0) >= v for k, v in shortfall.items())]
        _idle[:] = [e for e in _idle if e not in ending]
    _close(ending)
    return bool(ending)


@contextlib.contextmanager
def keeping_engines():
    """Keep an idle engine between the stages run inside; none is left at the end."""
    _keeping.append(True)
    try:
        yield
    finally:
        _keeping.pop()
        if not _keeping:
            close_idle()


def _close(engines: list[Engine]) -> None:
    import ray

    for e in engines:
        ray.kill(e.actor)
