"""Prompts stage: the problems to sample, from a local file, an HF hub dataset or the
toy task, as rows {prompt_id, problem, gold, source, solution}."""
from __future__ import annotations

from pipeline import toy_task

VERSION = 1


def load_prompt_rows(data, seed: int, data_location: str | None) -> tuple[list[dict], dict]:
    if data.source is None:
        problems = toy_task.make_problems("train", data.toy_count, seed=seed)
        rows = [toy_task.prompt_row(p) for p in problems]
        return rows, {"rows": len(rows), "source": toy_task.SOURCE}
    from pipeline.sources import load_problems

    # The location was resolved (and content-hashed) when the stage was planned.
    return load_problems(data.source.model_copy(update={"path": data_location}))


def run_prompts(ctx):
    location = ctx.external_location("data") if "data" in ctx.stage.external else None
    rows, stats = load_prompt_rows(ctx.cfg.data, ctx.cfg.run.seed, location)
    path = f"{ctx.work_dir}/prompts.parquet"
    ctx.store.write_rows(path, rows)
    return [path], stats
