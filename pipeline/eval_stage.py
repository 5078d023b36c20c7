"""Eval stage, one per (model, benchmark): the same vLLM sampler and verifier as the
sample/verify stages, `eval.n` samples per problem, stored per sample and summarised
(avg@n with a bootstrap CI over problems, pass@k, response length, truncation)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from pipeline import toy_task
from pipeline.metrics import summarize

TOY_PREFIX = "toy:"


def load_benchmark(name: str, registry_path: str, limit: int | None, seed: int) -> tuple[list[dict], str, dict]:
    """(problems, prompt template, registry entry as a dict for fingerprinting)."""
    import dataclasses

    from pipeline.sources import SourceError, load_benchmark_registry, load_problems

    registry = load_benchmark_registry(registry_path)
    if name not in registry:
        raise SourceError(f"benchmark {name!r} is not in the registry {registry_path} "
                          f"(known: {', '.join(sorted(registry))})")
    spec, template = registry[name]
    count = min(x for x in (limit, spec.limit) if x is not None) if (limit or spec.limit) else None
    if spec.path.startswith(TOY_PREFIX):
        split = spec.path[len(TOY_PREFIX):]
        problems = [toy_task.prompt_row(p, spec.name) for p in toy_task.make_problems(split, count or 200, seed=seed)]
    else:
        problems, _ = load_problems(spec, base_dir=Path(registry_path).parent)
        problems = problems[:count] if count else problems
    return problems, template, {**dataclasses.asdict(spec), "template": template, "limit": count}


def summarize_judged(judged: list[dict], n: int) -> dict:
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    for r in judged:
        by_prompt[r["prompt_id"]].append(r)
    pids = sorted(by_prompt)
    rows = [sorted(by_prompt[p], key=lambda r: r["sample_idx"]) for p in pids]
    summary = summarize([[r["verdict"] == "correct" for r in rs] for rs in rows],
                        [[r["num_tokens"] for r in rs] for rs in rows],
                        [[r["finish_reason"] == "length" for r in rs] for rs in rows])
    summary["pass_at_k"] = {str(k): v for k, v in summary["pass_at_k"].items()}
    summary["avg_ci"] = list(summary["avg_ci"])
    summary["verdicts"] = {v: sum(r["verdict"] == v for r in judged) for v in sorted({r["verdict"] for r in judged})}
    return summary


def run_eval(store, work_dir: str, problems: list[dict], template: str, model_path: str, cfg, log=print,
             later_jobs=()):
    """Sample the problems (and any later_jobs of the same model, in one engine pool),
    then judge and summarise the problems' samples."""
    from actors.sampler import EngineSpec
    from pipeline.sample_stage import SampleJob, sample_jobs
    from pipeline.verify_stage import judge_samples

    e = cfg.eval
    spec = EngineSpec(model=model_path, n=e.n, temperature=e.temperature, top_p=e.top_p, max_tokens=e.max_tokens,
                      seed=cfg.run.seed, tensor_parallel=max(1, cfg.sample.gpus_per_engine),
                      gpu_memory_utilization=cfg.sample.gpu_memory_utilization,
                      max_model_len=cfg.sample.max_model_len, dtype=cfg.model.dtype)
    if later_jobs:
        log(f"  sampling {len(later_jobs)} more benchmark(s) of this model with the same engines")
    job = SampleJob(f"{work_dir}/blocks", problems, template)
    blocks, sample_stats = sample_jobs(store, [job, *later_jobs], model_path, spec, cfg.sample.num_engines,
                                       cfg.sample.gpus_per_engine, cfg.sample.block_size, log)
    samples = store.read_rows(*blocks[0])
    judged = judge_samples(samples, {p["prompt_id"]: p["gold"] for p in problems}, cfg.verify.num_tasks,
                           cfg.verify.deadline_s)
    summary = summarize_judged(judged, e.n)
    summary["sampling"] = sample_stats
    files = [f"{work_dir}/judged.parquet", f"{work_dir}/summary.json"]
    store.write_rows(files[0], judged)
    store.write_json(files[1], summary)
    log(f"  avg@{e.n} {100 * summary['avg_at_n']:.1f} "
        f"[{100 * summary['avg_ci'][0]:.1f}, {100 * summary['avg_ci'][1]:.1f}] on {len(problems)} problems")
    return files, summary
