"""Reference stage: the frozen base model's per-token log-probs over the response tokens
of the training rows that need them (DPO pairs, f-divergence positives), computed once
by Ray Data actors and stored, so training never holds a second model."""
from __future__ import annotations

from pipeline.external import base_model_source

VERSION = 1


def run_reference(ctx):
    import ray

    from actors.reference import ReferenceScorer

    c = ctx.cfg
    model = base_model_source(ctx.stage.external["base_model"], ctx.store, ctx.log)
    files, stats = [], {}
    for kind in c.reference_sets:
        if kind == "gold":
            raise ValueError("reference log-probs on gold solutions are not supported yet; "
                             "use train.data.<objective>=positives")
        rows = ctx.store.read_rows(ctx.input_file("verify", f"{kind}.parquet"))
        targets = ["chosen", "rejected"] if kind == "pairs" else ["completion"]
        keys = ["prompt_id", "pair_idx" if kind == "pairs" else "sample_idx"]
        out_path = f"{ctx.work_dir}/{kind}.parquet"
        scored = []
        if rows:
            ds = ray.data.from_items([{k: r[k] for k in keys + ["prompt"] + targets} for r in rows])
            ds = ds.map_batches(ReferenceScorer, fn_constructor_args=(model, c.train.max_len, targets),
                                batch_size=64, concurrency=1, num_cpus=1, num_gpus=1 if c.train.use_gpu else None)
            scored = [{k: r[k] for k in keys + [f"ref_{t}" for t in targets]} for r in ds.iter_rows()]
        for r in scored:
            for t in targets:
                r[f"ref_{t}"] = [float(x) for x in r[f"ref_{t}"]]
        ctx.store.write_rows(out_path, scored)
        files.append(out_path)
        stats[kind] = len(scored)
        ctx.log(f"  reference log-probs for {len(scored)} {kind} rows")
    return files, stats
