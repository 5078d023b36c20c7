"""The pipeline as a list of stages built from a Config:

  prompts -> sample -> verify -> reference -> train/<objective> -> eval/<model>/<benchmark> -> report
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline import toy_task
from pipeline.config import CONFIG_DIR, Config
from pipeline.runner import Stage, StageContext, stage_work_dir

STAGE_ORDER = ("prompts", "sample", "verify", "reference", "train", "eval", "report")


def base_model_identity(cfg: Config) -> dict:
    if cfg.model.base == "toy":
        from pipeline.toy_model import toy_model_dir

        return {"base": "toy", "build": toy_model_dir(cfg.run.seed).name}
    return {"base": cfg.model.base}


def base_model_path(cfg: Config, log=print) -> str:
    """Where transformers and vLLM load the base model from: the toy build (made here,
    cached) or the HF hub id / local path the config names."""
    if cfg.model.base == "toy":
        from pipeline.toy_model import ensure_toy_model

        return str(ensure_toy_model(cfg.run.seed, log=log))
    return cfg.model.base


def _section(obj, drop=()) -> dict:
    d = dataclasses.asdict(obj)
    for k in drop:
        d.pop(k, None)
    return d


def load_prompt_rows(cfg: Config) -> tuple[list[dict], dict]:
    if cfg.data.source is None:
        problems = toy_task.make_problems("train", cfg.data.toy_count, seed=cfg.run.seed)
        rows = [toy_task.prompt_row(p) for p in problems]
        return rows, {"rows": len(rows), "source": toy_task.SOURCE}
    from pipeline.sources import SourceSpec, load_problems

    spec = SourceSpec.from_dict(cfg.data.source, where=f"{cfg.source_file}: data.source")
    return load_problems(spec, base_dir=Path(cfg.source_file).parent)


def build_stages(cfg: Config, log=print) -> list[Stage]:
    model_id = base_model_identity(cfg)
    stages = [
        Stage("prompts", {"data": _section(cfg.data), "seed": cfg.run.seed}, [], lambda ctx: _run_prompts(ctx, cfg)),
        Stage("sample", {"sample": _section(cfg.sample), "model": model_id, "seed": cfg.run.seed}, ["prompts"],
              lambda ctx: _run_sample(ctx, cfg, log)),
        Stage("verify", {"verify": _section(cfg.verify, drop=("num_tasks",))}, ["prompts", "sample"],
              lambda ctx: _run_verify(ctx, cfg, log)),
    ]
    ref_sets = reference_sets(cfg)
    if ref_sets:
        stages.append(Stage("reference", {"model": model_id, "max_len": cfg.train.max_len, "sets": ref_sets},
                            ["verify"], lambda ctx: _run_reference(ctx, cfg, ref_sets, log)))
    for obj in cfg.train.objectives:
        stages.append(_train_stage(cfg, obj, model_id, log))
    evals = []
    for m in eval_models(cfg):
        group: dict[str, Stage] = {}  # one model's benchmarks: they share one engine start-up
        for b in cfg.eval.benchmarks:
            group[b] = _eval_stage(cfg, m, b, model_id, group, log)
        evals += group.values()
    stages += evals
    if evals:
        inputs = ["verify"] + [f"train/{o}" for o in cfg.train.objectives] + [s.name for s in evals]
        stages.append(Stage("report", {"report_version": 1}, inputs, lambda ctx: _run_report(ctx, cfg, log)))
    return stages


def eval_models(cfg: Config) -> list[str]:
    models = cfg.eval.models if cfg.eval.models is not None else ["base"] + list(cfg.train.objectives)
    for m in models:
        if m != "base" and m not in cfg.train.objectives:
            raise ValueError(f"eval.models lists {m!r}, which is neither 'base' nor one of train.objectives")
    return models


def registry_path(cfg: Config) -> str:
    p = Path(cfg.eval.registry)
    return str(p if p.is_absolute() else CONFIG_DIR / p)


def _eval_stage(cfg: Config, model: str, bench: str, model_id: dict, group: dict, log) -> Stage:
    config = {"benchmark": _registry_entry(cfg, bench), "eval": _section(cfg.eval, drop=("benchmarks", "models", "registry")),
              "seed": cfg.run.seed, "model": model_id if model == "base" else model}
    inputs = [] if model == "base" else [f"train/{model}"]
    return Stage(f"eval/{model}/{bench}", config, inputs, lambda ctx: _run_eval(ctx, cfg, model, bench, group, log))


def _registry_entry(cfg: Config, bench: str) -> dict:
    """The benchmark's registry entry (validated now, so a typo fails before any work)."""
    import dataclasses

    from pipeline.sources import SourceError, load_benchmark_registry

    registry = load_benchmark_registry(registry_path(cfg))
    if bench not in registry:
        raise SourceError(f"eval.benchmarks: {bench!r} is not in {registry_path(cfg)} "
                          f"(known: {', '.join(sorted(registry))})")
    spec, template = registry[bench]
    return {**dataclasses.asdict(spec), "template": template}


