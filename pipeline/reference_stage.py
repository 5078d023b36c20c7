"""Reference stage: the frozen base model's per-token log-probs over the response tokens
of the training rows that need them (DPO pairs, f-divergence positives), computed once
by Ray Data actors and stored, so training never holds a second model."""
from __future__ import annotations

from pipeline.external import base_model_source
from pipeline.ray_session import worker_remote_args

VERSION = 2  # 2: rows over max_len dropped (not cut); gold solutions end with the end-of-turn token


def run_reference(ctx):
    import ray

    from actors.model_source import store_model_source
    from actors.reference import ReferenceScorer

    c = ctx.cfg
    if c.reference_model == "base":
        model = base_model_source(ctx.stage.external["base_model"], ctx.store, ctx.log)
    else:
        model = store_model_source(ctx.store.uri, ctx.upstream[f"train/{c.reference_model}"])
    files, stats = [], {}
    for kind in c.reference_sets:
        items, keys, targets, template = _rows_to_score(ctx, kind)
        out_path = f"{ctx.work_dir}/{kind}.parquet"
        scored = []
        if items:
            ds = ray.data.from_items(items)
            ds = ds.map_batches(ReferenceScorer, fn_constructor_args=(model, c.train.max_len, targets),
                                fn_constructor_kwargs={"template": template}, batch_size=64, concurrency=1,
                                num_cpus=1, num_gpus=1 if c.train.use_gpu else None, **worker_remote_args())
            scored = [{k: r[k] for k in keys + [f"ref_{t}" for t in targets]} for r in ds.iter_rows()]
        for r in scored:
            for t in targets:
                r[f"ref_{t}"] = [float(x) for x in r[f"ref_{t}"]]
        ctx.store.write_rows(out_path, scored)
        files.append(out_path)
        stats[kind] = len(scored)
        ctx.log(f"  {c.reference_model} log-probs for {len(scored)} {kind} rows")
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
