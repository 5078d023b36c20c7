"""The per-worker training loop: one plain function, run by Ray Train's TorchTrainer on
N workers, or alone in one process (how it is benchmarked on a lone GPU).

DeepSpeed ZeRO is the engine (gloo on CPU, nccl on GPU). Gradient accumulation is
unmanaged: each worker runs as many micro-batches as its share of the step needs (token
budget, length grouping), and every loss is divided by the *global* number of response
tokens (pairs for DPO) of the optimizer step, so 2 workers x 2 micro-batches give the
same update as one process on the whole batch.

Per-step metrics never wait on anyone: rank 0 keeps the history in memory (it is saved in
every checkpoint, so it survives restarts) and a background thread rewrites the run
store's metrics file from it at most every `metrics_write_interval_s`; checkpoints and
the end write it synchronously. Ray Train hears from the loop only at checkpoints (and
every `report_every` steps if asked): each `ray.train.report` waits until the controller
has taken the previous result, which it polls for every couple of seconds, so a report
per step would make every step that slow.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import torch

from actors.gc_pause import gc_paused
from actors.model_source import local_model_path
from actors.objectives import (OBJECTIVE_SPECS, dpo_stats, kl_estimate, mean_implicit_reward, mean_token_prob,
                               pair_weight_histogram, sequence_logp)
from actors.sequences import encode_row, micro_batches, pad_batch, response_len, step_schedule
from actors.token_logprobs import TokenLogprobModel

CKPT_TAG = "ckpt"
PAIR_WEIGHT_BINS = 10


# ----------------------------------------------------------------------------- data
def load_units(cfg: dict, tokenizer) -> list[dict]:
    """Training units: one sequence (sft/rft/dft/f-div) or one (chosen, rejected) pair."""
    return load_units_counted(cfg, tokenizer)[0]


def load_units_counted(cfg: dict, tokenizer) -> tuple[list[dict], dict]:
    """(units, counts): counts of the data rows read, used, and dropped because prompt +
    response tokens exceed max_len (never cut: the answer and the stop token would go)
    or because no response token is left; a pair is dropped when either side is."""
    from actors.store import RunStore

    store = RunStore(cfg["store_uri"])
    rows = store.read_rows(cfg["data_file"])
    refs = _reference_by_key(store, cfg) if cfg.get("reference_file") else None
    units = []
    counts = {"data_rows": len(rows), "rows_used": 0, "rows_dropped_too_long": 0, "rows_dropped_empty": 0}

    def dropped(*whys) -> bool:
        why = next((w for w in whys if w), None)
        if why:
            counts[f"rows_dropped_{why}"] += 1
        return why is not None

    for row in rows:
        if cfg["data"] == "pairs":
            c, why_c = encode_row(tokenizer, row["prompt"], row["chosen"], cfg["max_len"])
            r, why_r = encode_row(tokenizer, row["prompt"], row["rejected"], cfg["max_len"])
            if dropped(why_c, why_r):
                continue
            unit = {"c": c, "r": r}
            if refs is not None:
                ref = _lookup(refs, (row["prompt_id"], row["pair_idx"]), cfg)
                unit["ref_c"], unit["ref_r"] = _checked(ref["ref_chosen"], c, cfg), _checked(ref["ref_rejected"], r, cfg)
        else:
            gold = cfg["data"] == "gold"
            if gold:
                from actors.prompt_templates import render_prompt

                prompt, completion = render_prompt(tokenizer, cfg["template"], row["problem"]), row["solution"]
            else:
                prompt, completion = row["prompt"], row["completion"]
            # A demonstration ends its turn as the chat template does; a sample as it was generated.
            ex, why = encode_row(tokenizer, prompt, completion, cfg["max_len"], close_turn=gold)
            if dropped(why):
                continue
            unit = {"ex": ex}
            if refs is not None:
                key = (row["prompt_id"], row.get("sample_idx", 0))  # gold rows: one solution, sample_idx 0
                unit["ref"] = _checked(_lookup(refs, key, cfg)["ref_completion"], ex, cfg)
        units.append(unit)
    counts["rows_used"] = len(units)
    return units, counts


def _reference_by_key(store, cfg) -> dict:
    key = "pair_idx" if cfg["data"] == "pairs" else "sample_idx"
    return {(r["prompt_id"], r[key]): r for r in store.read_rows(cfg["reference_file"])}


def _lookup(refs: dict, key, cfg) -> dict:
    if key not in refs:
        raise ValueError(f"reference file {cfg['reference_file']} has no row for {key}: it does not match the "
                         f"training rows of {cfg['data_file']}; re-run the reference stage")
    return refs[key]


def _checked(ref: list, ex: dict, cfg) -> list:
    if len(ref) != response_len(ex):
        raise ValueError(f"reference file {cfg['reference_file']}: {len(ref)} log-probs for a response of "
                         f"{response_len(ex)} tokens: it was computed with another tokenizer or max_len")
    return list(ref)


def unit_length(unit: dict) -> int:
    return max(len(unit["c"]["ids"]), len(unit["r"]["ids"])) if "c" in unit else len(unit["ex"]["ids"])


def unit_tokens(unit: dict) -> int:
    return response_len(unit["c"]) + response_len(unit["r"]) if "c" in unit else response_len(unit["ex"])


# ----------------------------------------------------------------------------- loss
def micro_batch_loss(model, units: list[dict], objective: str, normalizer: float, cfg: dict, pad_id: int):
    """Loss of one micro-batch, already divided by the global normalizer; + diagnostics."""
    spec = OBJECTIVE_SPECS[objective]
    device = next(model.parameters()).device
    if spec.uses_pairs:
        examples = [u["c"] for u in units] + [u["r"] for u in units]
        refs = [u["ref_c"] for u in units] + [u["ref_r"] for u in units]
    else:
        examples = [u["ex"] for u in units]
        # A reference pass is there for the loss, or only for diagnostics (KL, implicit reward).
        refs = [u["ref"] for u in units] if "ref" in units[0] else None
    batch = {k: (v.to(device) if v is not None else None) for k, v in pad_batch(examples, pad_id, refs).items()}
    # The DeepSpeed engine (its forward keeps ZeRO-3 accumulation in step) of a TokenLogprobModel.
    logp = model(batch["input_ids"], batch["attention_mask"], score_mask=batch["mask"])
    mask, ref = batch["mask"], batch["ref_logp"]
    tokens = mask.sum().item()  # all response tokens processed (throughput, weighting)
    if spec.uses_pairs:
        k = len(units)
        seq, ref_seq = sequence_logp(logp, mask), sequence_logp(ref, mask)
        loss = spec.loss(seq[:k], seq[k:], ref_seq[:k], ref_seq[k:], cfg["beta"], normalizer)
        pair_stats = dpo_stats(seq[:k], seq[k:], ref_seq[:k], ref_seq[k:], cfg["beta"])
        # Token diagnostics on the chosen answers: the text the model is meant to produce.
        logp, mask, ref = logp[:k], mask[:k], ref[:k]
    elif spec.needs_reference:
        loss = spec.loss(logp, ref, mask, normalizer, cfg["beta"])
    else:
        loss = spec.loss(logp, mask, normalizer)
    stats = {"token_prob": mean_token_prob(logp, mask).item(), "tokens": tokens}
    if spec.uses_pairs:
        stats.update({key: v.item() for key, v in pair_stats.items()})
        margin = cfg["beta"] * ((seq[:k] - ref_seq[:k]) - (seq[k:] - ref_seq[k:]))
        stats["pair_weight_hist"] = pair_weight_histogram(margin.detach()).tolist()
    if ref is not None:
        stats["implicit_reward"] = mean_implicit_reward(logp, ref, mask, cfg["beta"]).item()
        stats["kl_to_reference"] = kl_estimate(logp, ref, mask).item()
    return loss, stats


# ----------------------------------------------------------------------------- engine
def _ds_config(cfg: dict, on_gpu: bool) -> dict:
    bf16 = cfg["precision"] == "bf16" or (cfg["precision"] == "auto" and on_gpu)
    zero = {"stage": cfg["zero_stage"]}
    if cfg["zero_stage"] == 3 and "zero3_param_persistence_threshold" in cfg:
        # DeepSpeed keeps parameters under 1e5 elements whole on every rank; tests set 0 so
        # the toy model's small layers are really partitioned.
        zero["stage3_param_persistence_threshold"] = cfg["zero3_param_persistence_threshold"]
    return {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,  # we decide the accumulation boundary
        "gradient_clipping": cfg["grad_clip"], "zero_optimization": zero,
        "bf16": {"enabled": bf16}, "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9, "wall_clock_breakdown": False,
    }


def _lr_lambda(total_steps: int, warmup_ratio: float):
    warmup = max(1, int(round(total_steps * warmup_ratio))) if warmup_ratio > 0 else 0

    def f(step: int) -> float:  # linear warmup then cosine to 0
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def _init_distributed(on_gpu: bool) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    dist.init_process_group("nccl" if on_gpu else "gloo")


def make_optimizer(cfg: dict, params: list, total_steps: int):
    """(optimizer, LR schedule: linear warm-up then cosine over total_steps)."""
    if cfg["optimizer"] == "sgd":  # plain SGD: the update is -lr * grad (used to test scaling)
        opt = torch.optim.SGD(params, lr=cfg["lr"])
    else:
        # fused: one kernel over all tensors (CPU and CUDA) instead of a Python loop of small ops
        # per tensor, the same update; HF Trainer's (and so TRL's) default is fused AdamW too.
        opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"], betas=(0.9, 0.95),
                                fused=True)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total_steps, cfg["warmup_ratio"]))


SHM_COMM_OP = "deepspeed_shm_comm"  # DeepSpeed's CPU shared-memory all-reduce (ShareMemCommBuilder.NAME)


def skip_inference_comm_op() -> None:
    """On CPU, DeepSpeed's comm backend JIT-compiles and loads a shared-memory all-reduce
    kernel at init. Only `inference_all_reduce` (tensor-parallel inference, AutoTP) calls
    it; training's all-reduces go through torch.distributed (gloo). Marking the op
    incompatible in DeepSpeed's compatibility table (a module-level dict DeepSpeed keeps
    for such edits) skips the C++ build a machine's first training run paid (60 CPU-s of
    cc1plus on 2 cores; again whenever the venv's path changes) and its load in every worker."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False


