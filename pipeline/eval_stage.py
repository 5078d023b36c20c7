"""Eval stage, one per (model, benchmark): the same vLLM sampler and verifier as the
sample/verify stages, `eval.n` samples per problem, stored per sample and summarised
(avg@n with a bootstrap CI over problems, pass@k, response length, truncation)."""
from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

from actors.sampler import PROMPT_TOO_LONG
from pipeline import toy_task
from pipeline.metrics import summarize

TOY_PREFIX = "toy:"


VERSION = 2  # 2: the sampler's stop tokens and skipped over-long prompts; summary counts skipped prompts
# judged.parquet summarised, plus how the sampling went (times, resumed blocks): not hashed by the report.
LOGS = ("summary.json",)
# Engine settings of the sample section that eval uses too (they change eval's outputs).
ENGINE_KEYS = ("max_model_len", "block_size", "gpus_per_engine", "num_engines", "gpu_memory_utilization", "kv_cache_gib",
               "stop")


def registry_entry(registry_path: str, name: str) -> dict:
    """A benchmark's registry entry as a plain dict (source fields + template); a name not
    in the registry fails now, before any work."""
    from pipeline.sources import SourceError, load_benchmark_registry

    registry = load_benchmark_registry(registry_path)
    if name not in registry:
        raise SourceError(f"eval.benchmarks: {name!r} is not in the registry {registry_path} "
                          f"(known: {', '.join(sorted(registry))})")
    spec, template = registry[name]
    return {**spec.model_dump(mode="json"), "template": template}


def load_benchmark(entry: dict, limit: int | None, seed: int, location: str | None) -> list[dict]:
    """The problems of a registry entry (at most `limit`, and at most the entry's own limit)."""
    from pipeline.sources import SourceSpec, load_problems

    limits = [x for x in (limit, entry.get("limit")) if x is not None]
    count = min(limits) if limits else None
    if entry["path"].startswith(TOY_PREFIX):
        split = entry["path"][len(TOY_PREFIX):]
        return [toy_task.prompt_row(p, entry["name"]) for p in toy_task.make_problems(split, count or 200, seed=seed)]
    spec = SourceSpec.from_dict({k: v for k, v in entry.items() if k != "template"} | {"path": location},
                                where=f"benchmark {entry['name']}")
    problems, _ = load_problems(spec)
    return problems[:count] if count else problems


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
    # Prompts with no room to generate within the engine's context (actors/sampler.py): their
    # samples are scored wrong, so the problem count, and the scores, stay comparable.
    skipped = [p for p, rs in zip(pids, rows) if rs and rs[0]["finish_reason"] == PROMPT_TOO_LONG]
    summary["prompts_skipped_too_long"] = len(skipped)
    summary["skipped_prompt_ids"] = skipped
    return summary


def run_eval_stage(ctx, later: list[str]):
    """Evaluate one (model, benchmark). The model's later benchmarks that this invocation
    runs too are sampled now by the same engines, into their own stages' work dirs (each
    prepared by the runner first); each later stage then finds its blocks present and
    only judges them."""
    from actors.model_source import store_model_source
    from pipeline.external import base_model_source
    from pipeline.runner import ConfigView

    c = ctx.cfg
    if c.model_name == "base":
        model = base_model_source(ctx.stage.external["base_model"], ctx.store, ctx.log)
    else:
        model = store_model_source(ctx.store.uri, ctx.upstream[f"train/{c.model_name}"])
    jobs = [_sample_job(c, ctx.stage, f"{ctx.work_dir}/blocks")]
    for name in later:
        work_dir = ctx.claim(name)
        if work_dir is not None:
            other = ctx.runner.by_name[name]
            jobs.append(_sample_job(ConfigView(other.config, name), other, f"{work_dir}/blocks"))
    if len(jobs) > 1:
        ctx.log(f"  sampling {len(jobs) - 1} more benchmark(s) of this model with the same engines")
    return run_eval(ctx, jobs, model)


def _sample_job(c, stage, blocks_dir: str):
    from pipeline.sample_stage import SampleJob

    location = stage.external["benchmark_data"]["location"] if "benchmark_data" in stage.external else None
    return SampleJob(blocks_dir, load_benchmark(c.benchmark, c.eval.limit, c.run.seed, location),
                     c.benchmark["template"])


def run_eval(ctx, jobs: list, model_source):
    """Sample jobs[0] (and the later jobs of the same model, in one engine pool), then
    judge and summarise jobs[0]'s samples."""
    from pipeline.runner import kill_point
    from pipeline.sample_stage import engine_spec, sample_jobs
    from pipeline.verify_stage import judge_samples

    c = ctx.cfg
    e = c.eval
    spec = engine_spec(model_source, c.sample, c.model.dtype, c.run.seed, n=e.n, temperature=e.temperature,
                       top_p=e.top_p, max_tokens=e.max_tokens)
    blocks, sample_stats = sample_jobs(ctx.store, jobs, spec, c.sample.num_engines, c.sample.gpus_per_engine,
                                       c.sample.block_size, ctx.log,
                                       after_block=lambda: kill_point(f"{ctx.stage.name}:block"))
    problems = jobs[0].problems
    judge_start = time.time()
    samples = ctx.store.read_rows(*blocks[0])
    judged = judge_samples(samples, {p["prompt_id"]: p["gold"] for p in problems}, c.verify.num_tasks,
                           c.verify.deadline_s)
    summary = summarize_judged(judged, e.n)
    summary["sampling"] = sample_stats
    summary["judge_s"] = round(time.time() - judge_start, 2)
    files = [f"{ctx.work_dir}/judged.parquet", f"{ctx.work_dir}/summary.json"]
    ctx.store.write_rows(files[0], judged)
    ctx.store.write_json(files[1], summary)
    ctx.log(f"  avg@{e.n} {100 * summary['avg_at_n']:.1f} "
            f"[{100 * summary['avg_ci'][0]:.1f}, {100 * summary['avg_ci'][1]:.1f}] on {len(problems)} problems")
    return files, summary
