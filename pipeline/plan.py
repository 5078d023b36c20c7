"""The stage graph of a Config; it declares stages and runs none of them:

  prompts -> sample -> verify -> reference -> train/<objective> -> eval/<model>/<benchmark> -> report

Each stage gets exactly the config entries its run function reads (they are its
identity, see pipeline/runner.py) and the digests of the external data it reads.
"""
from __future__ import annotations

from pathlib import Path

from actors.objectives import OBJECTIVE_SPECS
from pipeline import eval_stage, prompts_stage, reference_stage, report, sample_stage, train_stage, verify_stage
from pipeline.config import CONFIG_DIR, Config
from pipeline.external import base_model_external, benchmark_external, data_external
from pipeline.runner import Stage



def registry_path(cfg: Config) -> str:
    p = Path(cfg.eval.registry)
    return str(p if p.is_absolute() else CONFIG_DIR / p)


def eval_models(cfg: Config) -> list[str]:
    return list(cfg.eval.models) if cfg.eval.models is not None else ["base"] + list(cfg.train.objectives)


def build_stages(cfg: Config) -> list[Stage]:
    base = base_model_external(cfg.model.base, cfg.run.seed)
    seed = cfg.run.seed
    stages = [
        Stage("prompts", prompts_stage.VERSION, {"data": cfg.data, "run.seed": seed}, [],
              prompts_stage.run_prompts, data_external(cfg.data.source, cfg.source_file)),
        Stage("sample", sample_stage.VERSION, {"sample": cfg.sample, "model": cfg.model, "run.seed": seed},
              ["prompts"], sample_stage.run_sample, {"base_model": base}),
        Stage("verify", verify_stage.VERSION, {"verify": cfg.verify, "sample.n": cfg.sample.n},
              ["prompts", "sample"], verify_stage.run_verify_stage),
    ]
    sets = reference_sets(cfg)
    if sets:
        config = {"reference_sets": sets, "train.max_len": cfg.train.max_len, "train.use_gpu": cfg.train.use_gpu}
        inputs = ["verify"]
        if "gold" in sets:
            config["sample.template"] = cfg.sample.template
            inputs = ["prompts", "verify"]
        stages.append(Stage("reference", reference_stage.VERSION, config, inputs, reference_stage.run_reference,
                            {"base_model": base}))
    for objective in cfg.train.objectives:
        stages.append(_train_stage(cfg, objective, base))
    evals = []
    for model in eval_models(cfg):
        names = [f"eval/{model}/{b}" for b in cfg.eval.benchmarks]
        for i, bench in enumerate(cfg.eval.benchmarks):
            # A model's benchmarks run one after another: the first samples them all with one
            # engine start-up (the later ones then only judge).
            evals.append(_eval_stage(cfg, model, bench, base, later=names[i + 1:], after=names[i - 1:i]))
    stages += evals
    if evals:
        trained = [f"train/{o}" for o in cfg.train.objectives]
        config = {"report.models": eval_models(cfg), "report.benchmarks": list(cfg.eval.benchmarks),
                  "eval.n": cfg.eval.n, "train.max_len": cfg.train.max_len, "train.use_gpu": cfg.train.use_gpu}
        stages.append(Stage("report", report.VERSION, config, ["verify", *trained, *[s.name for s in evals]],
                            report.run_report, {"base_model": base}))
    return stages


def reference_sets(cfg: Config) -> list[str]:
    return sorted({train_stage.data_kind(o, cfg.train.data) for o in cfg.train.objectives
                   if OBJECTIVE_SPECS[o].needs_reference})


def _train_stage(cfg: Config, objective: str, base: dict) -> Stage:
    kind = train_stage.data_kind(objective, cfg.train.data)
    lr, batch = train_stage.lr_and_batch(cfg.train, objective)
    spec = OBJECTIVE_SPECS[objective]
    # The hyper-parameters this objective trains with, and nothing about other objectives
    # (beta only where the loss reads it).
    effective = cfg.train.model_copy(update={"objectives": (objective,), "data": None, "lr": lr, "batch_size": batch,
                                             "dpo_lr": None, "dpo_batch_size": None,
                                             "beta": cfg.train.beta if spec.needs_reference else None})
    config = {"train": effective, "objective": objective, "data": kind, "run.seed": cfg.run.seed}
    if kind == "gold":
        config["sample.template"] = cfg.sample.template
    inputs = ["prompts"] if kind == "gold" else ["verify"]
    if spec.needs_reference:
        inputs.append("reference")
    return Stage(f"train/{objective}", train_stage.VERSION, config, inputs, train_stage.run_train,
                 {"base_model": base})


def _eval_stage(cfg: Config, model: str, bench: str, base: dict, later: list[str], after: list[str]) -> Stage:
    entry = eval_stage.registry_entry(registry_path(cfg), bench)
    config = {"eval": cfg.eval.model_copy(update={"benchmarks": (bench,), "models": None}),
              "benchmark": entry, "model_name": model, "run.seed": cfg.run.seed, "model.dtype": cfg.model.dtype,
              "verify.deadline_s": cfg.verify.deadline_s, "verify.num_tasks": cfg.verify.num_tasks,
              **{f"sample.{k}": getattr(cfg.sample, k) for k in eval_stage.ENGINE_KEYS}}
    external = benchmark_external(entry, registry_path(cfg))
    if model == "base":
        external["base_model"] = base
    inputs = [] if model == "base" else [f"train/{model}"]

    def run(ctx):
        return eval_stage.run_eval_stage(ctx, later)

    return Stage(f"eval/{model}/{bench}", eval_stage.VERSION, config, inputs, run, external, after)
