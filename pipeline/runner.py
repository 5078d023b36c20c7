"""Running the stage graph: each stage is a pure function of its identity.

identity = hash(stage name, code version, the config the stage reads, the content
digests of its inputs' outputs, the digests of external files it reads).

A stage's run function sees its config only through `ctx.cfg`, a view of exactly the
keys the plan gave it, and the identity is computed from those same objects, so a key
cannot be read without being hashed. Keys that change no output (config.NO_OUTPUT_EFFECT)
are readable but left out of the hash. Identities of downstream stages are known only
once their inputs are done: a re-run upstream stage that writes the same bytes leaves
its dependents done; one that writes different bytes makes them stale.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable

from pipeline import manifests
from pipeline.config import NO_OUTPUT_EFFECT


class ConfigView:
    """Read-only attribute access to a stage's declared config entries, keyed by dotted
    config path: {"sample": SampleConfig, "run.seed": 0} gives view.sample.n and
    view.run.seed; anything else raises, naming the stage and the key."""

    def __init__(self, entries: dict[str, Any], stage: str, prefix: str = ""):
        self._entries, self._stage, self._prefix = entries, stage, prefix

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        path = f"{self._prefix}{name}"
        if path in self._entries:
            return self._entries[path]
        if any(k.startswith(path + ".") for k in self._entries):
            return ConfigView(self._entries, self._stage, path + ".")
        raise AttributeError(f"stage {self._stage} reads config key {path!r}, which its plan does not give it "
                             f"(so it would not be part of the stage's identity)")


def identity_value(path: str, value: Any) -> Any:
    """A config entry as hashed: pydantic sections dumped, NO_OUTPUT_EFFECT keys dropped."""
    if _no_effect(path):
        return None
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    if isinstance(value, dict):
        return {k: identity_value(f"{path}.{k}", v) for k, v in sorted(value.items()) if not _no_effect(f"{path}.{k}")}
    if isinstance(value, (list, tuple)):
        return [identity_value(path, v) for v in value]
    return value


def _no_effect(path: str) -> bool:
    return any(path == k or path.startswith(k + ".") for k in NO_OUTPUT_EFFECT)


@dataclass
class Stage:
    name: str                      # also its directory in the run store, e.g. "train/dft"
    version: int                   # bump when the stage's semantics change
    config: dict[str, Any]         # dotted config path (or plain name) -> what the stage reads
    inputs: list[str]              # upstream stage names
    run: Callable[["StageContext"], tuple[list[str], dict]]  # -> (files written, stats)
    external: dict[str, dict] = field(default_factory=dict)  # name -> {"location": ..., "digest": ...}
    after: list[str] = field(default_factory=list)  # run after these (order only; not part of the identity)
    logs: tuple[str, ...] = ()     # files (or "folder/") of the work dir not in the output digest: manifests.is_log

    def config_dump(self) -> dict:
        return {k: identity_value(k, v) for k, v in sorted(self.config.items()) if not _no_effect(k)}


def stage_identity(stage: Stage, input_digests: dict[str, str]) -> str:
    return manifests.fingerprint({"stage": stage.name, "version": stage.version, "config": stage.config_dump(),
                                  "inputs": input_digests,
                                  "external": {k: v["digest"] for k, v in sorted(stage.external.items())}})


def work_dir_for(stage_name: str, identity: str) -> str:
    """Where a stage's files go: keyed by identity, so files made under another identity
    are never mixed into a result, and a killed run resumes in place."""
    return f"{stage_name}/parts-{identity[:12]}"


@dataclass
class StageContext:
    store: Any
    stage: Stage
    identity: str
    upstream: dict                 # input name -> its complete manifest
    runner: "Runner"

    @property
    def cfg(self) -> ConfigView:
        return ConfigView(self.stage.config, self.stage.name)

    @property
    def work_dir(self) -> str:
        return work_dir_for(self.stage.name, self.identity)

    @property
    def log(self):
        return self.runner.log

    def input_files(self, stage: str, suffix: str = ".parquet") -> list[str]:
        return [f for f in self.upstream[stage]["files"] if f.endswith(suffix)]

    def input_file(self, stage: str, name: str) -> str:
        matches = [f for f in self.upstream[stage]["files"] if f.endswith("/" + name)]
        if not matches:
            raise FileNotFoundError(f"stage {stage} has no {name} in its manifest")
        return matches[0]

    def external_location(self, name: str) -> Any:
        return self.stage.external[name]["location"]

    def claim(self, stage_name: str) -> str | None:
        """Work dir of another stage that this invocation will run next (e.g. a model's
        later benchmarks, sampled now by the same engines), prepared for writing; None if
        that stage is cached or not part of this invocation."""
        return self.runner.claim(stage_name)


def kill_point(name: str) -> None:
    """Fault injection for tests: VERIFINE_TEST_KILL_AT=<point> SIGKILLs this process
    when it reaches that point (e.g. "train/rft:end"); never set by users."""
    if os.environ.get("VERIFINE_TEST_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


class StagesFailed(RuntimeError):
    """Some stages failed (and their dependents could not run); every other stage ran."""

    def __init__(self, failed: dict[str, BaseException], blocked: list[str]):
        self.failed, self.blocked = failed, blocked
        lines = [f"{name}: {type(e).__name__}: {e}" for name, e in failed.items()]
        if blocked:
            lines.append(f"not run because an input failed: {', '.join(blocked)}")
        super().__init__(f"{len(failed)} stage(s) failed; the others completed\n  " + "\n  ".join(lines))


class Runner:
    """Runs a stage graph: a stage starts once its inputs (and `after` stages) finished;
    independent stages run at the same time, each in a driver thread that mostly waits
    on its Ray workload, so Ray places what the cluster has resources for and queues the
    rest. A failing stage stops only the stages that depend on it."""

    def __init__(self, store, stages: list[Stage], force: set[str] = frozenset(), log=print,
                 max_parallel: int | None = None):
        self.store, self.stages, self.force, self.log = store, stages, set(force), log
        self.max_parallel = max_parallel or len(stages) or 1
        self.by_name = index(stages)
        self.prepared: set[str] = set()
        self.wanted: set[str] = set(self.by_name)
        self._memo: dict[str, tuple[str, str | None, dict | None]] = {}  # cleared whenever a manifest changes
        self._lock = threading.RLock()

    def _resolve(self, stage: Stage) -> tuple[str, str | None, dict | None]:
        """(state, identity, manifest); identity None while an input is not done."""
        with self._lock:
            if stage.name not in self._memo:
                digests = {}
                for i in stage.inputs:
                    state, _, m = self._resolve(self.by_name[i])
                    if state != "done":
                        digests = None
                        break
                    digests[i] = m["output_digest"]
                ident = stage_identity(stage, digests) if digests is not None else None
                state, m = manifests.state_of(self.store, stage.name, ident)
                self._memo[stage.name] = (state, ident, m)
            return self._memo[stage.name]

    def state(self, stage: Stage) -> tuple[str, str | None]:
        state, ident, _ = self._resolve(stage)
        return state, ident

    def claim(self, stage_name: str) -> str | None:
        stage = self.by_name.get(stage_name)
        if stage is None or stage_name not in self.wanted:
            return None
        with self._lock:
            state, ident = self.state(stage)
            if ident is None or (state == "done" and stage_name not in self.force):
                return None
            self._prepare(stage, state, ident)
        return work_dir_for(stage_name, ident)

    def _prepare(self, stage: Stage, state: str, ident: str) -> None:
        """Invalidate before destroying: the manifest stops saying complete first, then a
        forced or broken stage's own parts are cleared (a stale or missing stage resumes
        in its identity's work dir; older parts go once the new manifest is complete)."""
        with self._lock:
            if stage.name in self.prepared:
                return
            forced = stage.name in self.force
            manifests.invalidate(self.store, stage.name, ident, "forced" if forced else state)
            self._memo.clear()
            if forced or state == "broken":
                self.store.delete_dir(work_dir_for(stage.name, ident))
            self.prepared.add(stage.name)

    def run(self, only: set[str] | None = None) -> dict[str, str]:
        self.wanted = with_inputs(self.by_name, only) if only else set(self.by_name)
        pending = [s for s in self.stages if s.name in self.wanted]
        outcome: dict[str, str] = {}
        failed: dict[str, BaseException] = {}
        running: dict[Future, Stage] = {}
        with ThreadPoolExecutor(self.max_parallel, thread_name_prefix="stage") as pool:
            while pending or running:
                progressed = False
                for s in list(pending):
                    waits_on = [d for d in (*s.inputs, *s.after) if d in self.wanted]
                    if any(outcome.get(d) in ("failed", "blocked") for d in s.inputs):
                        pending.remove(s)
                        outcome[s.name], progressed = "blocked", True
                    elif all(d in outcome for d in waits_on) and len(running) < self.max_parallel:
                        pending.remove(s)
                        progressed = True
                        if self._is_cached(s):
                            outcome[s.name] = "cached"
                        else:
                            running[pool.submit(self._run_one, s)] = s
                if not running:
                    if not progressed:
                        raise RuntimeError(f"stages {[p.name for p in pending]} wait on stages that never run")
                    continue  # what became cached or blocked may have readied others
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    s = running.pop(future)
                    try:
                        outcome[s.name] = future.result()
                    except Exception as e:  # noqa: BLE001 - a failing branch must not stop the others
                        failed[s.name] = e
                        outcome[s.name] = "failed"
                        self.log(f"[{s.name}] FAILED: {type(e).__name__}: {e}")
        if failed:
            raise StagesFailed(failed, sorted(n for n, o in outcome.items() if o == "blocked"))
        return outcome

    def _is_cached(self, s: Stage) -> bool:
        state, ident = self.state(s)
        if ident is None:
            raise RuntimeError(f"stage {s.name}: inputs {s.inputs} are not done")
        if state == "done" and s.name not in self.force:
            self.log(f"[{s.name}] cached ({ident})")
            return True
        return False

    def _run_one(self, s: Stage) -> str:
        state, ident = self.state(s)
        self.log(f"[{s.name}] running ({'forced' if s.name in self.force else state}, identity {ident})")
        start = time.time()
        self._prepare(s, state, ident)
        kill_point(f"{s.name}:start")
        upstream = {i: manifests.read_manifest(self.store, i) for i in s.inputs}
        ctx = StageContext(self.store, s, ident, upstream, self)
        files, stats = s.run(ctx)
        kill_point(f"{s.name}:end")
        manifests.write_complete(self.store, s.name, ident, s.version, s.config_dump(),
                                 {i: upstream[i]["output_digest"] for i in s.inputs},
                                 {k: v["digest"] for k, v in s.external.items()},
                                 ctx.work_dir, files, stats, start, s.logs)
        with self._lock:
            self._memo.clear()
        self._drop_old_parts(s, ctx.work_dir)
        self.log(f"[{s.name}] done in {time.time() - start:.1f}s")
        return "ran"

    def _drop_old_parts(self, stage: Stage, keep: str) -> None:
        prefix = stage.name + "/"
        for part in {f[len(prefix):].split("/", 1)[0] for f in self.store.list_files(stage.name)}:
            if part.startswith("parts-") and prefix + part != keep:
                self.store.delete_dir(prefix + part)