def load_model_for_training(cfg: dict, model_path: str):
    """The HF causal LM as the loop trains it: fp32 weights in training mode (HF loads a
    model in eval mode, where dropout is off and gradient checkpointing silently does
    nothing), no KV cache, activations recomputed in backward and decoder layers compiled
    when the config asks."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.train()
    model.config.use_cache = False
    if cfg.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable()
    if cfg.get("compile"):
        compile_decoder_layers(model)
    return model


def compile_decoder_layers(model) -> None:
    """torch.compile each decoder layer in place (regional compilation): the layers share
    one class, so one layer's graph (with dynamic batch and sequence sizes) serves them
    all instead of a graph of the whole model. In place, so the state dict, checkpoints
    and the exported model keep their names. The fused elementwise work (norms, rotary,
    SwiGLU) is the same arithmetic up to float rounding."""
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise ValueError(f"train.compile: {type(model).__name__} has no list of decoder layers to compile "
                         f"(model.get_decoder().layers); set train.compile=false")
    for layer in layers:
        layer.compile(dynamic=True)


def build_engine(cfg: dict, model, total_steps: int):
    import deepspeed

    on_gpu = torch.cuda.is_available() and cfg.get("use_gpu", False)
    if not on_gpu:
        skip_inference_comm_op()
    opt, sched = make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad], total_steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                                           config=_ds_config(cfg, on_gpu))
    return engine, scheduler


# ----------------------------------------------------------------------------- loop
def train_loop(cfg: dict) -> dict:
    """Train one objective. cfg keys: see pipeline/train_stage.py `loop_config`."""
    import torch.distributed as dist

    with gc_paused():  # imports, model load, DeepSpeed set-up: see actors/gc_pause.py
        from transformers import AutoTokenizer

        in_ray = cfg.get("in_ray", False)
        on_gpu = torch.cuda.is_available() and cfg.get("use_gpu", False)
        _init_distributed(on_gpu)
        rank, world = dist.get_rank(), dist.get_world_size()
        torch.manual_seed(cfg["seed"])
        model_path = local_model_path(cfg["model_path"])  # a run-store model is copied to this node's cache
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        units, counts = load_units_counted(cfg, tokenizer)
        if rank == 0:
            print(f"training data: {counts}", flush=True)
        if not units:
            raise ValueError(f"{cfg['data_file']}: no training rows fit in max_len={cfg['max_len']} "
                             f"(prompt + response tokens): {counts}")
        schedule = step_schedule(len(units), cfg["batch_size"], cfg["epochs"], cfg["seed"])
        model = load_model_for_training(cfg, model_path)
        engine, scheduler = build_engine(cfg, TokenLogprobModel(model, cfg["logprob_chunk_tokens"]), len(schedule))
        start_step, history = _restore(engine, cfg, in_ray)
    metrics_log = MetricsLog(cfg, history, enabled=rank == 0)
    try:
        _run_steps(cfg, engine, scheduler, units, schedule, start_step, metrics_log, rank, world, pad_id, in_ray,
                   data_counts=counts)
        _export(engine, tokenizer, cfg, history, rank)
    except BaseException:
        metrics_log.close(final_write_errors="print")  # what was trained stays visible; the error wins
        raise
    metrics_log.close()  # the complete file, before anyone is told the stage is done
    dist.barrier()
    return {"steps": len(schedule), "history": history}


def _run_steps(cfg, engine, scheduler, units, schedule, start_step, metrics_log, rank, world, pad_id,
               in_ray, data_counts: dict | None = None) -> None:
    objective = cfg["objective"]
    report_every = int(cfg.get("report_every") or 0)  # extra Ray Train reports between checkpoints; 0: none
    uses_pairs = OBJECTIVE_SPECS[objective].uses_pairs
    width = 2 if uses_pairs else 1
    lengths = [unit_length(u) for u in units]
    # recorded with every step: how the arithmetic was laid out
    layout = {"workers": world, "torch_threads": torch.get_num_threads(), "compiled": bool(cfg.get("compile"))}
    t0, tokens_seen = time.time(), 0
    for step in range(start_step, len(schedule)):
        step_units = schedule[step]
        # Everyone knows the whole step batch, so the global normalizer needs no collective.
        normalizer = len(step_units) if uses_pairs else sum(unit_tokens(units[i]) for i in step_units)
        plans = [micro_batches([lengths[i] for i in step_units[r::world]], cfg["micro_batch_tokens"], width)
                 for r in range(world)]
        mine = step_units[rank::world]
        my_plan = plans[rank] + [[]] * (max(map(len, plans)) - len(plans[rank]))  # equal backward count per rank
        agg: dict[str, float] = {}
        total_loss = 0.0
        for mb in my_plan:
            if mb:
                loss, stats = micro_batch_loss(engine, [units[mine[i]] for i in mb], objective,
                                               normalizer, cfg, pad_id)
            else:  # a zero-weight pass keeps ZeRO's per-backward collectives in step
                loss, stats = micro_batch_loss(engine, [units[mine[0] if mine else step_units[0]]],
                                               objective, normalizer, cfg, pad_id)
                loss, stats = loss * 0.0, {}
            # DeepSpeed averages gradients over ranks; scale back up to a global sum / N.
            engine.backward(loss * world, scale_wrt_gas=False)
            total_loss += loss.item()
            n = stats.get("tokens", 0.0)
            for k, v in stats.items():
                if k == "pair_weight_hist":  # counts of pairs per bin
                    agg[k] = [a + b for a, b in zip(agg.get(k, [0] * len(v)), v)]
                else:
                    agg[k] = agg.get(k, 0.0) + (v if k == "tokens" else v * n)
        engine.step()
        metrics = _step_metrics(engine, scheduler, total_loss, agg, step, len(schedule), t0, objective,
                                bool(cfg.get("reference_file")))
        metrics.update(resumed_from_step=start_step, micro_batches_max=len(my_plan), **layout, **(data_counts or {}))
        tokens_seen += metrics["tokens"]
        metrics["tokens_per_s"] = round(tokens_seen / max(time.time() - t0, 1e-9), 1)
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"{objective}: loss is {metrics['loss']} at step {step + 1}; stopping with "
                                     f"the last good checkpoint intact (lower train.lr or check the data)")
        metrics_log.append(metrics)
        _maybe_die(cfg, step + 1, rank)
        if cfg.get("step_sleep_s"):  # test hook: a slow step, so a driver can be killed mid-run
            time.sleep(cfg["step_sleep_s"])
        last = step + 1 == len(schedule)
        if (step + 1) % cfg["checkpoint_every"] == 0 or last:
            _checkpoint(engine, cfg, metrics_log, step + 1, metrics, in_ray, final=last)
        elif in_ray and report_every > 0 and (step + 1) % report_every == 0:
            import ray.train

            ray.train.report(metrics)  # every rank, at the same steps (Ray Train syncs them)


class MetricsLog:
    """The per-step history and its copy in the run store (`cfg["metrics_file"]`, jsonl,
    the whole file rewritten atomically). Only the enabled rank (0) writes: from a daemon
    thread at most every `metrics_write_interval_s` seconds (default 5; 0 = no thread)
    when the history changed, and synchronously on `write()` / `close()`. A failed
    background write is printed and retried at the next tick; a synchronous one raises."""

    def __init__(self, cfg: dict, history: list[dict], enabled: bool):
        self.history = history
        self._store_uri, self._rel = cfg["store_uri"], cfg.get("metrics_file")
        self._enabled = enabled and bool(self._rel)
        self._store = None
        self._lock = threading.Lock()  # one write at a time, so a newer file is never overwritten by an older
        self._written = -1  # history length last written; -1: not yet in this attempt (a resume rewrites it)
        self._stop = threading.Event()
        self._thread = None
        interval = float(cfg.get("metrics_write_interval_s", 5.0))
        if self._enabled and interval > 0:
            self._thread = threading.Thread(target=self._background, args=(interval,), name="metrics-writer",
                                            daemon=True)
            self._thread.start()

    def append(self, metrics: dict) -> None:
        self.history.append(metrics)  # the loop never touches an entry again once appended

    def write(self) -> None:
        if not self._enabled:
            return
        with self._lock:
            n = len(self.history)
            if n == self._written:
                return
            data = "".join(json.dumps(m) + "\n" for m in self.history[:n]).encode()
            if self._store is None:
                from actors.store import RunStore

                self._store = RunStore(self._store_uri)
            self._store.write_bytes(self._rel, data)
            self._written = n

    def _background(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.write()
            except Exception as e:  # a flaky store must not kill training; the next tick retries
                print(f"metrics file {self._rel}: background write failed ({e!r}); retrying", flush=True)

    def close(self, final_write_errors: str = "raise") -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            self.write()
        except Exception as e:
            if final_write_errors == "raise":
                raise
            print(f"metrics file {self._rel}: final write failed ({e!r})", flush=True)


def stat_keys(objective: str, with_reference: bool = False) -> list[str]:
    spec = OBJECTIVE_SPECS[objective]
    keys = ["token_prob"]
    if spec.needs_reference or with_reference:
        keys += ["implicit_reward", "kl_to_reference"]
    if spec.uses_pairs:
        keys += ["chosen_reward", "rejected_reward", "reward_margin", "accuracy", "pair_weight"]
    return keys


def _step_metrics(engine, scheduler, total_loss, agg, step, total_steps, t0, objective,
                  with_reference: bool = False) -> dict:
    """Loss and token-weighted diagnostics summed over ranks: every rank logs the same."""
    import torch.distributed as dist

    keys = stat_keys(objective, with_reference)
    hist = [float(x) for x in agg.get("pair_weight_hist", [0] * PAIR_WEIGHT_BINS)] if OBJECTIVE_SPECS[
        objective].uses_pairs else []
    vec = torch.tensor([total_loss, agg.get("tokens", 0.0)] + [agg.get(k, 0.0) for k in keys] + hist,
                       dtype=torch.float64, device=engine.device)  # nccl reduces only device tensors
    dist.all_reduce(vec)
    tokens = vec[1].item()
    gn = engine.get_global_grad_norm()
    now = time.time()
    # time: the step's end on the wall clock (epoch s), to line steps up with other logs and processes
    out = {"step": step + 1, "total_steps": total_steps, "loss": vec[0].item(), "lr": scheduler.get_last_lr()[0],
           "grad_norm": float(gn) if gn is not None else None, "tokens": tokens,
           "elapsed_s": round(now - t0, 3), "time": round(now, 3)}
    out["tokens_per_s"] = None
    for i, k in enumerate(keys):
        out[k] = vec[2 + i].item() / max(tokens, 1)
    if hist:
        out["pair_weight_hist"] = [int(x) for x in vec[2 + len(keys):].tolist()]
    return out


def _maybe_die(cfg: dict, step: int, rank: int) -> None:
    """Fault injection for the recovery test: SIGKILL this worker once at a given step."""
    spec = cfg.get("kill_worker_at")  # {"step": k, "rank": r, "marker": path}
    if spec and spec["step"] == step and spec["rank"] == rank and not os.path.exists(spec["marker"]):
        Path(spec["marker"]).write_text(str(os.getpid()))
        time.sleep(3)  # let the controller register the last reported checkpoint, as in a real crash later on
        os.kill(os.getpid(), signal.SIGKILL)


def _checkpoint(engine, cfg, metrics_log: "MetricsLog", step, metrics, in_ray, final=False) -> None:
    """Save the engine and the history; bring the metrics file up to date first, so the
    store never shows fewer steps than the checkpoint Ray Train is about to register."""
    import torch.distributed as dist

    history = metrics_log.history
    metrics_log.write()
    if in_ray:
        import ray.train

        tmp = tempfile.mkdtemp(prefix="verifine-ckpt-")
        engine.save_checkpoint(tmp, tag=CKPT_TAG)
        if dist.get_rank() == 0:
            Path(tmp, "state.json").write_text(json.dumps({"step": step, "history": history}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        shutil.rmtree(tmp, ignore_errors=True)
    elif cfg.get("local_checkpoint_dir"):
        d = cfg["local_checkpoint_dir"]
        engine.save_checkpoint(d, tag=CKPT_TAG)
        if dist.get_rank() == 0:
            Path(d, "state.json").write_text(json.dumps({"step": step, "history": history}))


def _restore(engine, cfg, in_ray) -> tuple[int, list]:
    if in_ray:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return 0, []
        with ckpt.as_directory() as d:
            return _load(engine, d)
    d = cfg.get("local_checkpoint_dir")
    if d and Path(d, "state.json").exists():
        return _load(engine, d)
    return 0, []


def _load(engine, d) -> tuple[int, list]:
    loaded, _ = engine.load_checkpoint(d, tag=CKPT_TAG)
    if loaded is None:  # DeepSpeed only warns when this rank finds no file: it would train on from scratch
        raise FileNotFoundError(f"checkpoint {d}: no DeepSpeed state under tag {CKPT_TAG!r} for rank "
                                f"{engine.global_rank}; files: {sorted(p.name for p in Path(d).rglob('*'))[:20]}")
    state = json.loads(Path(d, "state.json").read_text())
    print(f"resumed from checkpoint at step {state['step']}", flush=True)
    return state["step"], state["history"]


def _export_tensorboard(store, cfg, history: list[dict]) -> None:
    """TensorBoard event file of the whole history, when a writer is installed. Written at
    the end from the history (which survives restarts) rather than live, so a resumed run
    still gets one clean curve."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
    tmp = Path(tempfile.mkdtemp(prefix="verifine-tb-"))
    try:
        writer = SummaryWriter(str(tmp))
        for m in history:
            for k, v in m.items():
                if isinstance(v, (int, float)) and k != "step" and v is not None:
                    writer.add_scalar(f"{cfg['objective']}/{k}", v, m["step"])
        writer.close()
        import posixpath

        base = posixpath.join(posixpath.dirname(cfg["metrics_file"]), "tensorboard")
        for f in tmp.rglob("*"):
            if f.is_file():
                store.write_bytes(posixpath.join(base, str(f.relative_to(tmp))), f.read_bytes())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _full_state_dict(engine) -> dict | None:
    """The HF model's full weights on rank 0 (None elsewhere). Under ZeRO-3 every rank must
    call this: DeepSpeed gathers the partitions layer by layer onto rank 0's CPU."""
    if engine.zero_optimization_stage() < 3:
        return engine.module.model.state_dict()
    full = engine._zero3_consolidated_16bit_state_dict()
    if full is None:
        return None
    # Keys are TokenLogprobModel's: "model.<hf key>", plus "head.*" (the shared LM head).
    return {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}


def _export(engine, tokenizer, cfg, history: list[dict], rank: int) -> None:
    """The final model as a normal HF directory (safetensors + tokenizer) in the store, and
    the TensorBoard curves (the metrics file itself is MetricsLog's)."""
    from actors.store import RunStore

    state = _full_state_dict(engine)
    if rank != 0:
        return
    out = Path(tempfile.mkdtemp(prefix="verifine-export-"))
    try:
        engine.module.model.save_pretrained(out, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out)
        store = RunStore(cfg["store_uri"])
        for f in sorted(out.iterdir()):
            store.write_bytes(f"{cfg['export_dir']}/{f.name}", f.read_bytes())
        _export_tensorboard(store, cfg, history)
    finally:
        shutil.rmtree(out, ignore_errors=True)
