"""Stage planning: each stage's fingerprint is a hash of its config section and its
inputs' fingerprints, so changing one stage's config re-runs that stage and everything
downstream of it, nothing upstream. A stage whose fingerprint matches a complete
manifest is skipped."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from actors.store import RunStore, fingerprint


@dataclass
class Stage:
    name: str                      # also its directory in the run store, e.g. "train/dft"
    config: dict                   # the part of the config this stage's output depends on
    inputs: list[str]              # upstream stage names
    run: Callable[["StageContext"], tuple[list[str], dict]]  # -> (files written, stats)
    fingerprint: str = ""


@dataclass
class StageContext:
    store: RunStore
    stage: Stage
    upstream: dict = field(default_factory=dict)  # name -> manifest of each input
    scheduled: frozenset = frozenset()  # stages this invocation runs (e.g. to share an engine)

    @property
    def work_dir(self) -> str:
        return stage_work_dir(self.stage)


def parts_dir_name(stage: Stage) -> str:
    return f"parts-{stage.fingerprint[:12]}"


def stage_work_dir(stage: Stage) -> str:
    """Where a stage's files go: keyed by fingerprint so blocks written under an older
    config are never mixed into a new result, and a killed run resumes."""
    return f"{stage.name}/{parts_dir_name(stage)}"


def resolve_fingerprints(stages: list[Stage]) -> dict[str, Stage]:
    by_name: dict[str, Stage] = {}
    for s in stages:  # stages are listed upstream-first
        missing = [i for i in s.inputs if i not in by_name]
        if missing:
            raise ValueError(f"stage {s.name} lists unknown inputs {missing}")
        s.fingerprint = fingerprint({"stage": s.name, "config": s.config,
                                     "inputs": {i: by_name[i].fingerprint for i in s.inputs}})
        by_name[s.name] = s
    return by_name


def stage_state(store: RunStore, stage: Stage) -> str:
    m = store.manifest(stage.name)
    if m is None or m.get("status") != "complete":
        return "missing"
    return "done" if m.get("fingerprint") == stage.fingerprint else "stale"


def downstream_of(stages: list[Stage], names: set[str]) -> set[str]:
    out = set(names)
    for s in stages:
        if any(i in out for i in s.inputs):
            out.add(s.name)
    return out


def run_stages(store: RunStore, stages: list[Stage], only: set[str] | None = None,
               force: set[str] = frozenset(), log=print) -> dict[str, str]:
    """Run what is not done. `only`: restrict to these stages (their inputs must be done
    or are run first); `force`: re-run these and their dependents."""
    by_name = resolve_fingerprints(stages)
    forced = downstream_of(stages, set(force))
    wanted = set(by_name) if not only else _with_inputs(by_name, only)
    states = {s.name: stage_state(store, s) for s in stages if s.name in wanted}
    scheduled = frozenset(n for n, state in states.items() if state != "done" or n in forced)
    for name in scheduled & forced:  # up front: a stage may write ahead into a later one's parts
        store.delete_dir(stage_work_dir(by_name[name]))
    outcome = {}
    for s in stages:
        if s.name not in wanted:
            continue
        state = states[s.name]
        if s.name not in scheduled:
            log(f"[{s.name}] cached ({s.fingerprint})")
            outcome[s.name] = "cached"
            continue
        log(f"[{s.name}] running ({'forced' if s.name in forced else state}, fingerprint {s.fingerprint})")
        start = time.time()
        ctx = StageContext(store, s, {i: store.manifest(i) for i in s.inputs}, scheduled)
        files, stats = s.run(ctx)
        store.complete_stage(s.name, s.fingerprint, s.config, {i: by_name[i].fingerprint for i in s.inputs},
                             files, stats, started=start)
        _drop_old_parts(store, s)
        log(f"[{s.name}] done in {time.time() - start:.1f}s")
        outcome[s.name] = "ran"
    return outcome


def _with_inputs(by_name: dict[str, Stage], names: set[str]) -> set[str]:
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


def _drop_old_parts(store: RunStore, stage: Stage) -> None:
    keep = parts_dir_name(stage)
    prefix = f"{stage.name}/"
    for rel in store.list_files(stage.name):
        part = rel[len(prefix):].split("/", 1)[0]
        if part.startswith("parts-") and part != keep:
            store.delete_dir(stage.name, part)
