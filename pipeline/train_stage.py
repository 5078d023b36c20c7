"""Train stage: one objective on the verified data (or gold solutions), as a Ray Train
TorchTrainer with DeepSpeed on N workers; the per-worker loop is actors/train_loop.py.
Checkpoints every K steps; a dead worker restarts from the last one (FailureConfig), and
re-running the stage after the driver died resumes from the same storage."""
from __future__ import annotations

import json

from actors.train_loop import train_loop
from actors.model_source import store_model_source
from pipeline.external import base_model_source

VERSION = 1


def check_not_empty(store, data_file: str, kind: str, verify_stats: dict | None) -> int:
    rows = store.read_table(data_file).num_rows
    if rows == 0:
        why = ""
        if verify_stats:
            why = (f" (verify stats: {verify_stats.get('verdicts')}, pass@1 {verify_stats.get('pass_at_1', 0):.3f}, "
                   f"prompts all-correct {verify_stats.get('prompts_all_correct', 0):.2f} / all-wrong "
                   f"{verify_stats.get('prompts_all_wrong', 0):.2f})")
        hint = ("pairs need prompts with both a correct and an incorrect sample" if kind == "pairs"
                else "positives need at least one verified-correct, untruncated sample")
        raise ValueError(f"the {kind} set {data_file} is empty: {hint}{why}; nothing to train on")
    return rows


def loop_config(c, store, data_file: str, reference_file: str | None, model_path: str, export_dir: str) -> dict:
    """The per-worker loop's settings, from the stage's config view `c`."""
    t = c.train
    return {
        "objective": c.objective, "data": c.data, "data_file": data_file, "reference_file": reference_file,
        "store_uri": store.uri, "model_path": model_path, "export_dir": export_dir,
        "template": c.sample.template if c.data == "gold" else None, "seed": c.run.seed, "lr": t.lr,
        "batch_size": t.batch_size, "micro_batch_tokens": t.micro_batch_tokens, "epochs": t.epochs,
        "max_len": t.max_len, "warmup_ratio": t.warmup_ratio, "weight_decay": t.weight_decay,
        "grad_clip": t.grad_clip, "beta": t.beta, "zero_stage": t.zero_stage, "precision": t.precision,
        "optimizer": t.optimizer, "checkpoint_every": t.checkpoint_every, "report_every": t.report_every,
        "use_gpu": t.use_gpu, "logprob_chunk_tokens": t.logprob_chunk_tokens,
        "gradient_checkpointing": t.gradient_checkpointing,
    }


def run_train(ctx):
    c = ctx.cfg
    if c.data == "gold":
        data_file, stats = ctx.input_file("prompts", "prompts.parquet"), None
    else:
        data_file, stats = ctx.input_file("verify", f"{c.data}.parquet"), ctx.upstream["verify"].get("stats")
    rows = check_not_empty(ctx.store, data_file, c.data, stats)
    ref_file = ctx.input_file(f"reference/{c.reference}", f"{c.data}.parquet") if c.reference else None
    export_dir = f"{ctx.work_dir}/model"
    if c.init == "base":
        model = base_model_source(ctx.stage.external["base_model"], ctx.store, ctx.log)
    else:  # a chain: start from the parent run's exported model
        model = store_model_source(ctx.store.uri, ctx.upstream[f"train/{c.init}"])
    loop_cfg = loop_config(c, ctx.store, data_file, ref_file, model, export_dir)
    loop_cfg["metrics_file"] = f"{ctx.work_dir}/metrics.jsonl"
    loop_cfg.update(test_hooks())
    ctx.log(f"  training {c.objective} on {rows} {c.data} rows from {c.init} with {c.train.num_workers} workers"
            + (f", reference {c.reference}" if c.reference else ""))
    run_with_ray_train(loop_cfg, c.train.num_workers, c.train.use_gpu, ctx.store.full_uri(ctx.work_dir, "ray"),
                       c.train.max_failures, ctx.log)
    files = (ctx.store.list_files(export_dir) + [loop_cfg["metrics_file"]]
             + ctx.store.list_files(f"{ctx.work_dir}/tensorboard"))
    history = [l for l in ctx.store.read_bytes(loop_cfg["metrics_file"]).decode().splitlines() if l]
    last = json.loads(history[-1]) if history else {}
    return files, {"steps": len(history), "final": last, "rows": rows}


def test_hooks() -> dict:
    """Fault injection for tests (VERIFINE_KILL_WORKER_AT=step:rank:marker); never set by users."""
    import os

    spec = os.environ.get("VERIFINE_KILL_WORKER_AT")
    if not spec:
        return {}
    step, rank, marker = spec.split(":", 2)
    return {"kill_worker_at": {"step": int(step), "rank": int(rank), "marker": marker}}


def run_with_ray_train(loop_cfg: dict, num_workers: int, use_gpu: bool, storage_uri: str, max_failures: int,
                       log=print) -> list[dict]:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        train_loop_per_worker=_ray_worker_entry,
        train_loop_config={**loop_cfg, "in_ray": True},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name="ray-train", storage_path=storage_uri,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return result.metrics


def _ray_worker_entry(config: dict) -> None:
    train_loop(config)