def model_path_for(ctx: StageContext, cfg: Config, model: str, log) -> str:
    if model == "base":
        return base_model_path(cfg, log)
    return local_model_dir(ctx.store, model_dir(ctx.upstream[f"train/{model}"]))


def model_dir(train_manifest: dict) -> str:
    f = next(f for f in train_manifest["files"] if f.endswith("/model/config.json"))
    return f.rsplit("/", 1)[0]


def local_model_dir(store, rel: str) -> str:
    """vLLM and transformers load from a local directory: object-store models are
    copied to the local cache first (once, keyed by path)."""
    from actors.store import is_remote

    if not is_remote(store.uri):
        return store.path(rel)
    import hashlib

    from pipeline.toy_model import cache_root

    dest = cache_root() / "models" / hashlib.sha1(store.full_uri(rel).encode()).hexdigest()[:16]
    if not (dest / "config.json").exists():
        dest.mkdir(parents=True, exist_ok=True)
        for f in store.list_files(rel):
            (dest / f.rsplit("/", 1)[1]).write_bytes(store.read_bytes(f))
    return str(dest)


def _run_eval(ctx: StageContext, cfg: Config, model: str, bench: str, group: dict, log):
    """Evaluate one (model, benchmark). The model's later benchmarks that this invocation
    runs too are sampled now, into their own stages' block directories, by the same
    engines: each later stage then finds its blocks present and only judges them."""
    from pipeline.eval_stage import load_benchmark, run_eval
    from pipeline.sample_stage import SampleJob

    def problems_of(name: str) -> tuple[list[dict], str]:
        problems, template, _ = load_benchmark(name, registry_path(cfg), cfg.eval.limit, cfg.run.seed)
        return problems, template

    names = list(group)
    later = [SampleJob(f"{stage_work_dir(group[b])}/blocks", *problems_of(b))
             for b in names[names.index(bench) + 1:] if group[b].name in ctx.scheduled]
    return run_eval(ctx.store, ctx.work_dir, *problems_of(bench), model_path_for(ctx, cfg, model, log), cfg, log,
                    later)


def _run_report(ctx: StageContext, cfg: Config, log):
    from pipeline.report import write_report

    return write_report(ctx.store, ctx.work_dir, cfg, log=log)


def reference_sets(cfg: Config) -> list[str]:
    from actors.objectives import OBJECTIVE_SPECS
    from pipeline.train_stage import data_kind

    return sorted({data_kind(o, cfg.train.data) for o in cfg.train.objectives if OBJECTIVE_SPECS[o].needs_reference})


def _train_stage(cfg: Config, objective: str, model_id: dict, log) -> Stage:
    from actors.objectives import OBJECTIVE_SPECS
    from pipeline.train_stage import data_kind, lr_and_batch

    kind = data_kind(objective, cfg.train.data)
    needs_ref = OBJECTIVE_SPECS[objective].needs_reference
    inputs = ["prompts"] if kind == "gold" else ["verify"]
    if needs_ref:
        inputs.append("reference")
    train_cfg = _section(cfg.train, drop=("objectives", "data", "dpo_lr", "dpo_batch_size", "max_failures"))
    # The lr / batch this objective trains with (DPO's own ones only change DPO's fingerprint).
    train_cfg["lr"], train_cfg["batch_size"] = lr_and_batch(cfg.train, objective)
    config = {"objective": objective, "data": kind, "train": train_cfg, "model": model_id,
              "seed": cfg.run.seed, "template": cfg.sample.template if kind == "gold" else None}
    return Stage(f"train/{objective}", config, inputs, lambda ctx: _run_train(ctx, cfg, objective, kind, log))


def _run_reference(ctx: StageContext, cfg: Config, sets: list[str], log):
    import ray

    from actors.reference import ReferenceScorer

    model = base_model_path(cfg, log)
    files, stats = [], {}
    for kind in sets:
        if kind == "gold":
            raise ValueError("reference log-probs on gold solutions are not supported yet; "
                             "use train.data.<objective>=positives")
        rows = ctx.store.read_rows(manifest_file(ctx, "verify", f"{kind}.parquet"))
        targets = ["chosen", "rejected"] if kind == "pairs" else ["completion"]
        keys = ["prompt_id", "pair_idx" if kind == "pairs" else "sample_idx"]
        out_path = f"{ctx.work_dir}/{kind}.parquet"
        if rows:
            ds = ray.data.from_items([{k: r[k] for k in keys + ["prompt"] + targets} for r in rows])
            ds = ds.map_batches(ReferenceScorer, fn_constructor_args=(model, cfg.train.max_len, targets),
                                batch_size=64, concurrency=1, num_cpus=1,
                                num_gpus=1 if cfg.train.use_gpu else None)
            scored = [{k: r[k] for k in keys + [f"ref_{t}" for t in targets]} for r in ds.iter_rows()]
        else:
            scored = []
        for r in scored:
            for t in targets:
                r[f"ref_{t}"] = [float(x) for x in r[f"ref_{t}"]]
        ctx.store.write_rows(out_path, scored)
        files.append(out_path)
        stats[kind] = len(scored)
        log(f"  reference log-probs for {len(scored)} {kind} rows")
    return files, stats


