"""Train stage: one objective on the verified data (or gold solutions), as a Ray Train
TorchTrainer with DeepSpeed on N workers; the per-worker loop is actors/train_loop.py.
Checkpoints every K steps; a dead worker restarts from the last one (FailureConfig), and
re-running the stage after the driver died resumes from the same storage."""
from __future__ import annotations

import json

from actors.train_loop import train_loop
from actors.model_source import store_model_source
from pipeline.external import base_model_source
from pipeline.engine_pool import close_idle
from pipeline.ray_session import run_when_free, slot_resources, train_worker_resources

VERSION = 3  # 2: rows over max_len dropped and counted (not cut); gold solutions end with the end-of-turn token;
             # 3: fused AdamW (the same update up to float rounding)
# The per-step history and its TensorBoard copy: step times differ between runs that train
# the same model, so they stay out of what evaluations and the report hash (runner.Stage.logs).
LOGS = ("metrics.jsonl", "tensorboard/")


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
        "gradient_checkpointing": t.gradient_checkpointing, "compile": t.compile,
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
    threads = "" if c.train.use_gpu else f" x {c.train.cpus_per_worker} CPU"
    ctx.log(f"  training {c.objective} on {rows} {c.data} rows from {c.init} with {c.train.num_workers}{threads} "
            f"workers" + (f", reference {c.reference}" if c.reference else ""))
    memory = check_memory(model, c.train, c.objective == "dpo", ctx.log)
    run_with_ray_train(loop_cfg, c.train.num_workers, c.train.use_gpu, ctx.store.full_uri(ctx.work_dir, "ray"),
                       c.train.max_failures, ctx.log, cpus_per_worker=c.train.cpus_per_worker)
    files = (ctx.store.list_files(export_dir) + [loop_cfg["metrics_file"]]
             + ctx.store.list_files(f"{ctx.work_dir}/tensorboard"))
    history = [l for l in ctx.store.read_bytes(loop_cfg["metrics_file"]).decode().splitlines() if l]
    last = json.loads(history[-1]) if history else {}
    data = {k: last[k] for k in ("data_rows", "rows_used", "rows_dropped_too_long", "rows_dropped_empty") if k in last}
    if data.get("rows_dropped_too_long"):
        ctx.log(f"  {data['rows_dropped_too_long']} of {data['data_rows']} rows dropped: prompt + response "
                f"longer than train.max_len={c.train.max_len} tokens")
    return files, {"steps": len(history), "final": last, "rows": rows, **data, "memory_estimate": memory}


def test_hooks() -> dict:
    """Fault injection for tests (VERIFINE_KILL_WORKER_AT=step:rank:marker; VERIFINE_TEST_STEP_DELAY_S=s,
    a pause after each optimizer step so a test can stop the job mid-training); never set by users."""
    import os

    hooks = {"step_sleep_s": float(os.environ["VERIFINE_TEST_STEP_DELAY_S"])} \
        if os.environ.get("VERIFINE_TEST_STEP_DELAY_S") else {}
    spec = os.environ.get("VERIFINE_KILL_WORKER_AT")
    if not spec:
        return hooks
    step, rank, marker = spec.split(":", 2)
    return {**hooks, "kill_worker_at": {"step": int(step), "rank": int(rank), "marker": marker}}


