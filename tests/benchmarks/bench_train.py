"""Training throughput: the train stage as the pipeline runs it (Ray Train), the same loop
in one process, and TRL's SFTTrainer (DFT), on the same data.

    python tests/benchmarks/bench_train.py [--turn-s 3] [--examples 512] [--batch-size 64] [--steps 160]
                                           [--max-len 256] [--skip 3] [--repeat 1] [--torch-threads 0]
                                           [--arms ray_train,torchrun,single,plain,trl[,beside_ray][,ARM+compile]]
                                           [--trl-path /tmp/trl_pkgs]
                                           [--set train.zero_stage=1 ...]

Every arm trains the cached toy base model with the DFT objective on the same rows (toy
train prompts in the chat template + `toy_task.solution_text`, EOS appended, loss on the
completion only), with the same batch size, max length, number of optimizer steps,
AdamW (betas 0.9/0.95), lr, warm-up + cosine, clip 1.0, fp32 on CPU. Each arm runs in its
own child process (taking turns with the others, or with --turn-s 0 one after the other,
alternating over --repeat rounds; see below):

- ray_train: the stage as `verifine run` runs it. The loop config comes from
  `pipeline.train_stage.loop_config` on the train/dft stage's config view
  (`pipeline.plan.build_stages` on configs/toy.yaml: micro-batch token budget,
  checkpoint_every, num_workers, cpus_per_worker, ZeRO-0 ... as configured there; only batch size, lr,
  max_len and epochs are set from the arguments, and --set overrides), Ray is started by
  `pipeline.ray_session.connect` and the stage runs through
  `pipeline.train_stage.run_with_ray_train` (TorchTrainer, gloo), with checkpoints into a
  fresh storage path per run. Step times come from the per-step metrics file the loop
  writes to the run store (rank 0's elapsed_s / tokens).
- torchrun: the ray_train arm's workers without Ray: `actors.train_loop.train_loop` on
  the same loop config in as many processes as the stage has workers, launched by
  `torch.distributed.run` (gloo, train.cpus_per_worker OpenMP threads each, as Ray gives a worker;
  checkpoints into one shared local directory). ray_train / torchrun is what Ray Train
  itself costs per step; torchrun's rate against the single arm's at the same thread
  count is what data parallelism costs (gradient all-reduce, ranks in lock-step).
- single: `actors.train_loop.train_loop` on the same loop config in one process
  (DeepSpeed at the config's ZeRO stage, world size 1; its checkpoints go to a local
  directory), its history's step times.
- beside_ray (not in the default --arms): the single arm in a process that has started a
  local Ray as the stage does and holds a Ray Train run of the stage's worker layout whose
  workers only wait, so Ray's own processes (controller and helper actors, the idle worker
  processes, raylet, GCS, agents) share the cores with the loop as during the stage, but no
  step goes through Ray. beside_ray / single is what Ray's processes cost the loop on these
  cores; ray_train / beside_ray is what is left to Ray Train's path inside the worker.
- plain: the single arm's arithmetic without DeepSpeed: the same units, schedule,
  micro-batches and `actors.train_loop.micro_batch_loss` (head, objective), then plain
  torch clip_grad_norm_, AdamW and LambdaLR, and `torch.save` of model, optimizer and
  schedule as its checkpoints. single / plain is what DeepSpeed and the loop's
  bookkeeping cost; plain / TRL is the most that cutting those can reach without
  changing the arithmetic.
- trl: `trl.SFTTrainer` with `SFTConfig(loss_type="dft")` (plain `nll` SFT, with a note,
  if the installed TRL has no DFT), gradient_accumulation_steps=1, saving its resumable
  checkpoints (model, optimizer, schedule, RNG) with `save_steps`, and `torch_compile=True`
  when the verifine arms compile (`--set train.compile=true`), so every arm runs the same
  kind of arithmetic. Step times from a TrainerCallback; token counts from the batches it
  trains on.

An arm named with the suffix `+compile` (`ray_train+compile`, `single+compile`,
`trl+compile`, ...) is that arm with `train.compile=true` alone (TRL: `torch_compile=True`),
so one call sets compiled and eager arms side by side, e.g.
`--arms ray_train,single,trl,single+compile,trl+compile`. At most one Ray arm
(`ray_train`, `beside_ray`, with or without the suffix) per call: each starts a local Ray of
its own, and a second one stopped while it starts timed out waiting for its raylet.

By default (--turn-s 3) all arms start at once and take turns: one runs for 3 s while the
others' whole process trees (a local Ray included) are stopped with SIGSTOP; until every
arm has made its first step only those still starting up get turns. Each arm's steps that
ran wholly inside its own turns (from the wall-clock `time` of every metrics line) give
its tokens/s, and each ratio uses the window both arms were training in. This machine's
speed drifts by a third over minutes, so arms run one after the other (--turn-s 0, which
also prints start-up times and the figures below) read drift as a difference; taking
turns repeated the ratios within 0.02-0.07 between rounds.

Every arm saves a resumable checkpoint every `train.checkpoint_every` steps of the loop
config (configs/toy.yaml: 20), as the stage does for fault tolerance, so all of them do
the same work; a save falls into the next step's time. The last step's save comes after
the last step's clock in every arm.

TRL is not a dependency of verifine: install it outside the project venv, e.g.
    .venv/bin/pip install --target /tmp/trl_pkgs --no-deps trl accelerate
(TRL 1.x's other imports -- datasets, transformers, pandas, pyarrow, jinja2 ... -- are in
the venv already). The arm is skipped with a message when TRL cannot be imported.

Printed per arm: steady-state tokens/s (all non-pad tokens, and response tokens) over
steps --skip+1..N, i.e. after the first steps' one-off costs, and the median over those
steps of each step's own tokens/s (robust to a burst of outside load); the start-up:
wall time of the train call (TorchTrainer.fit() for ray_train) minus the loop's own time
(so it holds worker start-up, model load, DeepSpeed init, restore, export); peak RSS of
the child process (os.wait4's rusage, i.e. getrusage of that child and its own children;
for ray_train the Ray workers are not its children and are not counted), and the arm
process's own peak (getrusage SELF). DeepSpeed JIT-builds a CPU shared-memory comm op on
first use (~1.5 GB RSS, tens of seconds), cached in TORCH_EXTENSIONS_DIR
(~/.cache/torch_extensions); two venvs at different paths sharing that cache rebuild it
alternately: point TORCH_EXTENSIONS_DIR at a private dir to keep builds out of the runs.
Ratios: ray_train / single tokens/s, target >= 0.9 (what Ray Train costs per step);
ray_train / TRL and single / TRL tokens/s, target >= 1.2; each ratio of the median runs,
of the median steps, and paired round by round (median and range of the per-round
ratios: the machine's speed drifts over a call, pairs are minutes apart). The load
average is printed with every run: on a shared machine the figures move with it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

from bench_common import load_avg

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run as a plain script from anywhere

RESULT = "BENCH_RESULT "


def steady(times: list[float], tokens: list[int], skip: int) -> float:
    """tokens/s over steps skip+1..N; times[i] = seconds from loop start to the end of step i+1."""
    skip = max(0, min(skip, len(times) - 1))
    ends = [0.0] + list(times)
    return sum(tokens[skip:]) / max(ends[-1] - ends[skip], 1e-9)


def median_step_rate(times: list[float], tokens: list[int], skip: int) -> float:
    """Median over steps skip+1..N of that step's tokens / seconds: robust to bursts of
    outside load that slow a minority of the steps."""
    skip = max(0, min(skip, len(times) - 1))
    ends = [0.0] + list(times)
    return median(tokens[i] / max(ends[i + 1] - ends[i], 1e-9) for i in range(skip, len(times)))


def paired(runs: dict[str, list[dict]], a: str, b: str) -> str:
    """a's tokens/s over b's, round by round (the arms alternate, so a pair ran minutes apart
    on the same machine; the machine's speed drifts more than that over a call)."""
    by_round = {r["round"]: r["tok_s"] for r in runs[b]}
    ratios = sorted(r["tok_s"] / by_round[r["round"]] for r in runs[a] if r["round"] in by_round)
    if not ratios:
        return "no round with both"
    return f"paired by round {median(ratios):.2f} (min {ratios[0]:.2f}, max {ratios[-1]:.2f}, {len(ratios)} rounds)"


# ----------------------------------------------------------------------------- data
def write_data(data_dir: Path, examples: int, model: str) -> None:
    """Toy prompt + solution rows: parquet (positives format) for verifine, JSONL for TRL."""
    from transformers import AutoTokenizer

    from pipeline.toy_task import prompt_row
    from actors.prompt_templates import render_prompt
    from actors.store import RunStore
    from pipeline.toy_task import make_problems

    tok = AutoTokenizer.from_pretrained(model)
    rows = []
    for p in make_problems("train", examples, seed=0):
        r = prompt_row(p)
        rows.append({"prompt_id": r["prompt_id"], "sample_idx": 0, "prompt": render_prompt(tok, "chat", r["problem"]),
                     "completion": r["solution"]})
    RunStore(str(data_dir)).write_rows("positives.parquet", rows)
    (data_dir / "train.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["completion"]})
                                                  + "\n" for r in rows))


