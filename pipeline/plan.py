"""The stage graph of a Config; it declares stages and runs none of them:

  prompts -> sample -> verify -> reference/<model> -> train/<run> -> eval/<model>/<benchmark> -> report

(train/<run> may also start from another run's model: a chain; pipeline/recipes.py.)
Each stage gets exactly the config entries its run function reads (they are its
identity, see pipeline/runner.py) and the digests of the external data it reads.
"""
from __future__ import annotations

from pathlib import Path

from pipeline import eval_stage, prompts_stage, reference_stage, report, sample_stage, train_stage, verify_stage
from pipeline.config import CONFIG_DIR, Config
from pipeline.external import base_model_external, benchmark_external, data_external
from pipeline.runner import Stage


def registry_path(cfg: Config) -> str:
    p = Path(cfg.eval.registry)
    return str(p if p.is_absolute() else CONFIG_DIR / p)


def eval_models(cfg: Config) -> list[str]:
    return list(cfg.eval.models) if cfg.eval.models is not None else ["base"] + [r.name for r in cfg.train_runs()]


def build_stages(cfg: Config) -> list[Stage]:
    base = base_model_external(cfg.model.base, cfg.run.seed)
    seed = cfg.run.seed
    stages = [
        Stage("prompts", prompts_stage.VERSION, {"data": cfg.data, "run.seed": seed}, [],
              prompts_stage.run_prompts, data_external(cfg.data.source, cfg.source_file)),
        Stage("sample", sample_stage.VERSION, {"sample": cfg.sample, "model": cfg.model, "run.seed": seed},
              ["prompts"], sample_stage.run_sample, {"base_model": base}),
        Stage("verify", verify_stage.VERSION, {"verify": cfg.verify, "sample.n": cfg.sample.n},
              ["prompts", "sample"], verify_stage.run_verify_stage, logs=verify_stage.LOGS),
    ]
    runs = cfg.train_runs()
    ref_sets: dict[str, set] = {}  # reference model ("base" or a run) -> the data kinds scored with it
    for r in runs:
        if r.reference:
            ref_sets.setdefault(r.reference, set()).add(r.data)
    if "base" in ref_sets:
        stages.append(_reference_stage(cfg, "base", ref_sets["base"], base))
    for r in runs:
        stages.append(_train_stage(cfg, r, base))
        if r.name in ref_sets:  # a chain child's reference: this run's model
            stages.append(_reference_stage(cfg, r.name, ref_sets[r.name], base))
    evals = []
    for model in eval_models(cfg):
        names = [f"eval/{model}/{b}" for b in cfg.eval.benchmarks]
        for i, bench in enumerate(cfg.eval.benchmarks):
            # A model's benchmarks run one after another: the first samples them all with one
            # engine start-up (the later ones then only judge).
            evals.append(_eval_stage(cfg, model, bench, base, later=names[i + 1:], after=names[i - 1:i]))
    stages += evals
    if evals:
        trained = [f"train/{r.name}" for r in runs]
        config = {"report.models": eval_models(cfg), "report.benchmarks": list(cfg.eval.benchmarks),
                  "report.runs": [{"name": r.name, "objective": r.objective, "init": r.init, "family": r.family,
                                   "swept": [list(p) for p in r.swept]} for r in runs],
                  "eval.n": cfg.eval.n, "train.max_len": cfg.train.max_len, "train.use_gpu": cfg.train.use_gpu}
        stages.append(Stage("report", report.VERSION, config, ["verify", *trained, *[s.name for s in evals]],
                            report.run_report, {"base_model": base}))
    return stages


def _reference_stage(cfg: Config, model: str, kinds: set, base: dict) -> Stage:
    """Per-token log-probs of `model` (the base or a run's export) on the data kinds its
    reference-based runs train on."""
    kinds = sorted(kinds)
    config = {"reference_model": model, "reference_sets": kinds, "train.max_len": cfg.train.max_len,
              "train.use_gpu": cfg.train.use_gpu}
    inputs = []
    if "gold" in kinds:
        config["sample.template"] = cfg.sample.template
        inputs.append("prompts")
    if set(kinds) - {"gold"}:
        inputs.append("verify")
    external = {"base_model": base} if model == "base" else {}
    if model != "base":
        inputs.append(f"train/{model}")
    return Stage(f"reference/{model}", reference_stage.VERSION, config, inputs, reference_stage.run_reference,
                 external)


def _train_stage(cfg: Config, run, base: dict) -> Stage:
    """One training run: its effective hyper-parameters (the train section under the
    run's own), and nothing about other runs (beta only where a reference is read)."""
    lr_beta = {"beta": run.hyper.get("beta", cfg.train.beta) if run.reference else None}
    effective = cfg.train.model_copy(update={"objectives": (run.objective,), "runs": (), "data": None,
                                             "dpo_lr": None, "dpo_batch_size": None, **run.hyper, **lr_beta})
    config = {"train": effective, "objective": run.objective, "data": run.data, "init": run.init,
              "reference": run.reference, "run.seed": cfg.run.seed}
    if run.data == "gold":
        config["sample.template"] = cfg.sample.template
    inputs = ["prompts"] if run.data == "gold" else ["verify"]
    if run.reference:
        inputs.append(f"reference/{run.reference}")
    if run.init != "base":
        inputs.append(f"train/{run.init}")
    external = {"base_model": base} if run.init == "base" else {}
    return Stage(f"train/{run.name}", train_stage.VERSION, config, inputs, train_stage.run_train, external,
                 logs=train_stage.LOGS)


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

    return Stage(f"eval/{model}/{bench}", eval_stage.VERSION, config, inputs, run, external, after,
                 logs=eval_stage.LOGS)
