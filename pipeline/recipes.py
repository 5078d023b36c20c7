"""Named training runs: the papers' experiments as a DAG of runs.

A run is an objective, its data (gold | positives | pairs), its own hyper-parameters
over the train defaults, and `init`: the base model or another run's name. A list value
of a hyper-parameter is a sweep that expands into one run per value, named
`<name>@<key>=<value>`; a run whose `init` names a sweep expands into one child per
member, named `<parent>+<name>` (read "parent, then name"). `train.objectives: [...]`
is shorthand for one run per objective, named after it (DPO with `dpo_lr`,
`dpo_batch_size`; `train.data` picks each one's data).

Reference-based objectives (DPO, f-divergence) use their parent as the reference by
default, the base model when they start from it; `reference: base` overrides that.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

# Hyper-parameters a run may set (or sweep) over the train section's defaults.
RUN_HYPERPARAMETERS = ("lr", "batch_size", "micro_batch_tokens", "epochs", "warmup_ratio", "weight_decay",
                       "grad_clip", "beta")
DEFAULT_DATA = {"sft": "gold", "rft": "positives", "dft": "positives", "dpo": "pairs", "chi2": "positives",
                "hellinger": "positives", "tv": "positives"}
REFERENCE_OBJECTIVES = ("dpo", "chi2", "hellinger", "tv")


class RecipeError(ValueError):
    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


@dataclass(frozen=True)
class Run:
    name: str
    objective: str
    data: str                        # gold | positives | pairs
    init: str                        # "base" or a run name
    reference: str | None            # "base", a run name, or None (no reference pass)
    hyper: dict = field(default_factory=dict)   # overrides of the train section
    family: str = ""                 # the run spec it came from (a sweep shares it)
    swept: tuple = ()                # ((key, value), ...) of a sweep member


def _fmt(value) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)


def _members(spec: dict, where: str) -> list[tuple[str, dict, tuple]]:
    """(suffix, hyper, swept) for each point of the spec's sweep (one point if none)."""
    fixed = {k: spec[k] for k in RUN_HYPERPARAMETERS if spec.get(k) is not None and not isinstance(spec[k], (list, tuple))}
    swept = [(k, list(spec[k])) for k in RUN_HYPERPARAMETERS if isinstance(spec.get(k), (list, tuple))]
    for k, values in swept:
        if not values:
            raise RecipeError(f"{where}.{k}", "a sweep needs at least one value")
        if len(set(values)) != len(values):
            raise RecipeError(f"{where}.{k}", f"a sweep lists a value twice: {values}")
    out = []
    for point in itertools.product(*[[(k, v) for v in values] for k, values in swept]):
        suffix = "@" + ",".join(f"{k}={_fmt(v)}" for k, v in point) if point else ""
        out.append((suffix, {**fixed, **dict(point)}, tuple(point)))
    return out


def expand_runs(objectives, data_overrides, runs, dpo_lr=None, dpo_batch_size=None) -> list[Run]:
    """Every run, parents before children. `runs` are mappings (or objects with the run
    fields); errors name the offending key, e.g. `train.runs[2].init`."""
    out: list[Run] = []
    for obj in objectives:
        hyper = {}
        if obj == "dpo":
            hyper = {k: v for k, v in (("lr", dpo_lr), ("batch_size", dpo_batch_size)) if v is not None}
        data = (data_overrides or {}).get(obj) or DEFAULT_DATA[obj]
        out.append(Run(obj, obj, data, "base", "base" if obj in REFERENCE_OBJECTIVES else None, hyper, obj))
    expanded: dict[str, list[Run]] = {r.name: [r] for r in out}  # spec name -> its runs
    for i, spec in enumerate(runs or ()):
        spec = spec if isinstance(spec, dict) else spec.model_dump()
        where = f"train.runs[{i}]"
        objective = spec["objective"]
        base_name = spec.get("name") or objective
        if base_name in expanded:
            raise RecipeError(f"{where}.name", f"{base_name!r} is already a run name")
        data = spec.get("data") or DEFAULT_DATA[objective]
        inits = spec.get("init") or "base"
        inits = [inits] if isinstance(inits, str) else list(inits)
        parents = []
        for init in inits:
            if init != "base" and init not in expanded:
                raise RecipeError(f"{where}.init", f"{init!r} is not an earlier run (runs: {', '.join(expanded) or 'none'})")
            parents += [None] if init == "base" else expanded[init]
        wants_reference = objective in REFERENCE_OBJECTIVES or spec.get("diagnostics")
        members = []
        for parent in parents:
            for suffix, hyper, swept in _members(spec, where):
                name = base_name + suffix if parent is None else f"{parent.name}+{base_name}{suffix}"
                reference = None
                if wants_reference:
                    reference = "base" if parent is None or spec.get("reference") == "base" else parent.name
                members.append(Run(name, objective, data, parent.name if parent else "base", reference, hyper,
                                   base_name, swept))
        expanded[base_name] = members
        out += members
    names = [r.name for r in out]
    for n in names:
        if names.count(n) > 1:
            raise RecipeError("train.runs", f"two runs are named {n!r}")
    return out
