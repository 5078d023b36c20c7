"""Sampling throughput: the sample stage vs a bare vLLM engine vs transformers `generate`.

    python tests/benchmarks/bench_sample.py [--prompts 512] [--n 4] [--max-tokens 80]
                                            [--block-size 128] [--hf-batch 64] [--hf-threads 0] [--dtype float32]
                                            [--arms stage,bare,hf] [--repeat 1]

All three arms sample the same toy-train prompts (chat template) from the cached toy
base model with the same n / temperature / top_p / max_tokens; each arm runs in its own
child process, one after the other, so they never compete for the cores.

- stage: `pipeline.sample_stage.sample_jobs` (one `VLLMSampler` engine actor fed block
  by block), on a local Ray started with 2 CPUs. Start-up is excluded with the
  per-block `seconds` the actor measures around its `generate` calls: the script swaps
  in a `VLLMSampler` subclass that only also writes each block's generate start/end
  (wall clock) to a file. The generation figure is all output tokens / (the actor's
  first generate start -> the last block written at the driver): it holds generation
  plus the stage's own per-block costs (rows to the driver, parquet writes), but not
  actor/engine start-up. A second call can't serve as the warm measurement: outside a
  pipeline run it starts a fresh engine.
  Also printed: the tokens/s inside the actor (sum of its generate seconds), and the
  end-to-end wall time of the call with start-up included.
- bare: `vllm.LLM` built by `actors.sampler.make_engine` with the same EngineSpec, one
  warm-up `generate`, then one timed `generate` over all prompts (the best case), and
  one timed pass block by block (as the stage calls it).
- hf: `AutoModelForCausalLM.generate`, sampling, left padding, --hf-batch prompts per
  call x n return sequences, top_k disabled (vLLM's default), after a warm-up call.
  Output tokens count up to and including the first EOS, like vLLM's token_ids.

Ratios: stage/bare (target >= 0.8) and hf/bare. The load average is printed around
every arm: timings only mean something on otherwise idle cores.
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

from bench_common import load_avg

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run as a plain script from anywhere

RESULT = "BENCH_RESULT "


def toy_setup(args):
    from transformers import AutoTokenizer

    from actors.sampler import EngineSpec
    from pipeline.toy_task import prompt_row
    from actors.prompt_templates import render_prompt
    from pipeline.toy_model import ensure_toy_model
    from pipeline.toy_task import make_problems

    model = str(ensure_toy_model(0))
    tokenizer = AutoTokenizer.from_pretrained(model)
    problems = [prompt_row(p) for p in make_problems("train", args.prompts, seed=0)]
    prompts = [render_prompt(tokenizer, "chat", p["problem"]) for p in problems]
    spec = EngineSpec(model=model, n=args.n, temperature=args.temperature, top_p=1.0, max_tokens=args.max_tokens,
                      seed=0, gpu_memory_utilization=args.gpu_memory_utilization, dtype=args.dtype)
    return model, tokenizer, problems, prompts, spec


# ----------------------------------------------------------------------------- arms
def timed_sampler_class(record: str):
    """`VLLMSampler` that also appends, per block, when its `generate` started and ended
    (wall clock, comparable across processes) to `record`. Defined in this script, so
    Ray pickles it by value; the sampling itself is the unchanged parent's."""
    from actors.sampler import VLLMSampler

    class TimedVLLMSampler(VLLMSampler):
        record_file = record

        def sample_block(self, block: dict) -> tuple[list[dict], float]:
            rows, seconds = super().sample_block(block)
            end = time.time()
            with open(self.record_file, "a") as f:
                f.write(json.dumps({"block": block["prompt_ids"][0], "start": end - seconds, "end": end,
                                    "seconds": seconds}) + "\n")
            return rows, seconds

    return TimedVLLMSampler