# ----------------------------------------------------------------------------- arms
def pipeline_config(args, model: str, data_dir: str, export: str):
    """(pipeline Config, train stage's config view, loop config) exactly as `verifine run`
    builds them for the DFT stage of configs/toy.yaml (or `args.config`), with the benchmark's batch size, lr,
    max length and steps (and token budgets when given) as config overrides."""
    from actors.store import RunStore
    from pipeline.config import load_config
    from pipeline.plan import build_stages
    from pipeline.runner import ConfigView
    from pipeline.train_stage import loop_config

    overrides = [f"train.batch_size={args.batch_size}", f"train.lr={args.lr}", f"train.max_len={args.max_len}",
                 f"train.epochs={args.steps * args.batch_size / args.examples}"]
    if args.micro_batch_tokens:
        overrides.append(f"train.micro_batch_tokens={args.micro_batch_tokens}")
    if args.logprob_chunk_tokens:
        overrides.append(f"train.logprob_chunk_tokens={args.logprob_chunk_tokens}")
    overrides += args.set
    cfg = load_config(getattr(args, "config", None), overrides)  # None: configs/toy.yaml
    stage = {s.name: s for s in build_stages(cfg)}["train/dft"]
    view = ConfigView(stage.config, stage.name)
    loop_cfg = loop_config(view, RunStore(data_dir), "positives.parquet", None, model, f"out/{export}/model")
    loop_cfg["metrics_file"] = f"out/{export}/metrics.jsonl"  # as the stage sets it
    return cfg, view, loop_cfg


def training_started(data_dir: str, arm: str) -> bool:
    """Whether the arm has finished its first step: the loop's metrics file (written by the
    loop itself, within seconds of a step) or the mark the plain and TRL arms leave."""
    out = Path(data_dir) / "out" / arm
    return (out / "metrics.jsonl").exists() or (out / "training").exists()