def _run_train(ctx: StageContext, cfg: Config, objective: str, kind: str, log):
    from pipeline.train_stage import check_not_empty, loop_config, run_with_ray_train

    if kind == "gold":
        data_file = manifest_file(ctx, "prompts", "prompts.parquet")
        stats = None
    else:
        data_file = manifest_file(ctx, "verify", f"{kind}.parquet")
        stats = ctx.upstream["verify"].get("stats")
    rows = check_not_empty(ctx.store, data_file, kind, stats)
    ref_file = manifest_file(ctx, "reference", f"{kind}.parquet") if "reference" in ctx.stage.inputs else None
    export_dir = f"{ctx.work_dir}/model"
    loop_cfg = loop_config(cfg, objective, ctx.store, data_file, kind, ref_file, base_model_path(cfg, log),
                           export_dir)
    loop_cfg["metrics_file"] = f"{ctx.work_dir}/metrics.jsonl"
    loop_cfg.update(cfg_test_hooks(cfg))
    log(f"  training {objective} on {rows} {kind} rows with {cfg.train.num_workers} workers")
    run_with_ray_train(loop_cfg, cfg.train.num_workers, cfg.train.use_gpu,
                       ctx.store.full_uri(ctx.work_dir, "ray"), cfg.train.max_failures, log)
    files = (ctx.store.list_files(export_dir) + [loop_cfg["metrics_file"]]
             + ctx.store.list_files(f"{ctx.work_dir}/tensorboard"))
    history = [l for l in ctx.store.read_bytes(loop_cfg["metrics_file"]).decode().splitlines() if l]
    import json

    last = json.loads(history[-1]) if history else {}
    return files, {"steps": len(history), "final": last, "rows": rows}


def cfg_test_hooks(cfg: Config) -> dict:
    """Fault injection for tests (VERIFINE_KILL_WORKER_AT=step:rank:marker); never set by users."""
    import os

    spec = os.environ.get("VERIFINE_KILL_WORKER_AT")
    if not spec:
        return {}
    step, rank, marker = spec.split(":", 2)
    return {"kill_worker_at": {"step": int(step), "rank": int(rank), "marker": marker}}


def _run_prompts(ctx: StageContext, cfg: Config):
    rows, stats = load_prompt_rows(cfg)
    path = f"{ctx.work_dir}/prompts.parquet"
    ctx.store.write_rows(path, rows)
    return [path], stats


def manifest_files(ctx: StageContext, stage: str, suffix: str = ".parquet") -> list[str]:
    return [f for f in ctx.upstream[stage]["files"] if f.endswith(suffix)]


def manifest_file(ctx: StageContext, stage: str, name: str) -> str:
    matches = [f for f in ctx.upstream[stage]["files"] if f.endswith("/" + name)]
    if not matches:
        raise FileNotFoundError(f"stage {stage} has no {name} in its manifest")
    return matches[0]


def _run_sample(ctx: StageContext, cfg: Config, log):
    from actors.sampler import EngineSpec
    from pipeline.sample_stage import sample_blocks

    problems = ctx.store.read_rows(manifest_file(ctx, "prompts", "prompts.parquet"))
    model = base_model_path(cfg, log)
    s = cfg.sample
    spec = EngineSpec(model=model, n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
                      seed=cfg.run.seed, tensor_parallel=max(1, s.gpus_per_engine),
                      gpu_memory_utilization=s.gpu_memory_utilization, max_model_len=s.max_model_len,
                      dtype=cfg.model.dtype)
    return sample_blocks(ctx.store, ctx.work_dir, problems, model, s.template, spec, s.num_engines,
                         s.gpus_per_engine, s.block_size, log)


def _run_verify(ctx: StageContext, cfg: Config, log):
    from pipeline.verify_stage import run_verify

    prompts = ctx.store.read_rows(manifest_file(ctx, "prompts", "prompts.parquet"))
    samples = ctx.store.read_rows(*manifest_files(ctx, "sample"))
    golds = {p["prompt_id"]: p["gold"] for p in prompts}
    return run_verify(ctx.store, ctx.work_dir, samples, golds, cfg.sample.n, cfg.verify, log)