def arm_stage(args) -> dict:
    import pipeline.engine_pool as engine_pool
    import pipeline.sample_stage as sample_stage
    from pipeline.ray_session import connect
    from actors.store import RunStore

    model, _, problems, _, spec = toy_setup(args)
    t0 = time.perf_counter()
    connect(num_cpus=2, log=lambda m: None)
    ray_start = time.perf_counter() - t0
    arrivals: list[tuple[float, int]] = []

    def log(msg: str) -> None:
        if msg.strip().startswith("block "):  # logged after the block's rows are written
            arrivals.append((time.time(), int(msg.split()[1].rstrip(":"))))

    with tempfile.TemporaryDirectory(prefix="bench-sample-") as tmp:
        record = os.path.join(tmp, "actor-times.jsonl")
        engine_pool.VLLMSampler = timed_sampler_class(record)
        store = RunStore(tmp)
        t1 = time.time()
        files, stats = sample_stage.sample_jobs(store, [sample_stage.SampleJob("s", problems, "chat")], spec, 1, 0,
                                                args.block_size, log=log)
        files = files[0]
        wall = time.time() - t1
        block_tokens = {b: sum(r["num_tokens"] for r in store.read_rows(f)) for b, f in enumerate(files)}
        actor = [json.loads(line) for line in open(record)]
    import ray

    ray.shutdown()
    total = sum(block_tokens.values())
    gen_start = min(a["start"] for a in actor)  # the engine is up: start-up ends here
    window = arrivals[-1][0] - gen_start
    return {"ray_init_s": ray_start, "wall_s": wall, "output_tokens": total, "blocks": len(files),
            "end_to_end_tok_s": total / wall, "startup_s": gen_start - t1,
            "gen_window_s": window, "gen_tok_s": total / window,
            "actor_gen_s": sum(a["seconds"] for a in actor),
            "actor_tok_s": total / sum(a["seconds"] for a in actor),
            "arrival_gaps_s": [round(b[0] - a[0], 2) for a, b in zip(arrivals, arrivals[1:])],
            "actor_block_s": [round(a["seconds"], 2) for a in sorted(actor, key=lambda a: a["start"])]}


def arm_bare(args) -> dict:
    from actors.sampler import make_engine, sampling_params

    _, _, _, prompts, spec = toy_setup(args)
    t0 = time.perf_counter()
    llm = make_engine(spec)
    startup = time.perf_counter() - t0
    params = sampling_params(spec)
    llm.generate(prompts[:8], params, use_tqdm=False)  # warm-up

    def count(outputs) -> int:
        return sum(len(c.token_ids) for o in outputs for c in o.outputs)

    t1 = time.perf_counter()
    tokens = count(llm.generate(prompts, params, use_tqdm=False))
    seconds = time.perf_counter() - t1
    t2 = time.perf_counter()
    block_tokens = sum(count(llm.generate(prompts[i:i + args.block_size], params, use_tqdm=False))
                       for i in range(0, len(prompts), args.block_size))
    block_seconds = time.perf_counter() - t2
    return {"startup_s": startup, "gen_s": seconds, "output_tokens": tokens, "gen_tok_s": tokens / seconds,
            "blocks_gen_s": block_seconds, "blocks_tokens": block_tokens, "blocks_tok_s": block_tokens / block_seconds}