def mark_training(data_dir: str, arm: str) -> None:
    out = Path(data_dir) / "out" / arm
    out.mkdir(parents=True, exist_ok=True)
    (out / "training").touch()


def loop_figures(args, model: str, loop_cfg: dict, history: list[dict], call_s: float) -> dict:
    """Throughput from the loop's per-step metrics (elapsed_s since the loop started)."""
    import torch
    from transformers import AutoTokenizer

    from actors.sequences import step_schedule
    from actors.train_loop import load_units

    # all non-pad tokens per step, from the loop's own (deterministic) schedule
    units = load_units(loop_cfg, AutoTokenizer.from_pretrained(model))
    schedule = step_schedule(len(units), loop_cfg["batch_size"], loop_cfg["epochs"], loop_cfg["seed"])
    all_tokens = [sum(len(units[i]["ex"]["ids"]) for i in step) for step in schedule]
    assert [m["step"] for m in history] == list(range(1, len(schedule) + 1)), "incomplete metrics history"
    times = [m["elapsed_s"] for m in history]
    resp = [int(m["tokens"]) for m in history]
    steps = [b - a for a, b in zip([0.0] + times, times)]
    return {"steps": len(history), "train_call_s": call_s, "loop_s": times[-1], "startup_s": call_s - times[-1],
            "tok_s": steady(times, all_tokens, args.skip), "resp_tok_s": steady(times, resp, args.skip),
            "median_step_tok_s": median_step_rate(times, all_tokens, args.skip),
            "median_step_s": median(steps[args.skip:]), "step_s": [round(x, 3) for x in steps],
            "micro_batches": history[-1]["micro_batches_max"], "final_loss": history[-1]["loss"],
            "mean_loss": sum(m["loss"] for m in history) / len(history),
            "torch_threads": torch.get_num_threads(), "checkpoint_every": loop_cfg["checkpoint_every"],
            "micro_batch_tokens": loop_cfg["micro_batch_tokens"],
            "end_times": [m["time"] for m in history], "step_tokens": all_tokens}


def loop_here(args, model: str, arm: str, checkpoint_dir: str) -> dict:
    """`actors.train_loop.train_loop` in this process on the stage's loop config (world size
    from the environment), checkpointing into a local directory; its history's figures."""
    from actors.train_loop import train_loop

    _, _, loop_cfg = pipeline_config(args, model, args.data_dir, arm)
    loop_cfg["local_checkpoint_dir"] = checkpoint_dir
    t0 = time.perf_counter()
    out = train_loop(loop_cfg)
    return loop_figures(args, model, loop_cfg, out["history"], time.perf_counter() - t0)


def arm_single(args, model: str) -> dict:
    return loop_here(args, model, args.arm, tempfile.mkdtemp(prefix="ckpt-single-", dir=args.data_dir))


def arm_torchrun(args, model: str) -> dict:
    """One rank of the torchrun arm (RANK, WORLD_SIZE, MASTER_* from torch.distributed.run)."""
    # One directory for all ranks (as a run store), fresh for every run: a finished run's
    # checkpoint would make the next one resume at its last step. The ranks share the run id.
    ckpt = os.path.join(args.data_dir, f"ckpt-torchrun-{os.environ['TORCHELASTIC_RUN_ID']}")
    return {**loop_here(args, model, args.arm, ckpt), "processes": int(os.environ["WORLD_SIZE"])}


def arm_plain(args, model: str) -> dict:
    """The single arm's arithmetic without DeepSpeed: the same units, schedule, micro-batches
    and `micro_batch_loss` (TokenLogprobModel, the objective), then plain torch clipping,
    AdamW and LR schedule. The loop's cost over this arm is DeepSpeed's and its own
    bookkeeping's; this arm's rate over TRL's is the most that cutting them can reach."""
    import torch
    from transformers import AutoTokenizer

    from actors.sequences import micro_batches, step_schedule
    from actors.token_logprobs import TokenLogprobModel
    from actors.train_loop import (load_model_for_training, load_units, make_optimizer, micro_batch_loss, unit_length,
                                   unit_tokens)

    _, _, cfg = pipeline_config(args, model, args.data_dir, args.arm)
    t_call = time.perf_counter()
    torch.manual_seed(cfg["seed"])
    tok = AutoTokenizer.from_pretrained(model)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    units = load_units(cfg, tok)
    schedule = step_schedule(len(units), cfg["batch_size"], cfg["epochs"], cfg["seed"])
    net = load_model_for_training(cfg, model)  # as the loop loads it (train mode; compiled if configured)
    head_model = TokenLogprobModel(net, cfg["logprob_chunk_tokens"])
    params = [q for q in head_model.parameters() if q.requires_grad]
    opt, sched = make_optimizer(cfg, params, len(schedule))
    history, t0 = [], time.time()
    for step, step_units in enumerate(schedule):
        normalizer = sum(unit_tokens(units[i]) for i in step_units)
        plan = micro_batches([unit_length(units[i]) for i in step_units], cfg["micro_batch_tokens"], 1)
        total_loss, tokens = 0.0, 0
        for mb in plan:
            loss, stats = micro_batch_loss(head_model, [units[step_units[i]] for i in mb], cfg["objective"],
                                           normalizer, cfg, pad_id)
            loss.backward()
            total_loss, tokens = total_loss + loss.item(), tokens + stats["tokens"]
        torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        now = time.time()
        history.append({"step": step + 1, "elapsed_s": now - t0, "time": now, "tokens": tokens, "loss": total_loss,
                        "micro_batches_max": len(plan)})
        if step == 0:
            mark_training(args.data_dir, args.arm)
        if (step + 1) % cfg["checkpoint_every"] == 0 or step + 1 == len(schedule):  # as the loop's cadence
            torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "schedule": sched.state_dict()},
                       os.path.join(args.data_dir, "plain-checkpoint.pt"))
    return loop_figures(args, model, cfg, history, time.perf_counter() - t_call)


