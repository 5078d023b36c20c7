"""Training throughput and peak memory: verifine's train loop vs TRL's SFTTrainer (DFT).

    python tests/benchmarks/bench_train.py [--examples 512] [--batch-size 64] [--steps 24]
                                           [--max-len 256] [--skip 3] [--repeat 3] [--torch-threads 0]
                                           [--trl-path /tmp/trl_pkgs]

Both arms train the cached toy base model with the DFT objective on the same data (toy
train prompts in the chat template + `toy_task.solution_text`, EOS appended, loss on
the completion only), with the same batch size, max length, number of optimizer steps,
AdamW (betas 0.9/0.95), lr, warm-up + cosine, clip 1.0, fp32 on CPU, no gradient
checkpointing. Each arm runs in its own child process, one after the other:

- verifine: `actors.train_loop.train_loop(cfg)` in a single process (DeepSpeed ZeRO-2,
  gloo), one micro-batch per step by default (--micro-batch-tokens batch*max_len), like
  TRL's single forward per step. Step times come from its metrics history.
- trl: `trl.SFTTrainer` with `SFTConfig(loss_type="dft")` (plain `nll` SFT, with a note,
  if the installed TRL has no DFT), gradient_accumulation_steps=1. Step times from a
  TrainerCallback; token counts from the batches it trains on.

TRL is not a dependency of verifine: install it outside the project venv, e.g.
    .venv/bin/pip install --target /tmp/trl_pkgs --no-deps trl accelerate
(TRL 1.x's other imports -- datasets, transformers, pandas, pyarrow, jinja2 ... -- are in
the venv already). The arm is skipped with a message when TRL cannot be imported.

Printed per arm: steady-state tokens/s (all non-pad tokens, and response tokens) over
steps --skip+1..N, i.e. after the first steps' one-off costs, and the median over those
steps of each step's own tokens/s (robust to a burst of outside load); total child wall time;
peak RSS of the child process (os.wait4's rusage, i.e. getrusage of that child and
its own children), and the arm process's own peak (getrusage SELF). They differ when
DeepSpeed JIT-builds its CPU shared-memory comm op in a child compiler (~1.5 GB RSS,
tens of seconds): it is cached in TORCH_EXTENSIONS_DIR (~/.cache/torch_extensions),
but two venvs at different paths sharing that cache rebuild it alternately; point
TORCH_EXTENSIONS_DIR at a private dir to keep such builds out of repeated runs.
Ratio verifine/TRL: target >= 1.0.
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
def arm_verifine(args, model: str) -> dict:
    import torch

    from actors.sequences import step_schedule
    from actors.train_loop import load_units, train_loop
    from actors.store import RunStore
    from transformers import AutoTokenizer

    store = RunStore(args.data_dir)
    cfg = {"objective": "dft", "data": "positives", "data_file": "positives.parquet", "reference_file": None,
           "store_uri": store.uri, "model_path": model, "export_dir": "out/verifine",
           "metrics_file": "out/verifine.jsonl", "template": "chat", "seed": 0, "lr": args.lr,
           "batch_size": args.batch_size, "micro_batch_tokens": args.micro_batch_tokens or args.batch_size * args.max_len,
           "epochs": args.steps * args.batch_size / args.examples, "max_len": args.max_len,
           "warmup_ratio": 0.1, "weight_decay": 0.0, "grad_clip": 1.0, "beta": 0.1, "zero_stage": 2,
           "precision": "fp32", "optimizer": "adamw", "checkpoint_every": 10 ** 9, "use_gpu": False,
           "logprob_chunk_tokens": args.logprob_chunk_tokens}
    t0 = time.perf_counter()
    out = train_loop(cfg)
    wall = time.perf_counter() - t0
    history = out["history"]
    # all non-pad tokens per step, from the loop's own (deterministic) schedule
    units = load_units(cfg, AutoTokenizer.from_pretrained(model))
    schedule = step_schedule(len(units), cfg["batch_size"], cfg["epochs"], cfg["seed"])
    all_tokens = [sum(len(units[i]["ex"]["ids"]) for i in step) for step in schedule]
    times = [m["elapsed_s"] for m in history]
    resp = [int(m["tokens"]) for m in history]
    return {"steps": len(history), "train_call_s": wall, "loop_s": times[-1],
            "tok_s": steady(times, all_tokens, args.skip), "resp_tok_s": steady(times, resp, args.skip),
            "median_step_tok_s": median_step_rate(times, all_tokens, args.skip),
            "step_s": [round(b - a, 3) for a, b in zip([0.0] + times, times)],
            "micro_batches": history[-1]["micro_batches_max"], "final_loss": history[-1]["loss"],
            "mean_loss": sum(m["loss"] for m in history) / len(history),
            "torch_threads": torch.get_num_threads()}


def import_trl(path: str):
    if path and path not in sys.path:
        sys.path.insert(0, path)
    import trl  # noqa: F401

    return trl


def arm_trl(args, model_dir: str) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

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
    warmup = max(1, int(round(args.steps * 0.1)))
    config = SFTConfig(
        output_dir=os.path.join(args.data_dir, "trl-out"), loss_type=loss_type, max_length=args.max_len,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1, max_steps=args.steps,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=warmup, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, optim="adamw_torch", use_cpu=True, bf16=False,
        fp16=False, gradient_checkpointing=False, packing=False, padding_free=False, save_strategy="no",
        report_to="none", logging_steps=10 ** 6, disable_tqdm=True, dataloader_num_workers=0, seed=0,
        completion_only_loss=True)

    times: list[float] = []
    counts: list[tuple[int, int]] = []
    losses: list = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            times.append(time.perf_counter())

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
    return {"steps": len(times), "train_call_s": wall, "loop_s": times[-1],
            "tok_s": steady(times, all_tokens, args.skip), "resp_tok_s": steady(times, resp, args.skip),
            "median_step_tok_s": median_step_rate(times, all_tokens, args.skip),
            "step_s": [round(b - a, 3) for a, b in zip([0.0] + times, times)], "final_loss": float(losses[-1]),
            "mean_loss": result.training_loss,
            "loss_type": loss_type, "note": note, "trl_version": trl.__version__,
            "torch_threads": torch.get_num_threads()}


ARMS = {"verifine": arm_verifine, "trl": arm_trl}


# ----------------------------------------------------------------------------- driver
def run_arm(name: str, args, data_dir: str) -> dict | None:
    cmd = [sys.executable, __file__, "--arm", name, "--data-dir", data_dir, "--examples", str(args.examples),
           "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--max-len", str(args.max_len),
           "--skip", str(args.skip), "--lr", str(args.lr), "--micro-batch-tokens", str(args.micro_batch_tokens),
           "--logprob-chunk-tokens", str(args.logprob_chunk_tokens), "--trl-path", args.trl_path]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if args.torch_threads:
        env["OMP_NUM_THREADS"] = str(args.torch_threads)
    before = load_avg()
    log = Path(data_dir) / f"{name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    text = log.read_text()
    lines = [l for l in text.splitlines() if l.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        print(f"[{name}] FAILED (exit {proc.returncode}); last output:\n{text[-3000:]}")
        return None
    res = json.loads(lines[-1][len(RESULT):])
    res.update(process_wall_s=wall, peak_rss_mib=usage.ru_maxrss / 1024)  # Linux: KiB
    print(f"[{name}] load average before {before}, after {load_avg()}")
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=24, help="optimizer steps (may exceed one epoch)")
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--skip", type=int, default=3, help="first steps left out of the steady-state figure")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--micro-batch-tokens", type=int, default=0, help="verifine token budget (0: batch*max_len)")
    p.add_argument("--logprob-chunk-tokens", type=int, default=2048, help="verifine (project default 2048)")
    p.add_argument("--trl-path", default="/tmp/trl_pkgs", help="directory holding trl + accelerate")
    p.add_argument("--arms", default="verifine,trl")
    p.add_argument("--repeat", type=int, default=3, help="runs per arm, alternating; the median run is reported")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="OMP_NUM_THREADS for both arms (0: torch's default, one per core). On a loaded machine "
                        "1 is far steadier: a multi-threaded step of this tiny model stalls at every barrier "
                        "when another process holds a core")
    p.add_argument("--arm", choices=sorted(ARMS), help=argparse.SUPPRESS)  # internal: run one arm here
    p.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.arm == "trl" and args.trl_path:
        # before transformers is imported: it decides once whether accelerate is available
        sys.path.insert(0, args.trl_path)

    from pipeline.toy_model import ensure_toy_model

    model = str(ensure_toy_model(0))
    if args.arm:
        import resource

        res = ARMS[args.arm](args, model)
        res["self_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        print(RESULT + json.dumps(res), flush=True)
        return

    arms = args.arms.split(",")
    if "trl" in arms:
        try:
            trl = import_trl(args.trl_path)
            print(f"TRL {trl.__version__} from {Path(trl.__file__).parent}")
        except ImportError as e:
            print(f"TRL arm skipped: cannot import trl ({e}); install it outside the project venv, e.g. "
                  f"`pip install --target {args.trl_path} --no-deps trl accelerate`, or pass --trl-path")
            arms.remove("trl")
    print(f"{args.examples} examples, batch {args.batch_size}, {args.steps} steps, max_len {args.max_len}, "
          f"lr {args.lr}, fp32 CPU, steady state after step {args.skip}; {os.cpu_count()} CPUs")
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        write_data(Path(tmp), args.examples, model)
        for rep in range(args.repeat):  # arms alternate, so a burst of outside load hits both
            for name in arms:
                r = run_arm(name, args, tmp)
                if r:
                    runs[name].append(r)
                    print(f"[{name}] run {rep + 1}: {r['tok_s']:.0f} tok/s over steps {args.skip + 1}.., "
                          f"{r['median_step_tok_s']:.0f} tok/s in the median step, "
                          f"peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
    print()
    best: dict[str, dict] = {}
    for name, rs in runs.items():
        if not rs:
            continue
        r = best[name] = sorted(rs, key=lambda x: x["tok_s"])[len(rs) // 2]  # the median run
        extra = f", loss_type {r['loss_type']}" if "loss_type" in r else f", {r['micro_batches']} micro-batch(es)/step"
        print(f"{name:9s}: {r['tok_s']:8.0f} tok/s ({r['resp_tok_s']:.0f} response tok/s) in the median of "
              f"{len(rs)} run(s) {[round(x['tok_s']) for x in rs]}; peak RSS {r['peak_rss_mib']:.0f} MiB with "
              f"children, {r['self_peak_rss_mib']:.0f} MiB the process alone; loss last step {r['final_loss']:.4f}, mean {r['mean_loss']:.4f}"
              f"{extra}; {r['torch_threads']} torch threads")
        print(f"{'':9s}  median-step rate {r['median_step_tok_s']:.0f} tok/s; over all runs: median "
              f"{median(x['median_step_tok_s'] for x in rs):.0f}, best {max(x['median_step_tok_s'] for x in rs):.0f}")
        print(f"{'':9s}  loop {r['loop_s']:.1f} s for {r['steps']} steps; train call {r['train_call_s']:.1f} s "
              f"(set-up/export outside the loop {r['train_call_s'] - r['loop_s']:.1f} s); whole process "
              f"{r['process_wall_s']:.1f} s")
        print(f"{'':9s}  step seconds: {r['step_s']}")
        if r.get("note"):
            print(f"{'':9s}  NOTE: {r['note']}")
    v, t = best.get("verifine"), best.get("trl")
    if v and t:
        print()
        print(f"ratio verifine/TRL tokens/s:  {v['tok_s'] / t['tok_s']:.2f}  (target >= 1.0; median runs, "
              f"steps {args.skip + 1}..{args.steps})")
        med = {k: median(x["median_step_tok_s"] for x in runs[k]) for k in ("verifine", "trl")}
        top = {k: max(x["median_step_tok_s"] for x in runs[k]) for k in ("verifine", "trl")}
        print(f"ratio verifine/TRL median-step tokens/s: {med['verifine'] / med['trl']:.2f} (median over runs), "
              f"{top['verifine'] / top['trl']:.2f} (best run each)")
        print(f"ratio verifine/TRL peak RSS:  {v['peak_rss_mib'] / t['peak_rss_mib']:.2f} with children, "
              f"{v['self_peak_rss_mib'] / t['self_peak_rss_mib']:.2f} the process alone  (lower is better)")
        print(f"ratio verifine/TRL process wall time: {v['process_wall_s'] / t['process_wall_s']:.2f}")

if __name__ == "__main__":
    main()
