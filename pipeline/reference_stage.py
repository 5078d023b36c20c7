"""Reference stage: the frozen base model's per-token log-probs over the response tokens
of the training rows that need them (DPO pairs, f-divergence positives, gold
demonstrations), computed once and stored, so training never holds a second model. One
scorer actor serves every data set of the stage: one process start-up and model load,
not one per set."""
from __future__ import annotations

from pipeline.external import base_model_source
from pipeline.ray_session import worker_remote_args

VERSION = 2  # 2: rows over max_len dropped (not cut); gold solutions end with the end-of-turn token


BATCH_ROWS = 64  # rows per call: the actor works through them while the next calls queue


def run_reference(ctx):
    import ray

    from actors.model_source import store_model_source
    from actors.reference import ReferenceScorer

    c = ctx.cfg
    if c.reference_model == "base":
        model = base_model_source(ctx.stage.external["base_model"], ctx.store, ctx.log)
    else:
        model = store_model_source(ctx.store.uri, ctx.upstream[f"train/{c.reference_model}"])
    sets = {kind: _rows_to_score(ctx, kind) for kind in c.reference_sets}
    if not any(items for items, _, _, _ in sets.values()):
        scorer = None
    else:
        scorer = ray.remote(ReferenceScorer).options(num_cpus=1, num_gpus=1 if c.train.use_gpu else 0,
                                                     **worker_remote_args()).remote(model, c.train.max_len)
    try:
        # Every set's calls are queued at once: the actor never waits on the driver.
        pending = {kind: [scorer.score_rows.remote(items[i:i + BATCH_ROWS], targets, template)
                          for i in range(0, len(items), BATCH_ROWS)]
                   for kind, (items, _, targets, template) in sets.items()}
        files, stats = [], {}
        for kind, (items, keys, _, _) in sets.items():
            scores = [s for part in ray.get(pending[kind]) for s in part]
            scored = [{**{k: row[k] for k in keys}, **s} for row, s in zip(items, scores)]
            out_path = f"{ctx.work_dir}/{kind}.parquet"
            ctx.store.write_rows(out_path, scored)
            files.append(out_path)
            stats[kind] = len(scored)
            ctx.log(f"  {c.reference_model} log-probs for {len(scored)} {kind} rows")
    finally:
        if scorer is not None:
            ray.kill(scorer)
    return files, stats


def _rows_to_score(ctx, kind: str) -> tuple[list[dict], list[str], list[str], str | None]:
    """(items, key columns, target columns, prompt template). Gold solutions are scored
    after the prompt the train loop renders for them (same template, same tokenizer), so
    their log-probs align token by token with the policy's; they are keyed sample_idx 0."""
    if kind == "gold":
        rows = ctx.store.read_rows(ctx.input_file("prompts", "prompts.parquet"))
        items = [{"prompt_id": r["prompt_id"], "sample_idx": 0, "problem": r["problem"], "completion": r["solution"]}
                 for r in rows if r.get("solution")]
        return items, ["prompt_id", "sample_idx"], ["completion"], ctx.cfg.sample.template
    rows = ctx.store.read_rows(ctx.input_file("verify", f"{kind}.parquet"))
    targets = ["chosen", "rejected"] if kind == "pairs" else ["completion"]
    keys = ["prompt_id", "pair_idx" if kind == "pairs" else "sample_idx"]
    return [{k: r[k] for k in keys + ["prompt"] + targets} for r in rows], keys, targets, None