def arm_ray_train(args, model: str) -> dict:
    import uuid

    from actors.store import RunStore
    from pipeline.ray_session import connect
    from pipeline.train_stage import run_with_ray_train

    cfg, view, loop_cfg = pipeline_config(args, model, args.data_dir, args.arm)
    t0 = time.perf_counter()
    connect(cfg.ray.address, cfg.ray.num_cpus, log=lambda *_: None)
    ray_init_s = time.perf_counter() - t0
    storage = str(Path(args.data_dir) / f"ray-{uuid.uuid4().hex[:8]}")  # fresh: never resume an earlier run
    t0 = time.perf_counter()
    run_with_ray_train(loop_cfg, view.train.num_workers, view.train.use_gpu, storage, view.train.max_failures,
                       log=lambda *_: None, cpus_per_worker=view.train.cpus_per_worker)
    fit_s = time.perf_counter() - t0
    text = RunStore(args.data_dir).read_bytes(loop_cfg["metrics_file"]).decode()
    history = [json.loads(l) for l in text.splitlines() if l]
    res = loop_figures(args, model, loop_cfg, history, fit_s)
    res.update(ray_init_s=ray_init_s, num_workers=history[-1]["workers"], torch_threads=history[-1]["torch_threads"])
    return res


def _wait_until_told(config: dict) -> None:
    """A Ray Train worker of the beside_ray arm: it marks itself up, then only waits."""
    Path(config["up"]).touch()
    while not os.path.exists(config["done"]):
        time.sleep(0.5)


def arm_beside_ray(args, model: str) -> dict:
    """The single arm's loop in this process while Ray runs beside it as it does during the
    stage: a local Ray started by `pipeline.ray_session.connect`, holding a Ray Train run
    of the stage's worker layout whose workers only wait (so its controller, helper actors,
    worker processes, raylet, GCS and agents are all up). The loop shares the cores with
    Ray's processes, but none of its steps go through Ray."""
    import threading

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.ray_session import connect, train_worker_resources

    cfg, view, _ = pipeline_config(args, model, args.data_dir, args.arm)
    connect(cfg.ray.address, cfg.ray.num_cpus, log=lambda *_: None)
    flags = tempfile.mkdtemp(prefix="beside-ray-", dir=args.data_dir)
    up, done = os.path.join(flags, "up"), os.path.join(flags, "done")
    trainer = TorchTrainer(
        _wait_until_told, train_loop_config={"up": up, "done": done},
        scaling_config=ScalingConfig(num_workers=view.train.num_workers,
                                     resources_per_worker=train_worker_resources(False, view.train.cpus_per_worker)),
        torch_config=TorchConfig(backend="gloo"), run_config=RunConfig(name="beside-ray", storage_path=flags))
    fit = threading.Thread(target=trainer.fit, name="idle-ray-train", daemon=True)
    fit.start()
    deadline = time.time() + 300
    while not os.path.exists(up):
        if time.time() > deadline or not fit.is_alive():
            raise RuntimeError("the idle Ray Train run beside the loop did not start its workers")
        time.sleep(0.2)
    try:
        return loop_here(args, model, args.arm, tempfile.mkdtemp(prefix="ckpt-beside-", dir=args.data_dir))
    finally:
        Path(done).touch()
        fit.join(timeout=120)


def import_trl(path: str):
    if path and path not in sys.path:
        sys.path.insert(0, path)
    import trl  # noqa: F401

    return trl


def arm_trl(args, model_dir: str) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    arm_t0 = time.perf_counter()
    trl = import_trl(args.trl_path)
    from trl import SFTConfig, SFTTrainer

    note = None
    try:
        SFTConfig(output_dir=os.path.join(args.data_dir, "probe"), loss_type="dft", use_cpu=True, bf16=False)
        loss_type = "dft"
    except (TypeError, ValueError) as e:
        loss_type, note = "nll", f"TRL {trl.__version__} has no loss_type='dft' ({e}); plain SFT used"

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    data = load_dataset("json", data_files=os.path.join(args.data_dir, "train.jsonl"), split="train")
    _, _, loop_cfg = pipeline_config(args, model_dir, args.data_dir, args.arm)  # the stage's checkpoint cadence, compile
    warmup = max(1, int(round(args.steps * 0.1)))
    config = SFTConfig(
        output_dir=os.path.join(args.data_dir, "trl-out"), loss_type=loss_type, max_length=args.max_len,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1, max_steps=args.steps,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=warmup, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, optim="adamw_torch", use_cpu=True, bf16=False,
        fp16=False, gradient_checkpointing=False, packing=False, padding_free=False, save_strategy="steps",
        save_steps=loop_cfg["checkpoint_every"],
        report_to="none", logging_steps=10 ** 6, disable_tqdm=True, dataloader_num_workers=0, seed=0,
        completion_only_loss=True, torch_compile=bool(loop_cfg["compile"]))  # compiled when verifine's arms are

    times: list[float] = []
    wall_ends: list[float] = []
    counts: list[tuple[int, int]] = []
    losses: list = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            times.append(time.perf_counter())
            wall_ends.append(time.time())
            if len(times) == 1:
                mark_training(args.data_dir, args.arm)

    class CountingTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, *a, **k):
            if self.model.training:
                counts.append((int(inputs["attention_mask"].sum()), int((inputs["labels"] != -100).sum())))
            loss = super().compute_loss(model, inputs, *a, **k)
            if self.model.training:
                losses.append(loss.detach())
            return loss

    trainer = CountingTrainer(model=model, args=config, train_dataset=data, processing_class=tok, callbacks=[Clock()])
    t0 = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - t0
    times = [t - t0 for t in times]
    all_tokens, resp = [c[0] for c in counts], [c[1] for c in counts]
    call_s = wall + (t0 - arm_t0)  # like the train call of the other arms: model load and set-up included
    return {"steps": len(times), "train_call_s": call_s, "loop_s": times[-1],
            "tok_s": steady(times, all_tokens, args.skip), "resp_tok_s": steady(times, resp, args.skip),
            "median_step_tok_s": median_step_rate(times, all_tokens, args.skip),
            "step_s": [round(b - a, 3) for a, b in zip([0.0] + times, times)], "final_loss": float(losses[-1]),
            "median_step_s": median([b - a for a, b in zip([0.0] + times, times)][args.skip:]),
            "startup_s": call_s - times[-1],
            "mean_loss": result.training_loss,
            "loss_type": loss_type, "note": note, "trl_version": trl.__version__,
            "torch_threads": torch.get_num_threads(), "checkpoint_every": loop_cfg["checkpoint_every"],
            "checkpoints_saved": sorted(p.name for p in Path(config.output_dir).glob("checkpoint-*")),
            "end_times": wall_ends, "step_tokens": all_tokens}


