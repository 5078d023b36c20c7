"""Sampler engines (actors/sampler.py) for the stages of one `verifine run`.

Outside `keeping_engines()` every call gets engines started for it, and they end with it.
Inside, on a local Ray that verifine started, the engine a stage finished with is kept
(one at most, idle) and the next stage that samples with the same engine settings takes
it over: a model of the same architecture and tokenizer is loaded into it in place. In
the toy default an engine start-up costs ~15 CPU-s and each trained model's evaluation
paid one; the weights load in well under a second (README, "Measured figures").

An idle engine holds its CPU (or GPU) slot. A training waiting for slots closes it
(`close_idle`, the reclaim of ray_session.run_when_free), so does a stage that needs
other engine settings, and the end of the run. On a cluster nothing could take a held
slot back from a pending training, so there engines end with their stage."""
from __future__ import annotations

import contextlib
import threading

from actors.sampler import EngineSpec, VLLMSampler
from pipeline.ray_session import is_local, worker_remote_args

_lock = threading.Lock()
_keeping: list[bool] = []           # [True] inside keeping_engines()
_idle: list[tuple[tuple, object]] = []  # (engine settings, actor handle): one at most


def engine_settings(spec: EngineSpec, options: dict) -> tuple:
    """What an engine is started with and cannot change: everything but the model's
    weights and the sampling parameters."""
    return (spec.seed, spec.tensor_parallel, spec.gpu_memory_utilization, spec.kv_cache_gib, spec.max_model_len,
            spec.dtype, tuple(sorted((k, str(v)) for k, v in options.items())))


def acquire(spec: EngineSpec, count: int, gpus_per_engine: int) -> list:
    """`count` engine actors serving `spec`: the idle one if it can switch to it, new ones
    for the rest."""
    import ray

    options = {"num_gpus": gpus_per_engine} if gpus_per_engine else {"num_cpus": 1}
    options.update(worker_remote_args())
    settings = engine_settings(spec, options)
    with _lock:
        idle = [(s, a) for s, a in _idle if s == settings]
        _close([a for s, a in _idle if s != settings])
        _idle.clear()
    engines = []
    for _, actor in idle[:count]:
        if ray.get(actor.switch.remote(spec.to_dict())):
            engines.append(actor)
        else:
            ray.kill(actor)
    actor_class = ray.remote(VLLMSampler)
    while len(engines) < count:
        engines.append(actor_class.options(**options).remote(spec.to_dict()))
    return [(settings, a) for a in engines]


def release(engines: list, healthy: bool = True) -> None:
    """Engines a stage is done with: one is kept idle inside keeping_engines() on a local
    Ray (if it finished its work without error), the others end."""
    with _lock:
        if healthy and _keeping and is_local() and not _idle and engines:
            _idle.append(engines[0])
            engines = engines[1:]
    _close([a for _, a in engines])


def close_idle() -> bool:
    """End the idle engine, if any (its slot is wanted); True if there was one."""
    with _lock:
        idle = [a for _, a in _idle]
        _idle.clear()
    _close(idle)
    return bool(idle)


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


def _close(actors: list) -> None:
    import ray

    for a in actors:
        ray.kill(a)