def arm_hf(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model_dir, tokenizer, _, prompts, spec = toy_setup(args)
    tokenizer.padding_side = "left"
    if args.hf_threads:
        torch.set_num_threads(args.hf_threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    torch.manual_seed(0)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    def generate(batch: list[str]) -> int:
        enc = tokenizer(batch, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, temperature=spec.temperature, top_p=spec.top_p, top_k=0,
                                 max_new_tokens=spec.max_tokens, num_return_sequences=spec.n,
                                 eos_token_id=eos, pad_token_id=pad)
        new = out[:, enc["input_ids"].shape[1]:]
        is_eos = new == eos
        # tokens up to and including the first EOS (vLLM's token_ids include it too)
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full_like(is_eos[:, 0], new.shape[1],
                                                                                       dtype=torch.long))
        return int(first.sum())

    generate(prompts[:8])  # warm-up
    t0 = time.perf_counter()
    tokens = sum(generate(prompts[i:i + args.hf_batch]) for i in range(0, len(prompts), args.hf_batch))
    seconds = time.perf_counter() - t0
    return {"gen_s": seconds, "output_tokens": tokens, "gen_tok_s": tokens / seconds,
            "torch_threads": torch.get_num_threads()}


ARMS = {"stage": arm_stage, "bare": arm_bare, "hf": arm_hf}


# ----------------------------------------------------------------------------- driver
def run_arm(name: str, args) -> dict | None:
    cmd = [sys.executable, __file__, "--arm", name, "--prompts", str(args.prompts), "--n", str(args.n),
           "--max-tokens", str(args.max_tokens), "--block-size", str(args.block_size),
           "--hf-batch", str(args.hf_batch), "--temperature", str(args.temperature),
           "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--hf-threads", str(args.hf_threads),
           "--dtype", args.dtype]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    before = load_avg()
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    lines = [l for l in out.stdout.splitlines() if l.startswith(RESULT)]
    if out.returncode != 0 or not lines:
        print(f"[{name}] FAILED (exit {out.returncode}); last output:\n{(out.stdout + out.stderr)[-3000:]}")
        return None
    res = json.loads(lines[-1][len(RESULT):])
    res["process_wall_s"] = wall
    print(f"[{name}] load average before {before}, after {load_avg()}; child process {wall:.1f} s")
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=512)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=80)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--block-size", type=int, default=128, help="prompts per stage block (toy default 128)")
    p.add_argument("--hf-batch", type=int, default=64, help="prompts per transformers generate call")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.2)
    p.add_argument("--hf-threads", type=int, default=0,
                   help="torch threads of the transformers arm (0: torch's default, one per core; vLLM's CPU "
                        "engine binds 1 OpenMP thread to one core and reserves the other on 2 cores)")
    p.add_argument("--dtype", default="float32",
                   help="the engines' dtype (configs/toy.yaml: float32; auto: vLLM's choice, bf16 for the fp32 toy)")
    p.add_argument("--arms", default="stage,bare,hf")
    p.add_argument("--repeat", type=int, default=1, help="runs per arm, alternating; the median run is reported")
    p.add_argument("--arm", choices=sorted(ARMS), help=argparse.SUPPRESS)  # internal: run one arm here
    args = p.parse_args()
    if args.arm:
        print(RESULT + json.dumps(ARMS[args.arm](args)), flush=True)
        return

    print(f"{args.prompts} prompts x n={args.n}, max_tokens {args.max_tokens}, temperature {args.temperature}, "
          f"engine dtype {args.dtype}, "
          f"stage block size {args.block_size}, HF batch {args.hf_batch} prompts; {os.cpu_count()} CPUs")
    runs: dict[str, list[dict]] = {name: [] for name in args.arms.split(",")}
    for rep in range(args.repeat):  # arms alternate, so a burst of outside load hits both
        for name in runs:
            r = run_arm(name, args)
            if r:
                runs[name].append(r)
                print(f"[{name}] run {rep + 1}: generation {r['gen_tok_s']:.0f} output tok/s", flush=True)
    # the median run of each arm (by generation tok/s)
    results = {k: sorted(v, key=lambda r: r["gen_tok_s"])[len(v) // 2] for k, v in runs.items() if v}
    if args.repeat > 1:
        print("all runs, generation tok/s: " + "; ".join(f"{k} {[round(r['gen_tok_s']) for r in v]}"
                                                       for k, v in runs.items()) + " (median runs below)")
    s, b, h = results.get("stage"), results.get("bare"), results.get("hf")
    print()
    if s:
        print(f"stage: end-to-end {s['wall_s']:.1f} s for {s['output_tokens']} output tokens "
              f"({s['end_to_end_tok_s']:.0f} tok/s, start-up included; Ray init {s['ray_init_s']:.1f} s before it "
              f"not included); actor + engine start-up {s['startup_s']:.1f} s")
        print(f"stage: generation {s['gen_tok_s']:.0f} output tok/s: all {s['output_tokens']} tokens over "
              f"{s['gen_window_s']:.2f} s from the actor's first generate call to the last block written at the "
              f"driver")
        print(f"stage: inside the actor {s['actor_tok_s']:.0f} tok/s (sum of its per-block generate seconds "
              f"{s['actor_gen_s']:.2f} s: {s['actor_block_s']}); driver block arrival gaps {s['arrival_gaps_s']}")
    if b:
        print(f"bare:  engine start-up {b['startup_s']:.1f} s; one generate over all prompts "
              f"{b['gen_tok_s']:.0f} output tok/s ({b['output_tokens']} tokens in {b['gen_s']:.2f} s); "
              f"block by block {b['blocks_tok_s']:.0f} tok/s")
    if h:
        print(f"hf:    generate {h['gen_tok_s']:.0f} output tok/s ({h['output_tokens']} tokens in {h['gen_s']:.2f} s, "
              f"{h['torch_threads']} torch threads)")
    print()
    if s and b:
        print(f"ratio stage/bare (generation): {s['gen_tok_s'] / b['gen_tok_s']:.2f}  (target >= 0.8)")
        print(f"ratio stage/bare-by-block:     {s['gen_tok_s'] / b['blocks_tok_s']:.2f}")
        print(f"ratio stage actor-only/bare:   {s['actor_tok_s'] / b['gen_tok_s']:.2f}")
        print(f"ratio stage end-to-end/bare:   {s['end_to_end_tok_s'] / b['gen_tok_s']:.2f}  (start-up included)")
    if h and b:
        print(f"ratio hf/bare:                 {h['gen_tok_s'] / b['gen_tok_s']:.2f}")


if __name__ == "__main__":
    main()