def run_with_ray_train(loop_cfg: dict, num_workers: int, use_gpu: bool, storage_uri: str, max_failures: int,
                       log=print, cpus_per_worker: int = 1) -> list[dict]:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = train_worker_resources(use_gpu, cpus_per_worker)
    need = {k: num_workers * v for k, v in slot_resources(resources).items()}
    trainer = TorchTrainer(
        train_loop_per_worker=_ray_worker_entry,
        train_loop_config={**loop_cfg, "in_ray": True},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name="ray-train", storage_path=storage_uri,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    asked = f"train.num_workers={num_workers}" + ("" if use_gpu else f" x train.cpus_per_worker={cpus_per_worker}")
    result = run_when_free(trainer.fit, need, reclaim=close_idle, asked=asked)
    if result.error:
        raise result.error
    return result.metrics


def _ray_worker_entry(config: dict) -> None:
    train_loop(config)


# ----------------------------------------------------------------------------- memory
GIB = 1 << 30


def model_shape(model_source) -> dict | None:
    """Parameters and layer sizes of a model source, from its config alone (a model on the
    meta device: nothing is loaded); None when the config cannot be read (e.g. a hub id
    offline)."""
    import tempfile
    from pathlib import Path

    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        if isinstance(model_source, dict):  # a model in the run store: read its config.json only
            from actors.store import RunStore

            rel = next(r for r in model_source["files"] if r.endswith("/config.json"))
            with tempfile.TemporaryDirectory() as d:
                Path(d, "config.json").write_bytes(RunStore(model_source["store_uri"]).read_bytes(rel))
                config = AutoConfig.from_pretrained(d)
        else:
            config = AutoConfig.from_pretrained(model_source)
        with torch.device("meta"):
            params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return {"params": params, "hidden": text.hidden_size, "layers": text.num_hidden_layers,
                "intermediate": getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
                "vocab": text.vocab_size}
    except Exception:
        return None


def estimate_memory(shape: dict, t, pairs: bool, on_gpu: bool | None = None) -> dict:
    """Bytes one training worker holds at its peak, by part, for the train section `t`:
    weights, gradients and AdamW state as DeepSpeed keeps them under `t.zero_stage`
    (fp32, or bf16 weights/gradients with an fp32 master copy), and the activations of
    the largest micro-batch: `t.micro_batch_tokens` padded tokens (at least one whole
    row, max_len tokens; a DPO pair is two rows). A layer keeps about 8h + 4i values per
    token for backward (norms, q/k/v, attention output, the gated MLP's i-wide tensors;
    attention scores are not kept: SDPA / flash attention); with gradient checkpointing
    only each layer's input is kept, plus one layer's values while it is recomputed. Plus
    the chunked log-prob head (chunk x vocab, fp32). Each worker also loads one full fp32
    copy before DeepSpeed partitions it (`load_gib`). An estimate, not a measurement."""
    on_gpu = t.use_gpu if on_gpu is None else on_gpu
    bf16 = t.precision == "bf16" or (t.precision == "auto" and on_gpu)
    P, h, L, i, V = shape["params"], shape["hidden"], shape["layers"], shape["intermediate"], shape["vocab"]
    world, zero = t.num_workers, t.zero_stage
    act = 2 if bf16 else 4
    weights = (2 if bf16 else 4) * P / (world if zero >= 3 else 1)
    grads = (2 if bf16 else 4) * P / (world if zero >= 2 else 1)
    state = ((8 if t.optimizer == "adamw" else 0) + (4 if bf16 else 0)) * P / (world if zero >= 1 else 1)
    tokens = max(t.micro_batch_tokens, t.max_len * (2 if pairs else 1))
    per_layer = tokens * (8 * h + 4 * i) * act
    activations = (L * tokens * h * act + per_layer) if t.gradient_checkpointing else L * per_layer
    head = 3 * 4 * min(t.logprob_chunk_tokens, tokens) * V  # logits, softmax and their gradient, fp32
    parts = {"weights": weights, "gradients": grads, "optimizer": state, "activations": activations + head}
    total = sum(parts.values())
    return {**{k: round(v / GIB, 3) for k, v in parts.items()}, "total_gib": round(total / GIB, 3),
            "load_gib": round(4 * P / GIB, 3), "micro_batch_tokens": tokens, "params": P,
            "zero_stage": zero, "gradient_checkpointing": t.gradient_checkpointing, "bf16": bf16}


def ray_worker_memory(num_workers: int, worker_resources: dict) -> tuple[float | None, str]:
    """Memory Ray reports for one training worker (GiB): the largest alive node's `memory`
    resource shared by the workers it holds (Ray Train packs them), as many as its GPUs or
    CPUs fit of `worker_resources` (train_worker_resources). GPU memory is not a Ray
    resource: on GPUs this is host memory only."""
    try:
        import ray

        nodes = [n for n in ray.nodes() if n.get("Alive")]
        best = max(nodes, key=lambda n: n["Resources"].get("memory", 0))
        slots = min(best["Resources"].get(k, 0) // v for k, v in slot_resources(worker_resources).items())
        per_node = max(1, min(num_workers, int(slots)))
        return best["Resources"].get("memory", 0) / per_node / GIB, f"{per_node} worker(s) on the largest node"
    except Exception:
        return None, "Ray reported no node memory"


def check_memory(model_source, t, pairs: bool, log=print) -> dict | None:
    """Log the per-worker memory estimate before training; warn when it exceeds what Ray
    reports for a worker. Never stops the run: the estimate is an estimate."""
    shape = model_shape(model_source)
    if shape is None:
        log("  memory estimate skipped: the model's config could not be read")
        return None
    est = estimate_memory(shape, t, pairs)
    log(f"  memory per worker (estimate): {est['total_gib']:.2f} GiB = weights {est['weights']:.2f} + gradients "
        f"{est['gradients']:.2f} + optimizer {est['optimizer']:.2f} (ZeRO-{est['zero_stage']}) + activations "
        f"{est['activations']:.2f} ({est['micro_batch_tokens']} tokens, gradient checkpointing "
        f"{'on' if est['gradient_checkpointing'] else 'off'}); loading needs {est['load_gib']:.2f} GiB first")
    have, where = ray_worker_memory(t.num_workers, train_worker_resources(t.use_gpu, t.cpus_per_worker))
    est["ray_worker_gib"] = None if have is None else round(have, 3)
    need = max(est["total_gib"], est["load_gib"])
    if have is not None and need > have:
        est["warning"] = (f"estimated {need:.2f} GiB per worker exceeds the {have:.2f} GiB Ray reports "
                          f"({where}): lower train.micro_batch_tokens, set train.gradient_checkpointing=true, "
                          f"raise train.zero_stage or add workers")
        log(f"  WARNING: {est['warning']}")
    elif t.use_gpu:
        log("  (GPU memory is not a Ray resource: compare the estimate with your GPUs' memory)")
    return est