def run_stages(store, stages: list[Stage], only: set[str] | None = None, force: set[str] = frozenset(),
               log=print, max_parallel: int | None = None) -> dict[str, str]:
    """Run what is not done. `only`: restrict to these stages (and their inputs, run
    first if needed); `force`: re-run these stages; their dependents re-run only if the
    forced stage's output content changed. Up to `max_parallel` stages at once (None:
    as many as are ready)."""
    return Runner(store, stages, force, log, max_parallel).run(only)


def stage_states(store, stages: list[Stage]) -> dict[str, tuple[str, str | None]]:
    runner = Runner(store, stages)
    return {s.name: runner.state(s) for s in stages}


def index(stages: list[Stage]) -> dict[str, Stage]:
    by_name: dict[str, Stage] = {}
    for s in stages:  # listed upstream-first
        missing = [i for i in s.inputs if i not in by_name]
        if missing:
            raise ValueError(f"stage {s.name} lists inputs {missing} that are not listed before it")
        by_name[s.name] = s
    return by_name


def with_inputs(by_name: dict[str, Stage], names: set[str]) -> set[str]:
    out, todo = set(), list(names)
    while todo:
        n = todo.pop()
        if n in out:
            continue
        if n not in by_name:
            raise ValueError(f"unknown stage {n!r}; stages: {', '.join(by_name)}")
        out.add(n)
        todo += by_name[n].inputs
    return out