ARMS = {"ray_train": arm_ray_train, "torchrun": arm_torchrun, "single": arm_single, "beside_ray": arm_beside_ray,
        "plain": arm_plain, "trl": arm_trl}
COMPILED = "+compile"  # an arm name's suffix: that arm alone runs with train.compile=true (TRL: torch_compile)


def base_arm(name: str) -> str:
    base = name.removesuffix(COMPILED)
    if base not in ARMS:
        raise SystemExit(f"unknown arm {name!r}: one of {', '.join(ARMS)}, each optionally with {COMPILED}")
    return base


# ----------------------------------------------------------------------------- driver
def start_arm(name: str, args, data_dir: str) -> dict:
    """One arm in a child process of its own; its output goes to <data_dir>/<arm>.log."""
    launcher = [sys.executable]
    if base_arm(name) == "torchrun":  # as many ranks as the stage has workers; a free port of its own
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.stage_workers}"]
    cmd = launcher + [__file__, "--arm", name, "--data-dir", data_dir, "--examples", str(args.examples),
           "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--max-len", str(args.max_len),
           "--skip", str(args.skip), "--lr", str(args.lr), "--micro-batch-tokens", str(args.micro_batch_tokens),
           "--logprob-chunk-tokens", str(args.logprob_chunk_tokens), "--trl-path", args.trl_path]
    cmd += [f"--set={o}" for o in args.set]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if base_arm(name) == "torchrun":  # the threads Ray gives a worker of the stage
        env["OMP_NUM_THREADS"] = str(args.stage_cpus)
    if args.torch_threads:
        env["OMP_NUM_THREADS"] = str(args.torch_threads)
    if args.turn_s:  # stopped while the other arms take their turns: the worker group's start takes longer
        env.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
        # torch.compile's cache of its own per arm: an arm stopped while it holds a lock of a
        # shared cache made another's compile time out waiting for it
        env["TORCHINDUCTOR_CACHE_DIR"] = str(Path(data_dir) / f"inductor-{name}")
    log = Path(data_dir) / f"{name}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    return {"name": name, "proc": proc, "log": log, "load_before": load_avg(), "t0": time.perf_counter()}


def finish_arm(arm: dict, status: int, usage) -> dict | None:
    """The arm's result line, or None (with its log kept and its error lines printed)."""
    name, returncode = arm["name"], os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - arm["t0"]
    text = arm["log"].read_text()
    lines = [l for l in text.splitlines() if l.startswith(RESULT)]
    if returncode != 0 or not lines:
        kept = Path(tempfile.gettempdir()) / f"bench-train-{name}-failed-{os.getpid()}.log"
        kept.write_text(text)
        errors = [l for l in text.splitlines() if "Error" in l or "error:" in l][-8:]
        print(f"[{name}] FAILED (exit {returncode}); whole log kept in {kept}; error lines:\n"
              + "\n".join(l[:500] for l in errors) + f"\nlast output:\n{text[-1500:]}")
        return None
    res = json.loads(lines[-1][len(RESULT):])
    res.update(process_wall_s=wall, peak_rss_mib=usage.ru_maxrss / 1024)  # Linux: KiB
    print(f"[{name}] load average before {arm['load_before']}, after {load_avg()}")
    return res


def run_arm(name: str, args, data_dir: str) -> dict | None:
    arm = start_arm(name, args, data_dir)
    _, status, usage = os.wait4(arm["proc"].pid, 0)
    return finish_arm(arm, status, usage)


# ----------------------------------------------------------------------------- taking turns
def process_tree(root: int) -> list[int]:
    """root and its descendants: a local Ray's GCS, raylet, agents and workers all descend
    from the driver that started it."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def signal_tree(root: int, sig: int) -> int:
    tree = process_tree(root)
    for pid in tree:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return len(tree)


def take_turns(arms: list[dict], turn_s: float, data_dir: str) -> tuple[list[tuple[str, float, float]], dict, dict]:
    """Run the arms' processes one at a time, `turn_s` seconds each in turn, until all have
    exited. The others' whole process trees are stopped (SIGSTOP) meanwhile, so an arm has
    the machine to itself in its turns, and every arm's turns are spread over the same
    minutes: this machine's speed drifts by a third over minutes, which arms run one after
    the other would read as a difference between them. Until every arm has started
    training, only those still starting up take turns, so the loops run over the same
    minutes. Returns the turns (arm, start, end; wall-clock), each arm's (wait status,
    rusage), and the largest process tree seen."""
    import signal

    done: dict[str, tuple] = {}
    turns: list[tuple[str, float, float]] = []
    sizes: dict[str, int] = {}
    for arm in arms:
        signal_tree(arm["proc"].pid, signal.SIGSTOP)
    try:
        while len(done) < len(arms):
            starting = {a["name"] for a in arms if a["name"] not in done and not training_started(data_dir, a["name"])}
            for arm in arms:
                name, pid = arm["name"], arm["proc"].pid
                if name in done or (starting and name not in starting):
                    continue
                sizes[name] = max(sizes.get(name, 0), signal_tree(pid, signal.SIGCONT))
                start = time.time()
                while time.time() < start + turn_s:
                    exited, status, usage = os.wait4(pid, os.WNOHANG)
                    if exited:
                        done[name] = (status, usage)
                        break
                    time.sleep(0.01)
                end = time.time()
                if name not in done:
                    signal_tree(pid, signal.SIGSTOP)
                turns.append((name, start, end))
    finally:  # never leave a process stopped
        for arm in arms:
            if arm["name"] not in done:
                signal_tree(arm["proc"].pid, signal.SIGCONT)
    return turns, done, sizes


def steps_in_turns(res: dict, turns: list[tuple[float, float]], skip: int) -> list[tuple[float, float, int]]:
    """(start, end, tokens) of the steps after --skip that ran wholly inside one of the arm's
    turns (a step's start is the previous step's end)."""
    ends, tokens = res["end_times"], res["step_tokens"]
    return [(ends[i - 1], ends[i], tokens[i]) for i in range(max(1, skip), len(ends))
            if any(a <= ends[i - 1] and ends[i] <= b for a, b in turns)]


def steps_rate(steps: list[tuple[float, float, int]]) -> float:
    """tokens/s over (start, end, tokens) steps."""
    return sum(t for *_, t in steps) / max(sum(e - s for s, e, _ in steps), 1e-9)


def turn_rates(a: list, b: list) -> dict | None:
    """Two arms' tokens/s over their in-turn steps inside the window both were training in
    (so neither is compared over minutes the other did not see), and their median steps."""
    if not a or not b:
        return None
    lo, hi = max(a[0][0], b[0][0]), min(a[-1][1], b[-1][1])
    a, b = [x for x in a if lo <= x[0] and x[1] <= hi], [x for x in b if lo <= x[0] and x[1] <= hi]
    if not a or not b:
        return None
    step_rate = lambda steps: median(t / (e - s) for s, e, t in steps)
    return {"window_s": hi - lo, "steps": (len(a), len(b)), "rate": steps_rate(a) / steps_rate(b),
            "median_step": step_rate(a) / step_rate(b)}


def run_taking_turns(names: list[str], args, data_dir: str, rep: int) -> dict:
    for name in names:  # an earlier round's marks would say this one has started
        for mark in ("metrics.jsonl", "training"):
            (Path(data_dir) / "out" / name / mark).unlink(missing_ok=True)
    arms = [start_arm(name, args, data_dir) for name in names]
    turns, done, sizes = take_turns(arms, args.turn_s, data_dir)
    results = {a["name"]: finish_arm(a, *done[a["name"]]) for a in arms}
    steps = {}
    for name, res in results.items():
        if res:
            mine = [(a, b) for n, a, b in turns if n == name]
            steps[name] = steps_in_turns(res, mine, args.skip)
            print(f"[{name}] round {rep + 1}: {len(steps[name])} of {res['steps'] - args.skip} steps after "
                  f"step {args.skip} inside its {len(mine)} turns; process tree up to {sizes[name]} processes; "
                  f"peak RSS {res['peak_rss_mib']:.0f} MiB", flush=True)
    return {"steps": steps}


RATIOS = [("ray_train", "single", "Ray Train / single process", 0.9),
          ("ray_train", "torchrun", "Ray Train / torchrun (what Ray Train itself costs per step, same workers)", None),
          ("beside_ray", "single", "one process beside an idle Ray Train run / one process", None),
          ("single", "plain", "single process / plain (what DeepSpeed and the loop's bookkeeping cost)", None),
          ("ray_train", "trl", "Ray Train / TRL", 1.2), ("torchrun", "trl", "torchrun / TRL", 1.2),
          ("single", "trl", "single process / TRL", 1.2),
          ("plain", "trl", "plain / TRL (the most that cutting the loop's overheads can reach)", None),
          ("single+compile", "single", "single process compiled / eager", None),
          ("trl+compile", "trl", "TRL compiled / eager", None),
          ("ray_train+compile", "single+compile", "Ray Train / single process, both compiled", 0.9),
          ("ray_train+compile", "trl+compile", "Ray Train / TRL, both compiled", 1.2),
          ("ray_train+compile", "trl", "Ray Train compiled / TRL eager", None),
          ("single+compile", "trl+compile", "single process / TRL, both compiled", 1.2)]


def report_turns(rounds: list[dict], args) -> None:
    print()
    print(f"taking turns of {args.turn_s:g} s (one arm running at a time, the others stopped); "
          f"load average now {load_avg()}")
    for name in {n for r in rounds for n in r["steps"]}:
        rates = [steps_rate(r["steps"][name]) for r in rounds if r["steps"].get(name)]
        print(f"{name:10s}: {median(rates):8.0f} tok/s over its in-turn steps (rounds: {[round(x) for x in rates]})")
    for a, b, label, target in RATIOS:
        per_round = [turn_rates(r["steps"][a], r["steps"][b]) for r in rounds if a in r["steps"] and b in r["steps"]]
        if not per_round:
            continue
        per_round = [x for x in per_round if x]
        if not per_round:  # e.g. one arm's whole loop ran before the other's had started: raise --steps
            print(f"ratio {label}: no window with both arms training; raise --steps")
            continue
        rate, step = median(x["rate"] for x in per_round), median(x["median_step"] for x in per_round)
        detail = "; ".join(f"{x['rate']:.2f} over {x['window_s']:.0f} s ({x['steps'][0]}/{x['steps'][1]} steps)"
                           for x in per_round)
        print(f"ratio {label} tokens/s, taking turns: {rate:.2f}; median-step {step:.2f}; by round: {detail}"
              + (f"  (target >= {target})" if target else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps (may exceed one epoch); default 160 taking turns, 24 with --turn-s 0")
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--skip", type=int, default=3, help="first steps left out of the steady-state figure")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--micro-batch-tokens", type=int, default=0,
                   help="verifine token budget per micro-batch (0: configs/toy.yaml's train.micro_batch_tokens)")
    p.add_argument("--logprob-chunk-tokens", type=int, default=0, help="verifine (0: the config's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for the verifine arms (repeatable), e.g. train.zero_stage=1")
    p.add_argument("--trl-path", default="/tmp/trl_pkgs", help="directory holding trl + accelerate")
    p.add_argument("--arms", default="ray_train,torchrun,single,plain,trl")
    p.add_argument("--repeat", type=int, default=None,
                   help="rounds (default 1 taking turns; with --turn-s 0: 2, runs per arm alternating, the median "
                        "run reported)")
    p.add_argument("--turn-s", type=float, default=3.0,
                   help="run all arms at once, one at a time for this many seconds each in turn (the others "
                        "stopped); 0: one arm after the other, which also gives start-up times")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="OMP_NUM_THREADS for every arm (0: unset; torch then uses one thread per core in a plain "
                        "process, and Ray gives each train worker as many as its CPUs, i.e. 1)")
    p.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm (ARMS name, maybe +compile) here
    p.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.steps = args.steps or (160 if args.turn_s else 24)
    args.repeat = args.repeat or (1 if args.turn_s else 2)
    if args.arm and base_arm(args.arm) == "trl" and args.trl_path:
        # before transformers is imported: it decides once whether accelerate is available
        sys.path.insert(0, args.trl_path)

    from pipeline.toy_model import ensure_toy_model

    model = str(ensure_toy_model(0))
    if args.arm:
        import resource

        if args.arm.endswith(COMPILED):
            args.set.append("train.compile=true")
        res = ARMS[base_arm(args.arm)](args, model)
        if os.environ.get("RANK", "0") != "0":  # a torchrun rank other than 0: rank 0 reports
            return
        res["self_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        print(RESULT + json.dumps(res), flush=True)
        return

    arms = args.arms.split(",")
    for name in arms:
        base_arm(name)  # an unknown name fails here, before any arm starts
    if any(base_arm(a) == "trl" for a in arms):
        try:
            trl = import_trl(args.trl_path)
            print(f"TRL {trl.__version__} from {Path(trl.__file__).parent}")
        except ImportError as e:
            print(f"TRL arm skipped: cannot import trl ({e}); install it outside the project venv, e.g. "
                  f"`pip install --target {args.trl_path} --no-deps trl accelerate`, or pass --trl-path")
            arms = [a for a in arms if base_arm(a) != "trl"]
    print(f"{args.examples} examples, batch {args.batch_size}, {args.steps} steps, max_len {args.max_len}, "
          f"lr {args.lr}, fp32 CPU, steady state after step {args.skip}; {os.cpu_count()} CPUs; "
          f"load average {load_avg()}")
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        write_data(Path(tmp), args.examples, model)
        stage_train = pipeline_config(args, model, tmp, "probe")[1].train
        args.stage_workers, args.stage_cpus = stage_train.num_workers, stage_train.cpus_per_worker
        if stage_train.compile:
            print("train.compile=true: the verifine arms compile their decoder layers, TRL its model (torch_compile)")
        if args.turn_s:
            rounds = [run_taking_turns(arms, args, tmp, rep) for rep in range(args.repeat)]
            report_turns(rounds, args)
            return
        for rep in range(args.repeat):  # arms alternate, so a burst of outside load hits all of them
            for name in arms:
                r = run_arm(name, args, tmp)
                if r:
                    runs[name].append({**r, "round": rep})
                    print(f"[{name}] run {rep + 1}: {r['tok_s']:.0f} tok/s over steps {args.skip + 1}.., "
                          f"{r['median_step_tok_s']:.0f} tok/s in the median step ({r['median_step_s']:.3f} s), "
                          f"start-up {r['startup_s']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
    print()
    best: dict[str, dict] = {}
    for name, rs in runs.items():
        if not rs:
            continue
        r = best[name] = sorted(rs, key=lambda x: x["tok_s"])[len(rs) // 2]  # the median run
        if "loss_type" in r:
            extra = (f"loss_type {r['loss_type']}, {r['torch_threads']} torch threads, "
                     f"saved {', '.join(r['checkpoints_saved']) or 'no checkpoint'}")
        elif base_arm(name) == "plain":
            extra = f"{r['micro_batches']} micro-batch(es)/step, no DeepSpeed, {r['torch_threads']} torch threads"
        elif base_arm(name) == "torchrun":
            extra = (f"{r['micro_batches']} micro-batch(es)/step (budget {r['micro_batch_tokens']} tokens), "
                     f"{r['processes']} processes (gloo), {r['torch_threads']} torch thread(s) each")
        else:
            extra = f"{r['micro_batches']} micro-batch(es)/step (budget {r['micro_batch_tokens']} tokens)"
            extra += (f", {r['num_workers']} Ray Train worker(s), {r['torch_threads']} torch thread(s) each"
                      if "num_workers" in r
                      else f", 1 process, {r['torch_threads']} torch threads"
                      + (", an idle Ray Train run beside it" if base_arm(name) == "beside_ray" else ""))
        extra += f", checkpoint every {r['checkpoint_every']} steps"
        print(f"{name:9s}: {r['tok_s']:8.0f} tok/s ({r['resp_tok_s']:.0f} response tok/s) in the median of "
              f"{len(rs)} run(s) {[round(x['tok_s']) for x in rs]}; {extra}")
        print(f"{'':9s}  median step {r['median_step_s']:.3f} s, median-step rate {r['median_step_tok_s']:.0f} tok/s;"
              f" over all runs: median {median(x['median_step_tok_s'] for x in rs):.0f}, best "
              f"{max(x['median_step_tok_s'] for x in rs):.0f}")
        where = {"ray_train": "TorchTrainer.fit()", "single": "train_loop() call", "plain": "set-up + loop",
                 "beside_ray": "train_loop() call",
                 "torchrun": "rank 0's train_loop() call"}.get(
            base_arm(name), "model load + SFTTrainer set-up + train()")
        print(f"{'':9s}  loop {r['loop_s']:.1f} s for {r['steps']} steps; {where} {r['train_call_s']:.1f} s, so "
              f"start-up (+ export) outside the loop {r['startup_s']:.1f} s"
              + (f"; ray.init {r['ray_init_s']:.1f} s before it" if "ray_init_s" in r else "")
              + f"; whole process {r['process_wall_s']:.1f} s")
        print(f"{'':9s}  peak RSS {r['peak_rss_mib']:.0f} MiB with children, {r['self_peak_rss_mib']:.0f} MiB the "
              f"process alone; loss last step {r['final_loss']:.4f}, mean {r['mean_loss']:.4f}")
        print(f"{'':9s}  step seconds: {r['step_s']}")
        if r.get("note"):
            print(f"{'':9s}  NOTE: {r['note']}")
    print()
    print(f"load average now {load_avg()} (1/5/15 min) on {os.cpu_count()} CPUs shared with other work")
    steps = f"steps {args.skip + 1}..{args.steps}, median runs"
    med = {k: median(x["median_step_tok_s"] for x in runs[k]) for k in best}
    ray, single, trl = best.get("ray_train"), best.get("single"), best.get("trl")
    if ray and single:
        print(f"ratio Ray Train / single process tokens/s: {ray['tok_s'] / single['tok_s']:.2f} ({steps}); "
              f"median-step {med['ray_train'] / med['single']:.2f}; step time single/Ray "
              f"{single['median_step_s'] / ray['median_step_s']:.2f}; {paired(runs, 'ray_train', 'single')}"
              f"  (target >= 0.9)")
        print(f"start-up outside the loop: Ray Train {ray['startup_s']:.1f} s (+ ray.init {ray['ray_init_s']:.1f} s), "
              f"single process {single['startup_s']:.1f} s")
    spawned = best.get("torchrun")
    if ray and spawned:
        print(f"ratio Ray Train / torchrun (what Ray Train itself costs per step, same workers): "
              f"{ray['tok_s'] / spawned['tok_s']:.2f}; median-step {med['ray_train'] / med['torchrun']:.2f}; "
              f"{paired(runs, 'ray_train', 'torchrun')}")
    beside = best.get("beside_ray")
    if beside and single:
        print(f"ratio one process beside an idle Ray Train run / one process (what Ray's own processes cost the "
              f"loop on these cores): {beside['tok_s'] / single['tok_s']:.2f}; median-step "
              f"{med['beside_ray'] / med['single']:.2f}; {paired(runs, 'beside_ray', 'single')}")
    if beside and ray:
        print(f"ratio Ray Train / one process beside Ray (what is left to Ray Train's path in the worker): "
              f"{ray['tok_s'] / beside['tok_s']:.2f}; median-step {med['ray_train'] / med['beside_ray']:.2f}; "
              f"{paired(runs, 'ray_train', 'beside_ray')}")
    plain = best.get("plain")
    for name, key, r in (("Ray Train", "ray_train", ray), ("torchrun", "torchrun", spawned),
                         ("single process", "single", single)):
        if r and trl:
            print(f"ratio {name} / TRL tokens/s: {r['tok_s'] / trl['tok_s']:.2f} ({steps}); median-step "
                  f"{med[key] / med['trl']:.2f}; {paired(runs, key, 'trl')}  (target >= 1.2)")
    if plain and single:
        print(f"ratio single process / plain (what DeepSpeed and the loop's bookkeeping cost): "
              f"{single['tok_s'] / plain['tok_s']:.2f}; median-step {med['single'] / med['plain']:.2f}; "
              f"{paired(runs, 'single', 'plain')}")
    if plain and trl:
        print(f"ratio plain / TRL (the most that cutting the loop's overheads can reach, same arithmetic): "
              f"{plain['tok_s'] / trl['tok_s']:.2f}; median-step {med['plain'] / med['trl']:.2f}; "
              f"{paired(runs, 'plain', 'trl')}")


if __name__ == "__main__":
    main()
